"""Mapping proof: with the vision tower made local (attention output projections zeroed),
a small square changed in the image changes exactly the visual tokens whose boxes cover
it. A wrong layout (ignored crop, padding, tile order, merge or shuffle order) fails by
whole tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import noise_image
from PIL import ImageDraw

from egg_eval.backbones import BACKBONES
from egg_eval.backbones.tiny import tiny_model_and_processor

SIZES = [(300, 170), (170, 300), (240, 240), (420, 130)]


def make_local(model: torch.nn.Module) -> None:
    vision = model.model.visual if hasattr(model.model, "visual") else model.model.vision_tower
    zeroed = 0
    for name, mod in vision.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if (
            isinstance(mod, torch.nn.Linear)
            and leaf in {"out_proj", "proj", "projection_layer", "o_proj"}
            and ("attn" in name or "attention" in name)
        ):
            with torch.no_grad():
                mod.weight.zero_()
                if mod.bias is not None:
                    mod.bias.zero_()
            zeroed += 1
    assert zeroed >= 2


def features(bb, image) -> np.ndarray:
    enc = bb.encode([image], "What is here?")
    with torch.no_grad():
        feats = bb._image_features(enc)
    return torch.cat([f.reshape(-1, f.shape[-1]) for f in feats]).numpy(), enc


def intersects(boxes: np.ndarray, sq: tuple[float, float, float, float]) -> np.ndarray:
    x0, y0, x1, y1 = sq
    ok = ~np.isnan(boxes[:, 0])
    b = np.nan_to_num(boxes)
    return ok & (b[:, 0] < x1) & (b[:, 2] > x0) & (b[:, 1] < y1) & (b[:, 3] > y0)


def contains(boxes: np.ndarray, sq) -> np.ndarray:
    x0, y0, x1, y1 = sq
    ok = ~np.isnan(boxes[:, 0])
    b = np.nan_to_num(boxes)
    return ok & (b[:, 0] <= x0) & (b[:, 2] >= x1) & (b[:, 1] <= y0) & (b[:, 3] >= y1)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_changed_square_changes_exactly_the_covering_tokens(family, size):
    model, proc = tiny_model_and_processor(family, seed=1)
    make_local(model)
    bb = BACKBONES[family](model, proc)
    w, h = size
    img = noise_image(w, h, seed=3)
    base, enc = features(bb, img)
    layout = bb.token_layout(enc, 0, img.size)
    boxes = layout.token_boxes()
    assert base.shape[0] == layout.n_tokens
    # every token box lies inside the image
    finite = boxes[~np.isnan(boxes[:, 0])]
    assert (finite[:, :2] >= 0).all() and (finite[:, 2] <= w).all() and (finite[:, 3] <= h).all()

    rng = np.random.RandomState(0)
    cells = [tuple(rng.randint(0, n) for n in layout.shape) for _ in range(4)]
    centres = [tuple(layout.grid_boxes[c][:2] / 2 + layout.grid_boxes[c][2:] / 2) for c in cells]
    centres += [(2, 2), (w - 3, h - 3)]  # corners: centre-crop margins and padding live here
    side = np.nanmin(boxes[:, 2] - boxes[:, 0])
    margin = 0.3 * side  # resampling spill, in image pixels
    for cx, cy in centres:
        sq = (int(cx) - 1, int(cy) - 1, int(cx) + 1, int(cy) + 1)
        changed_img = img.copy()
        ImageDraw.Draw(changed_img).rectangle([sq[0], sq[1], sq[2] - 1, sq[3] - 1], fill=(255, 255, 255))
        new, _ = features(bb, changed_img)
        diff = np.abs(new - base).max(axis=1)
        changed = set(np.flatnonzero(diff > 1e-6 * np.abs(base).max()))
        must = set(np.flatnonzero(contains(boxes, sq)))
        grown = (sq[0] - margin, sq[1] - margin, sq[2] + margin, sq[3] + margin)
        allowed = set(np.flatnonzero(intersects(boxes, grown)))
        assert must <= changed, f"{family} {size} square {sq}: tokens {sorted(must - changed)} should change"
        assert changed <= allowed, f"{family} {size} square {sq}: tokens {sorted(changed - allowed)} changed"


def test_llava15_centre_crop_margin_is_unseen():
    model, proc = tiny_model_and_processor("llava15", seed=1)
    make_local(model)
    bb = BACKBONES["llava15"](model, proc)
    img = noise_image(400, 100, seed=2)
    base, enc = features(bb, img)
    boxes = bb.token_layout(enc, 0, img.size).token_boxes()
    # shortest edge 100 -> 112, crop 112 of 448: the crop covers x in [150, 250)
    assert np.nanmin(boxes[:, 0]) == pytest.approx(150, abs=0.5)
    assert np.nanmax(boxes[:, 2]) == pytest.approx(250, abs=0.5)
    changed_img = img.copy()
    ImageDraw.Draw(changed_img).rectangle([10, 10, 40, 90], fill=(0, 0, 0))
    new, _ = features(bb, changed_img)
    assert np.array_equal(new, base)


def test_llava16_layout_counts_newlines_and_base():
    model, proc = tiny_model_and_processor("llava16")
    bb = BACKBONES["llava16"](model, proc)
    img = noise_image(300, 170)
    enc = bb.encode([img], "q")
    layout = bb.token_layout(enc, 0, img.size)
    rows, cols = layout.shape
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    assert layout.global_index.size == g * g
    assert layout.n_tokens == g * g + rows * (cols + 1)  # one newline per row
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == layout.n_tokens


def test_llava16_extreme_aspect_falls_back_to_the_base_view():
    """A 200x9 strip: unpadding cuts the tiny model's high-res grid away entirely, so the map's
    grid is the base view (every token still placed, none dropped)."""
    model, proc = tiny_model_and_processor("llava16")
    bb = BACKBONES["llava16"](model, proc)
    img = noise_image(200, 9)
    enc = bb.encode([img], "q")
    layout = bb.token_layout(enc, 0, img.size)
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    assert layout.shape == (g, g) and layout.global_index.size == 0
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == layout.n_tokens
    assert layout.grid_boxes[..., 3].max() == 9  # clipped to the strip


def test_torch_pixel_arithmetic_gives_the_stock_processors_exact_pixels(tiny_backbones, family, tmp_path, monkeypatch):
    """The backbone's encodings rescale and normalize in torch; their pixel values equal, bit
    for bit, a stock processor's (same class and settings, numpy arithmetic) on images of
    several sizes and modes, tiled ones included; a float input keeps its own dtype. The
    processor is left as it was, so it still saves."""
    from egg_eval.backbones import processors

    bb = tiny_backbones[family]
    calls = []
    monkeypatch.setattr(
        processors, "_normalize", lambda *a, _f=processors._normalize, **k: calls.append(1) or _f(*a, **k)
    )
    _, stock = tiny_model_and_processor(family)
    img = noise_image(420, 130, seed=2)
    images = [img, noise_image(37, 141, seed=3), img.convert("L"), img.convert("RGBA"), img.crop((0, 0, 107, 80))]
    for im in images:
        got = bb.encode([im], "q")
        want = stock(images=[im], text=bb.prompt(1, "q"), return_tensors="pt")
        assert set(want) <= set(got)
        for k in want:
            assert torch.equal(got[k], want[k]), (im.size, im.mode, k)
    assert calls  # the torch path ran
    assert "rescale" not in vars(bb.processor.image_processor)
    bb.processor.save_pretrained(tmp_path)
    x = np.random.default_rng(0).random((3, 5, 4)).astype(np.float64)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.6, 0.7]
    ip = stock.image_processor
    assert np.array_equal(processors._normalize(x, mean, std), type(ip).normalize(ip, x, mean, std))
    assert processors._normalize(x, 0.5, 0.5).dtype == np.float64
    with pytest.raises(ValueError, match="mean must have 3"):
        processors._normalize(x, [0.1, 0.2], std)


@pytest.mark.parametrize("family", ["llava16", "internvl35"])
def test_global_tokens_fold_into_the_grid_by_overlap_area(family):
    """The base view / thumbnail folded into the grid: every global token's score spread over
    the cells it overlaps in proportion to the area, its mass kept. The lattice fold (two small
    products) equals the fold over every token-cell pair, and a layout whose global boxes are
    no lattice takes the pairwise fold."""
    from egg_eval.backbones.layout import TokenLayout

    model, proc = tiny_model_and_processor(family)
    bb = BACKBONES[family](model, proc)
    rng = np.random.default_rng(0)
    for w, h in [*SIZES, (90, 200), (640, 480)]:
        img = noise_image(w, h)
        layout = bb.token_layout(bb.encode([img], "q"), 0, img.size)
        assert layout.global_index.size
        scores = rng.random(layout.n_tokens)
        g = scores[layout.global_index]
        lattice, pairs = layout._fold_lattice(g), layout._fold_pairs(g)
        assert lattice is not None
        np.testing.assert_allclose(lattice, pairs, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layout.to_map(scores), scores[layout.grid] + pairs, rtol=1e-12)
        assert lattice.sum() == pytest.approx(g.sum(), rel=1e-12)  # these views' grids cover every global token
    # by hand: one global token over two of four cells, 3:1 by area; its score 8 -> 6 and 2
    grid_boxes = np.array([[[0, 0, 3, 1], [3, 0, 4, 1]], [[0, 1, 3, 2], [3, 1, 4, 2]]], dtype=float)
    one = TokenLayout(np.arange(4).reshape(2, 2), grid_boxes, np.array([4]), np.array([[0, 0, 4, 1.0]]), 5)
    np.testing.assert_array_equal(one.to_map(np.array([0, 0, 0, 0, 8.0])), [[6, 2], [0, 0]])
    # two global boxes in one row but of other heights: no lattice, the pairwise fold decides
    odd = TokenLayout(
        np.arange(4).reshape(2, 2), grid_boxes, np.array([4, 5]), np.array([[0, 0, 2, 2], [2, 0, 4, 1.0]]), 6
    )
    assert odd._fold_lattice(np.ones(2)) is None
    # the 2x2 one halves over cells (0, 0) and (1, 0), the 2x1 one over (0, 0) and (0, 1)
    np.testing.assert_array_equal(odd.to_map(np.array([0, 0, 0, 0, 4.0, 4.0])), [[4, 2], [2, 0]])
