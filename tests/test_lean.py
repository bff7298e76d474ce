"""Lean activations (egg_eval.backbones.lean): the same logits and gradients to the bit, fewer
bytes kept for the backward, and the activation budget tries them before recomputing layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import noise_image

from egg_eval.backbones import load_backbone
from egg_eval.backbones.lean import is_gated_mlp, lean_activations, lean_modules
from egg_eval.backbones.memory import MemoryPlan
from egg_eval.grounding.saliency import entropy, saved_bytes_per_token, token_saliency, token_saliency_batch
from egg_eval.undone import parameter_gradients

Q = "What is written on the sign?"


@pytest.fixture(scope="module")
def bf16_backbones(tiny_paths):
    return {f: load_backbone(f, p, dtype="bfloat16", device="cpu", max_new_tokens=2) for f, p in tiny_paths.items()}


def backbone(request_family, dtype, tiny_backbones, bf16_backbones):
    return (bf16_backbones if dtype == "bfloat16" else tiny_backbones)[request_family]


def untouched(bb) -> bool:
    """No module of the model is left with a patched ``forward``."""
    return all("forward" not in vars(m) for m in bb.model.modules())


def grads(bb, encs, lean, recompute=0):
    """Logits and the entropy's gradient to the visual leaves of one prompt or a padded batch."""
    enc, positions = (encs[0], None) if len(encs) == 1 else bb.stack_lm_inputs(encs)
    image_inputs = encs[0] if len(encs) == 1 else bb.image_inputs(encs)
    leaves = bb.visual_leaves(image_inputs)
    with torch.enable_grad():
        logits = bb.next_token_logits(enc, leaves, recompute_layers=recompute, positions=positions, lean=lean)
        value = sum(entropy(row) for row in logits.reshape(-1, logits.shape[-1]))
        g = torch.autograd.grad(value, leaves)
    return logits.detach(), [x.detach() for x in g]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("recompute", [0, 1, True])
def test_lean_gives_the_same_logits_and_gradients_to_the_bit(tiny_backbones, bf16_backbones, family, dtype, recompute):
    """The lean norm and MLP run the very same operations again in the backward, so nothing
    changes, not even the last bit: alone, with some or all layers recomputed (the checkpoint
    re-runs a recomputed layer lean as its forward was), and in a padded batch of views."""
    bb = backbone(family, dtype, tiny_backbones, bf16_backbones)
    views = [noise_image(150, 110, seed=5), noise_image(70, 90, seed=6)]
    for encs in ([bb.encode([views[0]], Q)], [bb.encode([v], Q) for v in views]):
        want = grads(bb, encs, lean=False, recompute=recompute)
        got = grads(bb, encs, lean=True, recompute=recompute)
        assert torch.equal(got[0], want[0])
        assert all(torch.equal(a, b) for a, b in zip(got[1], want[1], strict=True))
        assert max(float(g.abs().max()) for g in want[1]) > 0
    assert untouched(bb)


def test_lean_applies_to_the_norms_of_a_half_precision_model_and_to_every_gated_mlp(tiny_backbones, bf16_backbones):
    for fam, bb in bf16_backbones.items():
        norms, mlps = lean_modules(bb.language_model)
        assert len(mlps) == bb.num_layers and all(is_gated_mlp(m) for m in mlps)
        assert len(norms) >= 2 * bb.num_layers + 1  # two per layer (and q / k norms where any) and the final one
        assert lean_modules(tiny_backbones[fam].language_model)[0] == []  # float32 norms keep no wider copy
        recomputed = bb.decoder_layers[:1]
        skipped = lean_modules(bb.language_model, skip=recomputed)
        assert len(skipped[1]) == bb.num_layers - 1 and not set(map(id, norms[:2])) & set(map(id, skipped[0]))

    class Other(torch.nn.Module):  # a gated-looking MLP whose forward differs is left alone
        def __init__(self):
            super().__init__()
            self.gate_proj = self.up_proj = self.down_proj = torch.nn.Linear(2, 2)
            self.act_fn = torch.nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    assert not is_gated_mlp(Other())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lean_keeps_less_and_the_estimate_bounds_it(tiny_backbones, bf16_backbones, family, dtype):
    """Measured with saved-tensor hooks: lean keeps less (on bf16 the norms' float32 copies go
    too), and the budget's estimate bounds what autograd keeps, lean or not, within 1.5x."""
    bb = backbone(family, dtype, tiny_backbones, bf16_backbones)
    image = noise_image(200, 150, seed=4)
    plain = saved_bytes_per_token(bb, image, Q)
    with lean_activations(bb.language_model):
        lean = saved_bytes_per_token(bb, image, Q)
    assert untouched(bb)
    assert lean < (0.72 if dtype == "bfloat16" else 0.86) * plain, (lean, plain)
    for measured, estimate in (
        (plain, bb.activation_bytes_per_token()),
        (lean, bb.activation_bytes_per_token(lean=True)),
    ):
        assert measured <= estimate <= 1.5 * measured, (measured, estimate)


def test_lean_stays_off_where_weights_need_gradients(tiny_backbones):
    """The lean functions give no weight gradients, so with the weights requiring grad (the
    reference code's way, egg_eval.undone) they are not used and every weight gets its grad."""
    bb = tiny_backbones["llava15"]
    enc = bb.encode([noise_image(120, 90, seed=2)], Q)
    mlp = bb.decoder_layers[0].mlp
    with parameter_gradients(bb):
        leaves = bb.visual_leaves(enc)
        with torch.enable_grad():
            entropy(bb.next_token_logits(enc, leaves, lean=True)).backward()
        assert mlp.gate_proj.weight.grad is not None and float(mlp.gate_proj.weight.grad.abs().max()) > 0
    assert untouched(bb)


def test_memory_plan_tries_lean_before_recomputing_layers(bf16_backbones):
    """As it is where it fits; else lean with the fewest leading layers recomputed that fit;
    None where not even lean with all layers but the last recomputed fits."""
    bb = bf16_backbones["llava16"]
    t, n = 300, bb.num_layers
    plain, lean = bb.pass_activation_bytes(t, None), bb.pass_activation_bytes(t, None, lean=True)
    assert lean < 0.8 * plain
    one = bb.pass_activation_bytes(t, None, 1, lean=True)
    least = bb.pass_activation_bytes(t, None, n - 1, lean=True)
    assert bb.memory_plan(t, None, None) == MemoryPlan()
    assert bb.memory_plan(t, None, plain) == MemoryPlan()
    assert bb.memory_plan(t, None, plain - 1) == MemoryPlan(lean=True, recompute=0)
    assert bb.memory_plan(t, None, lean) == MemoryPlan(lean=True, recompute=0)
    assert bb.memory_plan(t, None, lean - 1) == MemoryPlan(lean=True, recompute=1)
    assert bb.memory_plan(t, None, one) == MemoryPlan(lean=True, recompute=1)
    assert bb.memory_plan(t, None, least - 1) is None


def test_a_batch_over_the_budget_that_fits_lean_stays_one_batch(bf16_backbones, family):
    """Lean costs some elementwise work again; splitting the batch would lose its one pass."""
    bb = bf16_backbones[family]
    views = [noise_image(120, 90, seed=1), noise_image(60, 80, seed=2)]
    padded = len(views) * max(bb.encode([v], Q)["input_ids"].shape[-1] for v in views)
    budget = bb.pass_activation_bytes(padded, None, lean=True)
    assert budget < bb.pass_activation_bytes(padded, None)
    bb.counters.__init__()
    free = token_saliency_batch(bb, views, Q)
    assert (bb.counters.n_backward, bb.counters.memory_limited, bb.counters.lean_passes) == (1, 0, 0)
    bb.counters.__init__()
    lean = token_saliency_batch(bb, views, Q, memory_budget=budget)
    assert (bb.counters.n_backward, bb.counters.memory_limited, bb.counters.lean_passes) == (1, 1, 1)
    assert bb.counters.recomputed_layers == 0
    for a, b in zip(free, lean, strict=True):
        np.testing.assert_array_equal(a.scores, b.scores)
    # one view alone just over its lean size: lean and one layer recomputed, the same map
    enc_len = bb.encode([views[0]], Q)["input_ids"].shape[-1]
    alone = token_saliency(bb, views[0], Q)
    bb.counters.__init__()
    tight = token_saliency(bb, views[0], Q, memory_budget=bb.pass_activation_bytes(enc_len, None, lean=True) - 1)
    assert (bb.counters.lean_passes, bb.counters.recomputed_layers) == (1, 1)
    np.testing.assert_array_equal(tight.scores, alone.scores)
    assert untouched(bb)


def test_the_default_budget_at_the_published_size_recomputes_less_with_lean():
    """``activation_check.py --plans`` (the published LLaVA-1.6 built on the meta device): a
    1,752-token crop that recomputed 11 of 32 layers under the default budget fits lean, and a
    2,340-token view recomputes 8 instead of 17."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "activation_check.py"
    out = subprocess.run(
        [sys.executable, str(script), "--plans", "--families", "llava16"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    rows = {line.split("|")[2].strip(): line for line in out.stdout.splitlines() if line.startswith("| llava16")}
    assert rows["1752"].endswith("| 5.64 | 8.03 | 5.43 | 11 -> 0 of 32 |"), rows
    assert rows["2340"].endswith("| 17 -> 8 of 32 |") and rows["1216"].endswith("| 0 -> 0 of 32 |"), rows


@pytest.mark.parametrize("budget", [None, 1e-6])
def test_lean_setting_changes_no_answer_nor_box(tiny_backbones, budget):
    """execution.lean_activations: auto (lean only where over the budget), true (every pass), false
    (never: over the budget only layers are recomputed). The same answer, rounds and boxes."""
    from egg_eval.grounding.refine import EggConfig, ExecutionConfig, run_egg

    bb = tiny_backbones["llava16"]
    img = noise_image(300, 170, seed=11)
    out = {}
    for lean in ("auto", True, False):
        ex = ExecutionConfig(activation_memory_gb=budget, lean_activations=lean)
        text, trace = run_egg(bb, img, "q", EggConfig(max_rounds=4), execution=ex)
        c = trace.counters
        out[lean] = (text, trace.final_views, [[g.box for g in r.selected] for r in trace.rounds])
        expected = {"auto": 0 if budget is None else c.n_backward, True: c.n_backward, False: 0}[lean]
        assert c.lean_passes == expected and c.n_backward > 0, (lean, c)
        if budget is not None:  # nothing fits: every layer but the last recomputed, lean or not
            assert c.recomputed_layers == c.n_backward * (bb.num_layers - 1)
    assert out["auto"] == out[True] == out[False]
    with pytest.raises(ValueError, match=r"execution\.lean_activations must be auto, true or false"):
        ExecutionConfig(lean_activations="sometimes")


def test_memory_plan_follows_the_lean_setting(bf16_backbones):
    bb = bf16_backbones["qwen25vl"]
    t = 200
    plain, lean = bb.pass_activation_bytes(t, None), bb.pass_activation_bytes(t, None, lean=True)
    assert bb.memory_plan(t, None, None, lean=True) == MemoryPlan(lean=True)
    assert bb.memory_plan(t, None, plain, lean=True) == MemoryPlan(lean=True)
    # without lean, the fewest layers recomputed that fit what lean fits as it is
    r = next(r for r in range(bb.num_layers) if bb.pass_activation_bytes(t, None, r) <= lean)
    assert r > 0 and bb.memory_plan(t, None, lean, lean=False) == MemoryPlan(recompute=r)
    assert bb.memory_plan(t, None, lean) == MemoryPlan(lean=True)


def test_an_instance_forward_set_before_is_put_back(tiny_backbones):
    """A hook that set a module's instance ``forward`` (as accelerate's do) keeps it after a
    lean or recomputed pass, and the pass ran through it: an MLP so wrapped is not made lean."""
    bb = tiny_backbones["llava15"]
    layer, mlp = bb.decoder_layers[0], bb.decoder_layers[1].mlp
    calls = []

    def hooked(module):
        stock = module.forward

        def forward(*a, **k):
            calls.append(module)
            return stock(*a, **k)

        module.forward = forward
        return forward

    hooks = {layer: hooked(layer), mlp: hooked(mlp)}
    try:
        enc = bb.encode([noise_image(120, 90, seed=2)], Q)
        leaves = bb.visual_leaves(enc)
        with torch.enable_grad():
            value = entropy(bb.next_token_logits(enc, leaves, lean=True, recompute_layers=1))
            torch.autograd.grad(value, leaves)
        assert calls.count(layer) == 2  # the forward and the recomputation of layer 0
        assert calls.count(mlp) == 1 and mlp not in lean_modules(bb.language_model)[1]
        assert all(vars(m)["forward"] is f for m, f in hooks.items())
    finally:
        for m in hooks:
            del m.forward
    assert untouched(bb)


def test_lean_per_head_norms_of_qwen3_are_bit_equal():
    """InternVL-3.5's language model (Qwen3; the tiny test model is a Qwen2) normalises q and k
    per head, on 4-d tensors: the lean norm gives the same output and gradient there too."""
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Model

    cfg = Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    model = Qwen3Model(cfg).to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():  # norms' weights away from 1, so a wrong weight shows
            p.add_(0.1 * torch.randn_like(p))
    norms, mlps = lean_modules(model)
    assert sum(type(n).__name__ == "Qwen3RMSNorm" for n in norms) == 4 * cfg.num_hidden_layers + 1
    assert len(mlps) == cfg.num_hidden_layers
    embeds = torch.randn(1, 9, 32).to(torch.bfloat16)
    out, saved = {}, {}
    weights = {p.data_ptr() for p in model.parameters()}
    for lean in (False, True):
        x = embeds.clone().requires_grad_()
        kept = {}

        def pack(t, kept=kept):
            if t.data_ptr() not in weights:
                kept[t.data_ptr()] = t.numel() * t.element_size()
            return t

        with torch.enable_grad(), lean_activations(model, lean):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                h = model(inputs_embeds=x).last_hidden_state
            out[lean] = (h.detach(), torch.autograd.grad(h.float().pow(2).sum(), x)[0])
        saved[lean] = sum(kept.values())
    assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
    assert saved[True] < 0.8 * saved[False], saved  # lean was in force
    assert all("forward" not in vars(m) for m in model.modules())
