"""Saliency equals an independent autograd computation through ``inputs_embeds``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import noise_image

from egg_eval.backbones.hooks import capture_layer_output
from egg_eval.backbones.memory import MemoryPlan
from egg_eval.grounding.saliency import entropy, entropy_top_p, max_prob, saved_bytes_per_token, token_saliency

Q = "What is the digit in the red square?"


def reference_scores(bb, image, *, layer=None, objective=entropy, token_index=1):
    """Splice the visual features into inputs_embeds by hand and differentiate there."""
    model = bb.model
    enc = bb.encode([image], Q)
    with torch.no_grad():
        feats = bb._image_features(enc)
    ids = enc["input_ids"]
    mask = ids == model.config.image_token_id
    v = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats]).detach().requires_grad_(True)

    def logits_for(ids, v, layer):
        emb = model.get_input_embeddings()(ids)
        m = ids == model.config.image_token_id
        emb = emb.masked_scatter(m[..., None].expand_as(emb), v)
        out = model(inputs_embeds=emb, attention_mask=torch.ones_like(ids), output_hidden_states=True)
        if layer is None:
            return out.logits[0, -1]
        h = out.hidden_states[layer][:, -1]  # output of decoder layer `layer`
        return model.lm_head(model.model.language_model.norm(h))[0]

    for _ in range(token_index - 1):  # greedy unroll
        with torch.no_grad():
            nxt = logits_for(ids, v.detach(), None).argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    assert int(mask.sum()) == v.shape[0]
    value = objective(logits_for(ids, v, layer).float())
    (g,) = torch.autograd.grad(value, v)
    return g.norm(dim=-1).numpy()


@pytest.mark.parametrize("fam", ["llava15", "internvl35"])
def test_saliency_matches_inputs_embeds_autograd(tiny_backbones, fam):
    bb = tiny_backbones[fam]
    img = noise_image(200, 130, seed=5)
    ours = token_saliency(bb, img, Q).scores
    ref = reference_scores(bb, img)
    assert ref.std() > 0
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize(
    ("setting", "seed"),
    [({"layer": 1}, 6), ({"token_index": 2}, 7)],
    ids=["logit_lens_layer1", "token_index2_greedy_unroll"],
)
def test_layer_and_token_index_match_reference(tiny_backbones, setting, seed):
    bb = tiny_backbones["llava15"]
    img = noise_image(150, 200, seed=seed)
    ours = token_saliency(bb, img, Q, **setting).scores
    ref = reference_scores(bb, img, **setting)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-9)
    assert not np.allclose(ours, token_saliency(bb, img, Q).scores)  # differs from the default map


def test_objectives_by_hand():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    h = -sum(p * math.log(p) for p in [0.5, 0.3, 0.15, 0.05])
    assert float(entropy(logits)) == pytest.approx(h, rel=1e-6)
    # nucleus at 0.9: {0.5, 0.3, 0.15} (0.95 >= 0.9); the full distribution's terms, not renormalised
    q = np.array([0.5, 0.3, 0.15])
    assert float(entropy_top_p(logits, 0.9)) == pytest.approx(-(q * np.log(q)).sum(), rel=1e-6)
    # nucleus at 0.5: the top token alone -> its own term -0.5 log 0.5, not 0
    assert float(entropy_top_p(logits, 0.5)) == pytest.approx(-0.5 * math.log(0.5), rel=1e-6)
    assert float(max_prob(logits)) == pytest.approx(math.log(0.5), rel=1e-6)


def test_a_confident_sample_still_gets_an_entropy_top_p_map(tiny_backbones):
    """A top-1 probability >= 0.9 makes the nucleus one token: renormalised, its entropy would be
    0 with a zero gradient (no map, the plain model's answer); the reference's sum keeps a map."""
    bb = tiny_backbones["llava15"]
    img = noise_image(150, 120, seed=3)
    boost = torch.zeros(bb.model.lm_head.out_features)

    def raise_one_token(module, args, out):  # a constant on one logit: the map's gradient is the model's
        return out + boost.to(out.dtype)

    handle = bb.model.lm_head.register_forward_hook(raise_one_token)
    try:
        for c in range(0, 40):  # token 7's logit raised until it holds 90-99% of the mass
            boost[7] = float(c)
            g = token_saliency(bb, img, Q, objective="entropy_top_p")
            if 0.9 <= g.first_token_max_prob < 0.99:
                break
    finally:
        handle.remove()
    assert 0.9 <= g.first_token_max_prob < 0.99
    assert np.isfinite(g.scores).all() and g.scores.max() > 0
    # the objective is the one token's own term, -p log p
    p = g.first_token_max_prob
    assert g.objective_value == pytest.approx(-p * math.log(p), rel=1e-4)


def test_objectives_give_different_maps_and_no_parameter_grads(tiny_backbones, family):
    bb = tiny_backbones[family]
    img = noise_image(180, 120, seed=8)
    maps = {o: token_saliency(bb, img, Q, objective=o).scores for o in ("entropy", "entropy_top_p", "max_prob")}
    for s in maps.values():
        assert np.isfinite(s).all() and s.max() > 0
    assert not np.allclose(maps["entropy"], maps["max_prob"])
    assert all(p.grad is None and not p.requires_grad for p in bb.model.parameters())


def test_no_hook_left_after_success_or_exception(tiny_backbones):
    bb = tiny_backbones["qwen25vl"]
    img = noise_image(120, 90)
    layers = bb.decoder_layers

    def n_hooks():
        return sum(len(m._forward_hooks) for m in bb.model.modules())

    before = n_hooks()
    token_saliency(bb, img, Q, layer=1)
    assert n_hooks() == before
    with pytest.raises(RuntimeError, match="boom"), capture_layer_output(layers[0]):
        raise RuntimeError("boom")
    assert n_hooks() == before
    with pytest.raises(ValueError, match="layer must be"):
        token_saliency(bb, img, Q, layer=99)
    assert n_hooks() == before


def test_bad_arguments_are_clear(tiny_backbones):
    bb = tiny_backbones["llava15"]
    img = noise_image(64, 64)
    with pytest.raises(ValueError, match="unknown objective"):
        token_saliency(bb, img, Q, objective="kl")
    with pytest.raises(ValueError, match="counts from 1"):
        token_saliency(bb, img, Q, token_index=0)


@pytest.mark.parametrize("layer", [None, 1])
def test_batched_grounding_equals_one_pass_per_view(tiny_backbones, family, layer):
    """Views of different sizes (different token counts on LLaVA-1.6, Qwen2.5-VL and
    InternVL) grounded in one right-padded pass give each view its own map."""
    from egg_eval.grounding.saliency import token_saliency_batch

    bb = tiny_backbones[family]
    assert bb.batch_grounding
    views = [noise_image(120, 90, seed=1), noise_image(60, 80, seed=2), noise_image(200, 200, seed=3)]
    bb.counters.__init__()
    batched = token_saliency_batch(bb, views, "What is it?", layer=layer)
    assert (bb.counters.n_forward, bb.counters.n_backward) == (1, 1)  # one pass for all three views
    for img, g in zip(views, batched):
        one = token_saliency(bb, img, "What is it?", layer=layer)
        assert g.scores.shape == one.scores.shape
        np.testing.assert_allclose(g.scores, one.scores, rtol=1e-4, atol=1e-5 * one.scores.max())
        assert g.objective_value == pytest.approx(one.objective_value, rel=1e-5)
        assert g.first_token_max_prob == pytest.approx(one.first_token_max_prob, rel=1e-5)
        np.testing.assert_array_equal(g.layout.grid_boxes, one.layout.grid_boxes)
        assert len(g.features) == len(one.features)
        for a, b in zip(g.features, one.features):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("sizes", [[(120, 90), (120, 90)], [(120, 90), (60, 80), (200, 200), (400, 90)]])
def test_batched_grounding_runs_the_vision_tower_once(tiny_backbones, family, monkeypatch, sizes):
    """Equal-sized views, and views whose sizes (tiles, patches, grids) differ, are embedded
    by one vision-tower call, and each still gets its own map."""
    from egg_eval.grounding.saliency import token_saliency_batch

    bb = tiny_backbones[family]
    views = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    alone = [token_saliency(bb, im, "What is it?") for im in views]
    calls = []
    real = bb._image_features
    monkeypatch.setattr(bb, "_image_features", lambda enc: calls.append(1) or real(enc))
    batched = token_saliency_batch(bb, views, "What is it?")
    assert len(calls) == 1
    for g, one in zip(batched, alone):
        np.testing.assert_allclose(g.scores, one.scores, rtol=1e-4, atol=1e-5 * one.scores.max())
        for a, b in zip(g.features, one.features, strict=True):
            torch.testing.assert_close(a, b)


def test_qwen_window_attention_is_batched_per_window_length_and_equals_the_stock_module(tiny_backbones, monkeypatch):
    """Qwen2.5-VL's vision tower under SDPA: the windows of one length go through one SDPA
    call (the stock module calls it once per window), giving the stock module's embeddings,
    for one tower call over images whose windows have several lengths."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention

    from egg_eval.backbones.qwen2_5_vl import GroupedWindowAttention, group_vision_windows

    bb = tiny_backbones["qwen25vl"]
    attn = [blk.attn for blk in bb.model.model.visual.blocks]
    assert all(type(a) is GroupedWindowAttention for a in attn)  # as loaded through from_pretrained
    sizes = [(150, 100), (224, 224), (300, 60), (120, 90)]
    enc = bb.image_inputs([bb.encode([noise_image(w, h, seed=i)], "q") for i, (w, h) in enumerate(sizes)])
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    with torch.no_grad():
        grouped = bb._image_features(enc)
        n_grouped, calls[:] = len(calls), []
        try:
            assert group_vision_windows(bb.model, False) == len(attn)
            assert all(type(a) is Qwen2_5_VLVisionAttention for a in attn)
            stock = bb._image_features(enc)
        finally:
            group_vision_windows(bb.model, True)
    n_stock = len(calls)
    vc = bb.model.config.vision_config
    side = vc.window_size // vc.patch_size // vc.spatial_merge_size  # merged tokens per window side
    grids = [(int(h) // 2, int(w) // 2) for _, h, w in enc["image_grid_thw"]]
    windows = sum(-(-h // side) * -(-w // side) for h, w in grids)
    n_full = len(vc.fullatt_block_indexes)
    assert n_stock == (vc.depth - n_full) * windows + n_full * len(grids)  # one call per window / image
    assert n_grouped < n_stock / 2
    for a, b in zip(grouped, stock, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_views_of_different_lengths_are_right_padded_with_their_last_token(tiny_backbones):
    bb = tiny_backbones["qwen25vl"]  # token count follows the view's size
    encs = [bb.encode([noise_image(w, h)], "What is it?") for w, h in [(60, 80), (200, 200)]]
    n = [e["input_ids"].shape[1] for e in encs]
    assert n[0] < n[1]
    stacked, last = bb.stack_lm_inputs(encs)
    assert last.tolist() == [n[0] - 1, n[1] - 1]
    ids = stacked["input_ids"]
    assert ids.shape == (2, n[1])
    assert torch.equal(ids[0, : n[0]], encs[0]["input_ids"][0])
    assert (ids[0, n[0] :] == encs[0]["input_ids"][0, -1]).all()  # a text token, never an image token
    assert stacked["mm_token_type_ids"][0, n[0] :].eq(0).all()
    assert torch.equal(stacked["image_grid_thw"], torch.cat([e["image_grid_thw"] for e in encs]))


def test_batched_grounding_falls_back_to_one_pass_per_view_for_later_tokens(tiny_backbones):
    from egg_eval.grounding.saliency import token_saliency_batch

    bb = tiny_backbones["qwen25vl"]
    views = [noise_image(120, 90, seed=1), noise_image(60, 80, seed=2)]
    bb.counters.__init__()
    out = token_saliency_batch(bb, views, "What is it?", token_index=2)  # greedy unroll per view
    assert bb.counters.n_backward == 2 and len(out) == 2
    np.testing.assert_allclose(
        out[1].scores, token_saliency(bb, views[1], "What is it?", token_index=2).scores, rtol=1e-5
    )


@pytest.mark.parametrize("layer", [None, 1])
def test_recomputing_layers_in_the_backward_gives_the_same_map(tiny_backbones, family, layer):
    """execution.checkpoint_layers trades memory for a second forward; the map must not change,
    and every decoder layer gets its own forward back afterwards."""
    bb = tiny_backbones[family]
    img = noise_image(150, 110, seed=5)
    plain = token_saliency(bb, img, "What is in the corner?", layer=layer)
    # True recomputes all layers but the last; under the logit lens at layer 1 that is none, so
    # there the one layer it runs is recomputed by count
    recomputed = token_saliency(bb, img, "What is in the corner?", layer=layer, recompute_layers=layer or True)
    np.testing.assert_allclose(recomputed.scores, plain.scores, rtol=1e-5, atol=1e-9)
    assert plain.scores.max() > 0
    assert all("forward" not in vars(m) for m in bb.decoder_layers)


def test_recomputed_layers_hold_fewer_saved_activations(tiny_backbones):
    """What the option is for: the autograd graph of a grounding pass saves less."""
    bb = tiny_backbones["llava15"]
    enc = bb.encode([noise_image(120, 90, seed=2)], "q")

    def saved_bytes(checkpoint: bool) -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        leaves = bb.visual_leaves(enc)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = bb.next_token_logits(enc, leaves, recompute_layers=checkpoint)
        assert logits.requires_grad
        return total

    assert saved_bytes(True) < 0.7 * saved_bytes(False)


def test_activation_estimate_bounds_what_autograd_keeps(tiny_backbones, family):
    """The budget's estimate must not undercount the tensors saved for the backward
    (else a pass it lets through can run out of memory), nor overcount them grossly (lean and
    bf16: tests/test_lean.py). The logit lens at layer 1 keeps one layer and what a pass keeps once."""
    bb = tiny_backbones[family]
    measured = saved_bytes_per_token(bb, noise_image(200, 150, seed=4), "What is written on the sign?")
    estimate = bb.activation_bytes_per_token()
    assert measured <= estimate <= 1.5 * measured, (measured, estimate)
    per_layer, once = bb._saved_elements(lean=False)
    assert bb.activation_bytes_per_token(layer=1) == int(1.1 * (per_layer + once) * 4)
    assert estimate == int(1.1 * (bb.num_layers * per_layer + once) * 4)


def test_memory_budget_splits_a_batch_then_goes_lean_then_recomputes_layers(tiny_backbones, family, monkeypatch):
    """Over the budget, a batch is grounded one view at a time (where it does not fit lean
    either); a view over it alone keeps lean activations, and recomputes the fewest leading
    layers that bring it within where that is not enough. The maps are the same in every case."""
    from egg_eval.grounding.saliency import token_saliency_batch

    bb = tiny_backbones[family]
    views = [noise_image(120, 90, seed=1), noise_image(60, 80, seed=2), noise_image(200, 200, seed=3)]
    q = "What is it?"
    lengths = [bb.encode([v], q)["input_ids"].shape[-1] for v in views]
    longest = max(lengths)
    bb.counters.__init__()
    free = token_saliency_batch(bb, views, q, memory_budget=bb.pass_activation_bytes(len(views) * longest))
    assert (bb.counters.n_backward, bb.counters.memory_limited) == (1, 0)  # exactly fits: one batch
    assert bb.counters.n_tower == 1
    bb.counters.__init__()
    split = token_saliency_batch(bb, views, q, memory_budget=bb.pass_activation_bytes(longest))
    assert (bb.counters.n_backward, bb.counters.memory_limited) == (3, 1)  # one pass per view, as they are
    assert (bb.counters.lean_passes, bb.counters.recomputed_layers) == (0, 0)
    # the tower keeps no graph and its memory is not the budget's: still one call for the round
    assert bb.counters.n_tower == 1
    results = [free, split]
    checkpointed, real = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: checkpointed.append(1) or real(*a, **k))
    for budget, recompute in (
        (bb.pass_activation_bytes(longest) - 1, 0),  # the longest view fits lean
        (bb.pass_activation_bytes(longest, lean=True) - 1, 1),  # ... lean with one layer recomputed
    ):
        bb.counters.__init__()
        checkpointed.clear()
        results.append(token_saliency_batch(bb, views, q, memory_budget=budget))
        plans = [bb.memory_plan(n, None, budget) for n in lengths]
        assert plans[lengths.index(longest)] == MemoryPlan(lean=True, recompute=recompute)
        assert (bb.counters.n_backward, bb.counters.n_tower) == (3, 1)
        assert bb.counters.memory_limited == 1 + sum(p != MemoryPlan() for p in plans)
        assert bb.counters.lean_passes == sum(p.lean for p in plans) >= lengths.count(longest)
        assert bb.counters.recomputed_layers == len(checkpointed) == sum(p.recompute for p in plans)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_allclose(b.scores, a.scores, rtol=1e-4, atol=1e-5 * a.scores.max())


def test_budget_plan_recomputes_the_fewest_layers_that_fit(tiny_backbones):
    """The plan's arithmetic: per token, the layers not recomputed hold their activations,
    the recomputed ones their input hidden state (plus one layer's activations while the
    backward recomputes it), besides what a pass keeps once; the fewest leading layers that
    fit are chosen, never the last."""
    bb = tiny_backbones["llava15"]
    n, t = bb.num_layers, 37
    hidden = bb.recomputed_bytes_per_token()
    for lean in (False, True):
        per_layer, once = bb._saved_elements(lean)
        assert hidden < 1.1 * per_layer * 4 / 5

        def want(held, r, per_layer=per_layer, once=once):
            return t * (int(1.1 * (held * per_layer + once) * 4) + r * hidden)

        assert bb.pass_activation_bytes(t, None, 0, lean) == want(n, 0) == t * bb.activation_bytes_per_token(lean=lean)
        assert bb.pass_activation_bytes(t, None, 1, lean) == want(n - 1, 1)
        assert bb.pass_activation_bytes(t, None, n, lean) == want(1, n)  # > all but one
    full, lean0, lean1 = (bb.pass_activation_bytes(t, None, r, lean) for r, lean in ((0, False), (0, True), (1, True)))
    assert bb.memory_plan(t, None, None) == MemoryPlan()
    assert bb.memory_plan(t, None, full) == MemoryPlan()
    assert bb.memory_plan(t, None, full - 1) == MemoryPlan(lean=True) == bb.memory_plan(t, None, lean0)
    assert bb.memory_plan(t, None, lean0 - 1) == MemoryPlan(lean=True, recompute=1) == bb.memory_plan(t, None, lean1)
    assert bb.memory_plan(t, None, lean1 - 1) is None  # n = 2: nothing holds less
    assert bb.memory_plan(t, 1, bb.pass_activation_bytes(t, 1, 0, True) - 1) is None  # logit lens, one layer


def test_recomputed_layers_keep_a_usable_prefix(tiny_backbones, family):
    """A whole-image pass with some (or all) layers recomputed still keeps its KV cache for the
    answer: the recomputation runs without the cache, so nothing is appended twice. The
    cache, the map and the answer continued from it equal those of a pass with none recomputed."""
    bb = tiny_backbones[family]
    img = noise_image(220, 160, seed=6)
    views = [img, img.crop((30, 20, 140, 110))]
    plain = token_saliency(bb, img, Q, keep_prefix=True)
    feats = [plain.features, token_saliency(bb, views[1], Q).features]
    enc = bb.encode_text(views, Q)
    p = bb.prefix_length(enc, feats, plain.prefix)
    assert p > 0
    with torch.no_grad():
        want = bb.model(**bb.inputs_with_features(enc, feats), use_cache=False).logits[0, p:]
    for recompute in (1, True):
        g = token_saliency(bb, img, Q, keep_prefix=True, recompute_layers=recompute)
        np.testing.assert_allclose(g.scores, plain.scores, rtol=1e-5, atol=1e-9)
        assert g.prefix.length == plain.prefix.length
        for a, b in zip(g.prefix.cache.layers, plain.prefix.cache.layers, strict=True):
            torch.testing.assert_close(a.keys, b.keys)
            torch.testing.assert_close(a.values, b.values)
        assert bb.prefix_length(enc, feats, g.prefix) == p
        with torch.no_grad():
            got = bb.model(**bb._forward_on_prefix(enc, feats, g.prefix, p), use_cache=True).logits[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert all("forward" not in vars(m) for m in bb.decoder_layers)


def test_deterministic_mode_runs_the_grounding_backward_strict(tiny_backbones, family, monkeypatch):
    """Under ``deterministic=true`` (deterministic mode with ``warn_only``) the grounding backward,
    one view or a batch, runs in PyTorch's strict mode, the only one in which the fused
    attention backwards take their deterministic variants; warn_only is back after it, also
    when the backward raises; without deterministic mode nothing changes. A hook on the
    leaves runs inside the backward and records the mode there."""
    from egg_eval.cli import set_deterministic
    from egg_eval.grounding.saliency import token_saliency_batch

    bb = tiny_backbones[family]
    views = [noise_image(120, 90, seed=1), noise_image(90, 120, seed=2)]
    seen = []
    real = bb.visual_leaves

    def leaves(enc):
        out = real(enc)
        for x in out:
            x.register_hook(lambda g: seen.append(_mode()))
        return out

    monkeypatch.setattr(bb, "visual_leaves", leaves)
    plain = token_saliency(bb, views[0], Q).scores
    assert seen and not any(on for on, _ in seen)  # default: deterministic mode off in the backward too
    try:
        set_deterministic(True)
        seen.clear()
        strict = token_saliency(bb, views[0], Q).scores
        token_saliency_batch(bb, views, Q)
        assert seen and seen == [(True, False)] * len(seen)  # every backward ran strict
        assert _mode() == (True, True)  # and the forward passes warn only
        np.testing.assert_array_equal(strict, plain)  # CPU kernels: the same map
        monkeypatch.setattr(torch.autograd, "grad", _raising_backward)
        with pytest.raises(RuntimeError, match="inside the backward"):
            token_saliency(bb, views[0], Q)
        assert _mode() == (True, True)
    finally:
        set_deterministic(False)


def _mode() -> tuple[bool, bool]:
    return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()


def _raising_backward(*args, **kwargs):
    assert _mode() == (True, False)
    raise RuntimeError("inside the backward")
