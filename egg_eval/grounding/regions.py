"""From a saliency map to ranked regions (paper Sec. 3.3, Eq. 5-6) and spatial entropy (Eq. 7-8).

Pure numpy / scipy / scikit-image; no model. A map lives on a view's token grid
(R, C) with a pixel box per cell (R, C, 4) in the view's pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter
from skimage.measure import label

from egg_eval.types import Box


@dataclass(frozen=True)
class RegionParams:
    """``sigma``: Gaussian smoothing on the token grid; ``top_k``: regions kept;
    ``max_aspect``: long/short side cap (the short side is widened about the centre);
    ``min_size``: minimum crop side in pixels; ``connectivity``: 1 = 4-connected, 2 = 8."""

    sigma: float = 1.5
    top_k: int = 2
    max_aspect: float = 3.0
    min_size: float = 16.0
    connectivity: int = 1


@dataclass(frozen=True)
class Component:
    """A connected component of one view's mask: its crop box (view pixels), Eq. 6 score, size."""

    box: Box
    score: float
    n_tokens: int


def smooth(values: np.ndarray, sigma: float) -> np.ndarray:
    return gaussian_filter(np.asarray(values, dtype=np.float64), sigma=sigma) if sigma > 0 else values.astype(float)


def elbow_threshold(values: np.ndarray) -> float | None:
    """Elbow of the ascending sorted values: the point farthest from the chord between the
    smallest and the largest value. Its value is the threshold tau of Eq. 5.

    The perpendicular distance to a fixed chord is the vertical gap times a constant, so
    the elbow does not depend on how values or indices are scaled. ``None`` for a flat or
    non-finite input (no threshold separates anything).
    """
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if v.size < 2 or not np.isfinite(v).all() or v[-1] - v[0] <= 0:
        return None
    x = np.arange(v.size)
    chord = v[0] + (v[-1] - v[0]) * x / (v.size - 1)
    return float(v[int(np.argmax(np.abs(chord - v)))])


def binary_mask(smoothed: np.ndarray) -> np.ndarray | None:
    """M_i = 1[s~_i >= tau] (Eq. 5), or ``None`` when the map is degenerate.

    When the elbow falls on the map's minimum (a background of exactly tied values, e.g.
    zeros), ``>=`` would select every cell; the background is then excluded (``>``).
    """
    tau = elbow_threshold(smoothed)
    if tau is None:
        return None
    return smoothed > tau if tau <= smoothed.min() else smoothed >= tau


def fit_box(box: Box, bounds: Box, max_aspect: float, min_size: float) -> Box:
    """Cap the aspect ratio by widening the short side about the centre, enforce a minimum
    side, then clip to ``bounds`` (the view) and round outwards to whole pixels."""
    cx, cy = box.center
    w, h = box.width, box.height
    if max_aspect and w > max_aspect * h:
        h = w / max_aspect
    elif max_aspect and h > max_aspect * w:
        w = h / max_aspect
    w = min(max(w, min_size), bounds.width)
    h = min(max(h, min_size), bounds.height)
    # shift (not shrink) a box that spills over an edge, so it keeps its size where it can
    x0 = min(max(cx - w / 2, bounds.x0), bounds.x1 - w)
    y0 = min(max(cy - h / 2, bounds.y0), bounds.y1 - h)
    out = Box(x0, y0, x0 + w, y0 + h).to_int().intersect(bounds.to_int())
    return out


def components(
    saliency: np.ndarray, cell_boxes: np.ndarray, bounds: Box, params: RegionParams
) -> tuple[list[Component], np.ndarray | None]:
    """All components of one view, best first, and the view's mask.

    ``saliency`` (R, C) unsmoothed map; ``cell_boxes`` (R, C, 4) view pixels; ``bounds``
    the view's own box in its pixels (0, 0, w, h). A flat, all-zero or non-finite map
    gives no component.
    """
    s = np.asarray(saliency, dtype=np.float64)
    if s.size == 0 or not np.isfinite(s).all():
        return [], None
    mask = binary_mask(smooth(s, params.sigma))
    if mask is None:
        return [], None
    labels = label(mask, connectivity=params.connectivity)
    out = []
    for k in range(1, int(labels.max()) + 1):
        cells = labels == k
        b = cell_boxes[cells]
        tight = Box(float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max()))
        score = float(s[cells].sum())  # Eq. 6: UNSMOOTHED saliency
        out.append(Component(fit_box(tight, bounds, params.max_aspect, params.min_size), score, int(cells.sum())))
    out.sort(key=lambda c: -c.score)
    return out, mask


def spatial_entropy(mask: np.ndarray | None, connectivity: int = 1) -> float:
    """H(M) = -sum_i P(C_i) log P(C_i), P(C_i) = |C_i| / sum_j |C_j| (Eq. 7-8).

    Lower = more concentrated. An empty or missing mask gives +inf (nothing to refine).
    The reference code instead weights components by their saliency mass and uses
    8-connectivity; we follow the paper's equations.
    """
    if mask is None or not mask.any():
        return math.inf
    labels = label(mask, connectivity=connectivity)
    sizes = np.bincount(labels.ravel())[1:].astype(np.float64)
    p = sizes[sizes > 0] / sizes.sum()
    return float(-(p * np.log(p)).sum()) + 0.0  # + 0.0: no "-0.0" for a single component
