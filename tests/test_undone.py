"""Each speed-up undone (``egg_eval.undone``, the bench's rows) changes how EGG runs, never
what it finds: the same answer, rounds and boxes, and the model as it was afterwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import noise_image

from egg_eval.grounding.engine import ViewGrounder
from egg_eval.grounding.refine import EggConfig, ExecutionConfig, run_egg
from egg_eval.grounding.saliency import token_saliency
from egg_eval.undone import eager_attention, full_precision, no_map_cache, parameter_gradients

CFG = EggConfig(max_rounds=4)
EX = ExecutionConfig(activation_memory_gb=None)


def boxes(trace):
    return [[(g.view, g.box) for g in r.selected] for r in trace.rounds]


def test_parameter_gradients_give_the_same_map_and_fill_every_weights_grad(tiny_backbones, family, monkeypatch):
    bb = tiny_backbones[family]
    img = noise_image(300, 170, seed=11)
    base = token_saliency(bb, img, "q")
    seen = []
    stock_backward = torch.Tensor.backward

    def spy(self, *a, **kw):  # what the parameters hold right after the reference-style backward
        stock_backward(self, *a, **kw)
        seen.append([p.grad is not None for p in bb.model.parameters()])

    monkeypatch.setattr(torch.Tensor, "backward", spy)
    with parameter_gradients(bb):
        g = token_saliency(bb, img, "q")
    np.testing.assert_allclose(g.scores, base.scores, rtol=1e-4, atol=1e-7)
    has_grad = dict(zip([id(p) for p in bb.model.parameters()], seen[0]))
    assert len(seen) == 1
    # every decoder layer's weights got a .grad (the tower's layers after the one LLaVA reads,
    # its penultimate, do not take part), and the vision tower was inside the graph
    assert all(has_grad[id(p)] for layer in bb.decoder_layers for p in layer.parameters())
    tower = bb.model.model.vision_tower if family != "qwen25vl" else bb.model.model.visual
    assert sum(has_grad[id(p)] for p in tower.parameters()) > len(list(tower.parameters())) / 2
    # and afterwards the model is as it was: frozen, no .grad, the library's own gradients
    assert not any(p.requires_grad or p.grad is not None for p in bb.model.parameters())
    assert torch.autograd.grad is not None and "visual_leaves" not in vars(bb)


def test_each_step_undone_gives_the_same_answer_and_regions(tiny_backbones, family):
    bb = tiny_backbones[family]
    img = noise_image(300, 170, seed=11)
    text, trace = run_egg(bb, img, "q", CFG, execution=EX)
    for undo in (parameter_gradients(bb), eager_attention(bb), full_precision(bb)):
        with undo:
            text2, trace2 = run_egg(bb, img, "q", CFG, execution=EX)
        assert (text2, boxes(trace2), trace2.final_views) == (text, boxes(trace), trace.final_views), undo
        assert (trace2.counters.n_forward, trace2.counters.n_backward) == (
            trace.counters.n_forward,
            trace.counters.n_backward,
        )
    assert bb.model.config._attn_implementation == "sdpa"
    assert run_egg(bb, img, "q", CFG, execution=EX)[0] == text


def test_without_the_map_cache_every_round_grounds_the_whole_image_again(tiny_backbones, monkeypatch):
    bb = tiny_backbones["llava15"]
    img = noise_image(300, 170, seed=11)
    stored = []
    stock_store = ViewGrounder._store
    monkeypatch.setattr(ViewGrounder, "_store", lambda self, box, g: stored.append(box) or stock_store(self, box, g))
    text, trace = run_egg(bb, img, "q", CFG, execution=EX)
    cached, stored[:] = list(stored), []
    with no_map_cache():
        text2, trace2 = run_egg(bb, img, "q", CFG, execution=EX)
    assert (text2, boxes(trace2), trace2.final_views) == (text, boxes(trace), trace.final_views)
    rounds = len(trace.rounds)
    assert rounds >= 2 and len(cached) == len(set(cached))  # with the cache: each view grounded once
    # without: every round grounds each of its views, the whole image included
    assert stored == [v for r in trace.rounds for v in r.views] and len(stored) == len(cached) + rounds - 1
    assert (trace.counters.n_grounded, trace2.counters.n_grounded) == (len(cached), len(stored))
    assert trace2.counters.prefix_tokens == trace.counters.prefix_tokens > 0  # the answer still continues the cache
    assert ViewGrounder.reground is False  # back to the cache after the row


def test_full_precision_restores_each_tensors_own_dtype(tiny_paths):
    from egg_eval.backbones import load_backbone

    bb = load_backbone("qwen25vl", tiny_paths["qwen25vl"], dtype="bfloat16", device="cpu", max_new_tokens=2)
    before = {n: (t.dtype, t.clone()) for n, t in [*bb.model.named_parameters(), *bb.model.named_buffers()]}
    assert bb.dtype == torch.bfloat16
    with full_precision(bb):
        assert bb.dtype == torch.float32
        assert all(t.dtype == torch.float32 for t in bb.model.parameters())
    after = dict([*bb.model.named_parameters(), *bb.model.named_buffers()])
    for n, (dtype, value) in before.items():
        assert after[n].dtype == dtype and torch.equal(after[n], value), n


@pytest.mark.parametrize("family", ["llava15", "qwen25vl"])
def test_eager_attention_is_eager_inside_and_sdpa_after(tiny_backbones, family):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention

    from egg_eval.backbones.qwen2_5_vl import GroupedWindowAttention

    bb = tiny_backbones[family]
    kinds = lambda: {type(m) for m in bb.model.modules() if isinstance(m, Qwen2_5_VLVisionAttention)}  # noqa: E731
    grouped = kinds()
    with eager_attention(bb):
        assert bb.model.config._attn_implementation == "eager"
        assert GroupedWindowAttention not in kinds()
    assert bb.model.config._attn_implementation == "sdpa" and kinds() == grouped
    assert (GroupedWindowAttention in grouped) == (family == "qwen25vl")
