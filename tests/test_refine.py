"""Alg. 1 and its stopping rules on scripted saliency sequences, then on the real tiny models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import noise_image

from egg_eval.backbones.layout import TokenLayout, cell_boxes
from egg_eval.grounding.engine import ViewGrounder
from egg_eval.grounding.refine import EggConfig, ExecutionConfig, answer_with_views, refine, run_egg, run_vanilla
from egg_eval.grounding.regions import RegionParams
from egg_eval.grounding.saliency import Grounding, token_saliency
from egg_eval.types import Box, Counters


class Loop:
    """Alg. 1 on an image with a given saliency function (scripted maps in place of a model's)."""

    def __init__(self, backbone, image, question, config, saliency_fn):
        self.ground = ViewGrounder(backbone, image, question, config, saliency_fn=saliency_fn)
        self.config = config

    def run(self):
        return refine(self.ground, self.config)


EXACT = RegionParams(sigma=0.0, top_k=2, min_size=0.0, max_aspect=3.0)
M4 = EggConfig(max_rounds=4)


def blobs(*specs) -> np.ndarray:
    """An 8x8 map with blobs given as (row, col, n_cells_horizontal, value_per_cell)."""
    m = np.zeros((8, 8))
    for r, c, n, v in specs:
        m[r, c : c + n] = v
    return m


class Script:
    """Returns scripted maps in call order; records the sizes of the views it was asked about."""

    def __init__(self, maps):
        self.maps, self.calls = list(maps), []

    def __call__(self, backbone, image, question, **kw):
        self.calls.append(image.size)
        m = self.maps.pop(0)
        w, h = image.size
        layout = TokenLayout(
            grid=np.arange(64).reshape(8, 8),
            grid_boxes=cell_boxes(8, 8, w / 8, h / 8).reshape(8, 8, 4),
            global_index=np.zeros(0, int),
            global_boxes=np.zeros((0, 4)),
            n_tokens=64,
        )
        return Grounding(m.ravel(), layout, m, 0.0, 0.0)


class FakeBackbone:
    def __init__(self, confidences=()):
        self.counters = Counters()
        self.conf = list(confidences)

    def first_token_max_prob(self, images, question):
        return self.conf.pop(0)


IMG = noise_image(160, 160)
TWO = blobs((1, 1, 2, 5.0), (6, 5, 2, 2.5))  # two components: scores 10 and 5, sizes 2 and 2 -> H = ln 2
ONE = blobs((3, 3, 2, 10.0))  # one component, score 20 -> H = 0


def refiner(maps, stopping="spatial_entropy", **kw):
    script = Script(maps)
    cfg = EggConfig(regions=EXACT, stopping=stopping, **kw)
    return Loop(FakeBackbone(kw.pop("conf", ())), IMG, "q", cfg, saliency_fn=script), script


def test_a_rise_of_the_spatial_entropy_is_named_so():
    # round 0: whole -> one blob (score 20, H = 0); round 1: its crop holds two blobs, the first
    # (score 30) above the whole image's: H_t = ln 2 > 0 -> a rise
    rising = blobs((1, 1, 2, 15.0), (6, 5, 2, 2.5))
    trace = refiner([ONE, rising])[0].run()
    assert [round(x.spatial_entropy, 6) for x in trace.rounds] == [0.0, round(math.log(2), 6)]
    assert trace.stop_reason == "entropy_rose"
    # round 0: H = ln 2; round 1: both crops' best blobs tie with the whole image's, which ranks
    # first: H_t = ln 2 again -> stopped as a tie, which is not a rise
    trace = refiner([TWO, TWO, TWO])[0].run()
    assert [round(x.spatial_entropy, 6) for x in trace.rounds] == [round(math.log(2), 6)] * 2
    assert trace.stop_reason == "entropy_tied"


def test_spatial_entropy_stops_when_entropy_no_longer_decreases():
    # round 0: whole -> H=ln2 ; round 1: crops A (one blob, score 20 -> top, H=0) and B ;
    # round 2: views = whole, crop of A, and A again (the whole image's best blob): A is
    # taken from the cache, still the top (20) with H=0 >= 0 -> stop, keep round 2's views
    r, script = refiner([TWO, ONE, TWO, TWO, TWO])
    trace = r.run()
    assert [round(x.spatial_entropy, 6) for x in trace.rounds] == [round(math.log(2), 6), 0.0, 0.0]
    assert trace.stop_reason == "entropy_tied"  # H_t == H_prev stops (Alg. 1: H_t >= H_prev), not a rise
    assert trace.final_views == trace.rounds[2].views  # Alg. 1 returns I_t
    assert trace.rounds[2].views[2] == trace.rounds[1].views[1]
    assert len(script.calls) == 4  # whole, A, B, crop of A: nothing grounded twice
    whole = Box(0, 0, 160, 160)
    assert trace.final_views[0] == whole and len(trace.final_views) == 3
    # round 1's best region came from crop A (view 1), and crops of crops stay inside their view
    best = trace.rounds[1].selected[0]
    assert best.view == 1 and trace.rounds[1].views[1].contains(best.box)
    assert trace.final_views[1] == best.box


def test_top_k_across_views_uses_eq6_scores():
    r, _ = refiner([TWO, ONE, TWO, TWO, TWO])
    trace = r.run()
    first = trace.rounds[0]
    assert [x.score for x in first.regions] == [10.0, 5.0]
    assert first.regions[0].box == Box(20, 20, 60, 40)  # cells (1,1)-(1,2) of 20 px, within aspect 3
    second = trace.rounds[1]
    assert [x.score for x in second.selected] == [20.0, 10.0]  # crop A's blob beats the whole image's
    assert [x.view for x in second.selected] == [1, 0]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_fixed_runs_exactly_n_rounds(n):
    r, _ = refiner([TWO] * 20, stopping="fixed", n_rounds=n)
    trace = r.run()
    assert len(trace.rounds) == n and trace.stop_reason == "fixed"
    assert trace.final_views == [Box(0, 0, 160, 160)] + [x.box for x in trace.rounds[-1].selected]


def test_confidence_stops_when_max_prob_falls_and_drops_those_crops():
    script = Script([TWO] * 20)
    cfg = EggConfig(regions=EXACT, stopping="confidence")
    trace = Loop(FakeBackbone([0.3, 0.5, 0.4]), IMG, "q", cfg, saliency_fn=script).run()
    assert trace.stop_reason == "confidence_fell"
    assert [x.confidence for x in trace.rounds] == [0.3, 0.5]
    assert trace.final_views == trace.rounds[1].views


def test_max_rounds_caps_every_rule():
    r, _ = refiner([TWO, ONE, TWO], max_rounds=2)
    trace = r.run()
    assert trace.stop_reason == "max_rounds" and len(trace.rounds) == 2
    assert trace.final_views == [Box(0, 0, 160, 160)] + [x.box for x in trace.rounds[1].selected]


def test_flat_map_stops_with_the_whole_image():
    r, _ = refiner([np.zeros((8, 8))])
    trace = r.run()
    assert trace.stop_reason == "no_region" and trace.final_views == [Box(0, 0, 160, 160)]
    assert math.isinf(trace.rounds[0].spatial_entropy)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown stopping rule"):
        EggConfig(stopping="sometimes")
    with pytest.raises(ValueError, match="unknown objective 'entropyy'"):  # at once, not on every sample
        EggConfig(objective="entropyy")
    with pytest.raises(ValueError, match="top_k"):
        EggConfig(regions=RegionParams(top_k=0))


@pytest.mark.parametrize("size", [(300, 170), (150, 260)])
def test_trace_on_real_tiny_models_stays_in_bounds(tiny_backbones, family, size):
    bb = tiny_backbones[family]
    img = noise_image(*size, seed=11)
    text, trace = run_egg(bb, img, "What is the digit in the red square?", EggConfig(max_rounds=4))
    assert isinstance(text, str)
    w, h = size
    whole = Box(0, 0, w, h)
    assert trace.rounds and trace.stop_reason in {"entropy_rose", "entropy_tied", "max_rounds", "no_region"}
    for rnd in trace.rounds:
        assert rnd.views[0] == whole
        for v in rnd.views:
            assert whole.contains(v) and v.area > 0
        for reg in rnd.regions:
            assert rnd.views[reg.view].contains(reg.box) and reg.box.area > 0 and reg.score > 0
    c = trace.counters
    # a view's map is never recomputed, and the new views of a round share one batched pass
    seen, passes = set(), 0
    for r in trace.rounds:
        new = {tuple(v.as_list()) for v in r.views} - seen
        passes += bool(new)
        seen |= new
    assert c.n_backward == passes
    assert c.n_forward >= c.n_backward + 1 and c.time_ground_s > 0 and c.time_answer_s > 0
    d = json.loads(json.dumps(trace.to_dict()))
    assert d["final_views"][0] == [0, 0, w, h]


def test_vanilla_answers_from_the_whole_image(tiny_backbones):
    bb = tiny_backbones["llava15"]
    img = noise_image(120, 90)
    text, trace = run_vanilla(bb, img, "q")
    assert trace.final_views == [Box(0, 0, 120, 90)] and trace.counters.n_backward == 0
    assert text == bb.answer([img], "q")


def test_a_trace_keeps_its_own_counters_after_the_next_sample(tiny_backbones):
    bb = tiny_backbones["llava15"]
    img = noise_image(120, 90)
    _, egg = run_egg(bb, img, "q", EggConfig(max_rounds=2))
    kept = (egg.counters.n_forward, egg.counters.n_backward, egg.counters.n_tower)
    assert egg.counters.n_backward > 0
    _, plain = run_vanilla(bb, img, "q")  # resets the backbone's counters
    assert (egg.counters.n_forward, egg.counters.n_backward, egg.counters.n_tower) == kept
    assert plain.counters.n_backward == 0 and plain.counters.n_tower == 1


def test_answer_reuses_grounding_features_exactly(tiny_backbones, family):
    """The answer pass takes each view's embeddings from its grounding pass (no second
    vision-tower pass) and gets the same logits as from the pixels."""
    bb = tiny_backbones[family]
    img = noise_image(200, 150, seed=3)
    views = [Box(0, 0, 200, 150), Box(20, 10, 120, 90)]
    crops = [img, img.crop((20, 10, 120, 90))]
    feats = [token_saliency(bb, c, "q").features for c in crops]
    enc = bb.encode(crops, "q")
    with torch.no_grad():
        ref = bb.model(**bb.model_inputs(enc), use_cache=False).logits
        calls = []
        hook = bb.model.model.get_image_features
        bb.model.model.get_image_features = lambda *a, **k: calls.append(1) or hook(*a, **k)
        try:
            got = bb.model(**bb.inputs_with_features(enc, feats), use_cache=False).logits
            text = answer_with_views(bb, img, "q", views, features=feats)
        finally:
            del bb.model.model.get_image_features
    assert not calls
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert text == answer_with_views(bb, img, "q", views)


def test_answer_on_reused_features_skips_the_pixel_processing(tiny_backbones, family):
    """Every family's token count per image follows from the image's size (fixed grid,
    anyres tiles, smart-resize grid, tiled canvas), so the answer pass on reused embeddings
    only expands the prompt (the processor's own ``replace_image_token``) and tokenizes:
    the same ids, mask and (Qwen) grid as the processor, and the image processor is never
    called. Sizes span wide, tall, tiny and odd shapes so tile counts and grids differ."""
    bb = tiny_backbones[family]
    img = noise_image(200, 150, seed=5)
    crops = [img, img.crop((20, 10, 120, 90)), img.crop((0, 0, 37, 141)), img.crop((0, 0, 200, 9))]
    fast = bb.encode_text(crops, "what is here?")
    full = bb.encode(crops, "what is here?")
    assert set(fast) == {k for k in full if k not in bb.vision_keys and not k.startswith("_")}
    for k, v in fast.items():
        assert torch.equal(v, full[k]), k
    feats = [token_saliency(bb, c, "q").features for c in crops]
    ref = bb.answer(crops, "q", features=feats)
    real, calls = bb.processor.image_processor, []

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, *a, **k):
            calls.append(1)
            return real(*a, **k)

    bb.processor.image_processor = Spy()
    try:
        assert bb.answer(crops, "q", features=feats) == ref == bb.answer(crops, "q")
        assert len(calls) == 1  # only the pixel path of the last call
    finally:
        bb.processor.image_processor = real


def test_answer_continues_the_whole_images_grounding_cache(tiny_backbones, family):
    """The whole image's grounding pass keeps its KV cache (same map as without); an answer
    prompt [whole, crop, question] then runs only its tokens after the whole image on that
    cache, with the logits, option losses and answers of the full prompt. A cache used
    once is cut back and stays usable."""
    bb = tiny_backbones[family]
    img = noise_image(200, 150, seed=3)
    crops = [img, img.crop((20, 10, 120, 90))]
    g = token_saliency(bb, img, "q", keep_prefix=True)
    assert np.array_equal(g.scores, token_saliency(bb, img, "q").scores)
    feats = [g.features, token_saliency(bb, crops[1], "q").features]
    enc = bb.encode_text(crops, "q")
    p = bb.prefix_length(enc, feats, g.prefix)
    n_whole, n_crop = (sum(t.numel() // t.shape[-1] for t in f) for f in feats)
    assert n_whole < p < enc["input_ids"].shape[1] - n_crop  # through the whole image, not the crop
    with torch.no_grad():
        ref = bb.model(**bb.inputs_with_features(enc, feats), use_cache=False).logits[0, p:]
        got = bb.model(**bb._forward_on_prefix(enc, feats, g.prefix, p), use_cache=True).logits[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    bb.counters.__init__()
    options = ["red square", "blue", "square red blue"]
    want = bb.option_losses(crops, "What is it?", options, features=feats)
    assert bb.counters.prefix_tokens == 0
    token_saliency(bb, crops[1], "another question")  # leaves no state (Qwen's rope offset) the next pass reads
    got = bb.option_losses(crops, "What is it?", options, features=feats, prefix=g.prefix)
    assert got == pytest.approx(want, rel=1e-5)
    assert bb.counters.prefix_tokens == p
    text = bb.answer(crops, "q", features=feats)
    assert bb.answer(crops, "q", features=feats, prefix=g.prefix) == text
    assert bb.answer(crops, "q", features=feats, prefix=g.prefix) == text  # after a use
    assert bb.counters.prefix_tokens == 3 * p and g.prefix.length == p


def test_answer_prefix_is_kept_only_where_it_is_the_prompts(tiny_backbones):
    """No cache from a logit-lens pass (it stops early), and none is used for a prompt
    without crops or whose first image is another. (A pass whose layers are recomputed keeps
    one: test_saliency.py::test_recomputed_layers_keep_a_usable_prefix.)"""
    bb = tiny_backbones["llava15"]
    img, other = noise_image(200, 150, seed=3), noise_image(200, 150, seed=4)
    assert token_saliency(bb, img, "q", keep_prefix=True, layer=1).prefix is None
    g = token_saliency(bb, img, "q", keep_prefix=True)
    assert token_saliency(bb, img, "q").prefix is None
    feats = [g.features, g.features]
    assert bb.prefix_length(bb.encode_text([img], "q"), feats[:1], g.prefix) == 0
    assert bb.prefix_length(bb.encode_text([img, other], "another question"), feats, g.prefix) > 0
    # the ids match through the image but the question differs at once after it
    p = bb.prefix_length(bb.encode_text([img, other], "q"), feats, g.prefix)
    assert p == bb.prefix_length(bb.encode_text([img, other], "another question"), feats, g.prefix)


# transformers 5.24 renamed the cache keyword to ``cache`` and warns on the old one, which
# 5.40 removes: a warning here means a call still passes ``past_key_values``
@pytest.mark.filterwarnings("error:.*past_key_values.*:FutureWarning")
@pytest.mark.parametrize("reuse_features", [True, False])
def test_run_egg_answer_on_the_prefix_changes_nothing_but_time(tiny_backbones, family, reuse_features):
    bb = tiny_backbones[family]
    img = noise_image(300, 170, seed=11)
    text, trace = run_egg(
        bb, img, "q", M4, execution=ExecutionConfig(reuse_features=reuse_features, reuse_prefix=False)
    )
    text2, trace2 = run_egg(bb, img, "q", M4, execution=ExecutionConfig(reuse_features=reuse_features))
    assert (text2, trace2.final_views) == (text, trace.final_views)
    assert len(trace.final_views) > 1 and trace.counters.prefix_tokens == 0
    assert (trace2.counters.prefix_tokens > 0) == reuse_features
    assert trace2.counters.n_forward == trace.counters.n_forward


def test_a_sliding_window_that_dropped_keys_answers_without_the_prefix(tiny_paths, tiny_backbones, tmp_path):
    """A Mistral checkpoint may set a sliding attention window; once the whole image's prompt
    fills it, its cache has dropped its oldest keys and cannot be cut back to the shared
    prefix (transformers raises). The answer then runs its whole prompt, as without
    reuse_prefix; a prompt within the window still reuses it."""
    import shutil

    from egg_eval.backbones import load_backbone

    path = tmp_path / "llava16_window"
    shutil.copytree(tiny_paths["llava16"], path)
    cfg = json.loads((path / "config.json").read_text())
    img = noise_image(300, 170, seed=11)
    n_tokens = tiny_backbones["llava16"].encode([img], "q")["input_ids"].shape[-1]
    for window, reused in ((n_tokens + 8, True), (n_tokens - 8, False)):
        cfg["text_config"]["sliding_window"] = window
        (path / "config.json").write_text(json.dumps(cfg))
        bb = load_backbone("llava16", str(path), device="cpu", max_new_tokens=4)
        text, trace = run_egg(bb, img, "q", M4, execution=ExecutionConfig(reuse_prefix=False))
        text2, trace2 = run_egg(bb, img, "q", EggConfig(max_rounds=4))
        assert (text2, trace2.final_views) == (text, trace.final_views) and len(trace.final_views) > 1
        assert (trace2.counters.prefix_tokens > 0) == reused, window


def test_run_egg_answers_from_cached_features(tiny_backbones, monkeypatch):
    bb = tiny_backbones["llava15"]
    img = noise_image(300, 170, seed=11)
    seen = {}
    real = answer_with_views

    def spy(backbone, image, question, views, features=None, prefix=None):
        seen["features"] = features
        return real(backbone, image, question, views, features=features)

    text, trace = run_egg(bb, img, "q", EggConfig(max_rounds=4), answer=spy)
    assert seen["features"] is not None and len(seen["features"]) == len(trace.final_views)
    assert text == real(bb, img, "q", trace.final_views)


def test_checkpoint_layers_changes_nothing_but_memory(tiny_backbones):
    bb = tiny_backbones["qwen25vl"]
    img = noise_image(300, 170, seed=11)
    text, trace = run_egg(bb, img, "q", EggConfig(max_rounds=4))
    text2, trace2 = run_egg(bb, img, "q", M4, execution=ExecutionConfig(checkpoint_layers=True))
    assert text2 == text and trace2.final_views == trace.final_views
    assert [[g.box for g in r.selected] for r in trace2.rounds] == [[g.box for g in r.selected] for r in trace.rounds]
    assert all("forward" not in vars(m) for m in bb.decoder_layers)  # nothing left patched after the run


def test_activation_memory_limit_changes_nothing_but_how_passes_are_run(tiny_backbones):
    from egg_eval.grounding.engine import activation_budget

    bb = tiny_backbones["llava16"]
    img = noise_image(300, 170, seed=11)
    assert activation_budget("auto", bb) is None  # no limit on CPU
    assert activation_budget(0.5, bb) == 0.5 * 2**30
    bb.counters.__init__()
    text, trace = run_egg(bb, img, "q", M4, execution=ExecutionConfig(activation_memory_gb=None))
    assert trace.counters.memory_limited == 0
    # a limit below any view: every pass recomputes its layers, every batch is split
    text2, trace2 = run_egg(bb, img, "q", M4, execution=ExecutionConfig(activation_memory_gb=1e-6))
    assert trace2.counters.memory_limited >= trace2.counters.n_backward > 0
    assert text2 == text and trace2.final_views == trace.final_views
    assert [[g.box for g in r.selected] for r in trace2.rounds] == [[g.box for g in r.selected] for r in trace.rounds]


@pytest.mark.parametrize("bad", [0, -1.0, "lots", True])
def test_activation_memory_setting_is_checked(bad):
    with pytest.raises(ValueError, match="activation_memory_gb"):
        ExecutionConfig(activation_memory_gb=bad)
