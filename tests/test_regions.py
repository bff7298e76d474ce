"""Region extraction on hand-made maps (Sec. 3.3, Eq. 5-8)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from egg_eval.backbones.layout import cell_boxes
from egg_eval.grounding.regions import (
    RegionParams,
    components,
    elbow_threshold,
    fit_box,
    spatial_entropy,
)
from egg_eval.types import Box

NOSMOOTH = RegionParams(sigma=0.0, max_aspect=3.0, min_size=0.0)


def grid(rows, cols, cell=10.0):
    return cell_boxes(rows, cols, cell, cell).reshape(rows, cols, 4)


def test_elbow_is_the_point_farthest_from_the_chord():
    # sorted: 0,0,0,0,0,0,1,10 ; chord from (0,0) to (7,10): gap is largest at x=6 (value 1)
    vals = np.array([0, 10, 0, 0, 1, 0, 0, 0], dtype=float)
    assert elbow_threshold(vals) == 1.0
    # the elbow does not depend on the scale of the values
    assert elbow_threshold(vals * 1e-7) == pytest.approx(1e-7)
    # a concave curve: farthest point lies above the chord
    assert elbow_threshold(np.array([0, 9, 9.5, 10.0])) == 9.0


@pytest.mark.parametrize(
    "vals", [np.zeros((4, 4)), np.full((4, 4), 3.0), np.array([[1.0, np.nan], [0, 0]]), np.array([[np.inf, 0], [0, 0]])]
)
def test_degenerate_maps_give_no_region(vals):
    comps, mask = components(vals, grid(*vals.shape), Box(0, 0, 40, 40), NOSMOOTH)
    assert comps == [] and mask is None
    assert spatial_entropy(mask) == math.inf


def test_components_scores_and_boxes():
    s = np.zeros((6, 8))
    s[1, 1], s[1, 2], s[2, 1] = 5.0, 4.0, 3.0  # blob A: sum 12, cells (1,1),(1,2),(2,1)
    s[4, 6] = 9.0  # blob B: single cell, sum 9
    comps, mask = components(s, grid(6, 8), Box(0, 0, 80, 60), NOSMOOTH)
    assert [c.score for c in comps] == [12.0, 9.0]
    assert [c.n_tokens for c in comps] == [3, 1]
    assert comps[0].box == Box(10, 10, 30, 30)
    assert comps[1].box == Box(60, 40, 70, 50)
    assert mask.sum() == 4  # the tied zero background is not part of the mask


def test_elbow_mask_on_a_continuous_map_drops_the_low_tail():
    rng = np.random.RandomState(0)
    s = rng.rand(6, 6) * 0.01
    s[2, 2], s[2, 3] = 1.0, 0.9
    comps, mask = components(s, grid(6, 6), Box(0, 0, 60, 60), NOSMOOTH)
    assert comps[0].box.contains(Box(20, 20, 40, 30)) and 1.9 <= comps[0].score <= 1.91
    assert mask.sum() <= 3  # the two peaks and at most the elbow point itself


def test_four_connectivity_splits_diagonal_neighbours():
    s = np.zeros((4, 4))
    s[0, 0] = s[1, 1] = 1.0
    four, _ = components(s, grid(4, 4), Box(0, 0, 40, 40), NOSMOOTH)
    eight, _ = components(s, grid(4, 4), Box(0, 0, 40, 40), RegionParams(sigma=0, min_size=0, connectivity=2))
    assert len(four) == 2 and len(eight) == 1


def test_scores_use_unsmoothed_values_but_mask_uses_smoothed():
    s = np.zeros((9, 9))
    s[4, 4] = 10.0
    comps, mask = components(s, grid(9, 9), Box(0, 0, 90, 90), RegionParams(sigma=1.5, min_size=0))
    assert len(comps) == 1
    assert comps[0].score == 10.0  # the sum of the raw map over the (wider) smoothed support
    assert comps[0].n_tokens > 1 and mask[4, 4]


def test_aspect_cap_widens_about_centre_and_clips():
    bounds = Box(0, 0, 200, 100)
    # 90 x 10 -> capped to 90 x 30 about the centre y=50
    assert fit_box(Box(50, 45, 140, 55), bounds, 3.0, 0) == Box(50, 35, 140, 65)
    # at the top edge: shifted inside, keeps its size
    assert fit_box(Box(50, 0, 140, 10), bounds, 3.0, 0) == Box(50, 0, 140, 30)
    # a tall sliver capped horizontally, then clipped to the view
    assert fit_box(Box(0, 0, 3, 100), bounds, 3.0, 0) == Box(0, 0, 34, 100)
    # minimum size
    assert fit_box(Box(100, 50, 102, 52), bounds, 3.0, 16) == Box(93, 43, 109, 59)
    # never larger than the view
    assert fit_box(Box(0, 0, 200, 1), bounds, 3.0, 0) == Box(0, 0, 200, 67)


def test_spatial_entropy_eq7_8():
    m = np.zeros((5, 5), bool)
    m[0, 0] = True
    assert spatial_entropy(m) == 0.0
    m[4, 4] = m[4, 3] = m[4, 2] = True  # sizes 1 and 3
    p = np.array([0.25, 0.75])
    assert spatial_entropy(m) == pytest.approx(-(p * np.log(p)).sum())
    m2 = np.zeros((5, 5), bool)
    m2[0, 0] = m2[0, 4] = m2[4, 0] = m2[4, 4] = True
    assert spatial_entropy(m2) == pytest.approx(math.log(4))
