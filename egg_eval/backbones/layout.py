"""Where each visual token lies: the per-view token layout, its map on the view's grid, and
the grid helpers the adapters build their ``token_boxes`` from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from transformers.image_transforms import get_resize_output_image_size
from transformers.image_utils import ChannelDimension

# Token groups returned by ``token_boxes``.
PRIMARY = 0  # the fine grid the regions step works on
GLOBAL = 1  # a coarse view of the same pixels (LLaVA-NeXT base view, InternVL thumbnail)
NO_PLACE = -1  # a token with no place in the image (LLaVA-NeXT's image_newline)


@dataclass(frozen=True)
class TokenLayout:
    """Where the visual tokens of ONE image lie, in that image's (the view's) pixels.

    ``grid`` (R, C) holds, for each cell of the map's grid, the index of its token in the
    image's flattened token vector; ``grid_boxes`` (R, C, 4) the cell boxes.
    ``global_index`` (G,) / ``global_boxes`` (G, 4) are tokens of a coarse global view of
    the same pixels, folded into the grid by :meth:`to_map`. ``n_tokens`` counts all
    tokens, placeless ones included.
    """

    grid: np.ndarray
    grid_boxes: np.ndarray
    global_index: np.ndarray
    global_boxes: np.ndarray
    n_tokens: int

    @classmethod
    def from_token_boxes(cls, boxes: np.ndarray, groups: np.ndarray, image_size: tuple[int, int]) -> TokenLayout:
        """Build the grid from per-token boxes (N, 4) on a regular lattice and their groups (N,).

        Lattice rows/columns come from the distinct (unclipped) box corners; boxes are then
        clipped to the image, since padding and centre-crop margins hold no pixels.
        """
        boxes = np.asarray(boxes, dtype=np.float64)
        groups = np.asarray(groups)
        if not (groups == PRIMARY).any():  # the fine grid was cut away whole (LLaVA-NeXT's unpad of an
            groups = np.where(groups == GLOBAL, PRIMARY, groups)  # extreme aspect ratio): the coarse view is the grid
        prim = np.flatnonzero(groups == PRIMARY)
        if prim.size == 0:
            raise ValueError("layout has no primary tokens")
        y0 = np.round(boxes[prim, 1], 3)
        x0 = np.round(boxes[prim, 0], 3)
        ys, xs = np.unique(y0), np.unique(x0)
        rows, cols = np.searchsorted(ys, y0), np.searchsorted(xs, x0)
        grid = np.full((ys.size, xs.size), -1, dtype=np.int64)
        grid[rows, cols] = prim
        if (grid < 0).any() or ys.size * xs.size != prim.size:
            raise ValueError(f"primary tokens do not form a full grid ({prim.size} tokens, {ys.size}x{xs.size})")
        w, h = image_size
        lo, hi = np.array([0, 0, 0, 0.0]), np.array([w, h, w, h], dtype=np.float64)
        clipped = np.clip(boxes, lo, hi)
        glob = np.flatnonzero(groups == GLOBAL)
        return cls(
            grid=grid,
            grid_boxes=clipped[grid],
            global_index=glob,
            global_boxes=clipped[glob],
            n_tokens=int(boxes.shape[0]),
        )

    @property
    def shape(self) -> tuple[int, int]:
        return self.grid.shape  # type: ignore[return-value]

    def token_boxes(self) -> np.ndarray:
        """(n_tokens, 4) boxes in view pixels, NaN for tokens with no place."""
        out = np.full((self.n_tokens, 4), np.nan)
        out[self.grid.reshape(-1)] = self.grid_boxes.reshape(-1, 4)
        out[self.global_index] = self.global_boxes
        return out

    def to_map(self, scores: np.ndarray) -> np.ndarray:
        """Per-token scores (n_tokens,) -> one (R, C) map on the grid.

        Global-view tokens (LLaVA-NeXT's 24x24 base view, InternVL's thumbnail) see the
        same pixels as the grid at lower resolution. Each one's score is spread over the
        grid cells it overlaps in proportion to the overlap area, so the map keeps the
        total saliency mass (the component score of Eq. 6 is a sum) and a location is
        salient if either resolution found it relevant.
        """
        scores = np.asarray(scores, dtype=np.float64)
        out = scores[self.grid].copy()
        if self.global_index.size:
            folded = self._fold_lattice(scores[self.global_index])
            out += self._fold_pairs(scores[self.global_index]) if folded is None else folded
        return out

    def _fold_pairs(self, g_scores: np.ndarray) -> np.ndarray:
        """The global tokens' scores spread over the grid by overlap area, every token
        against every cell: (G, R*C) overlaps."""
        cells = self.grid_boxes.reshape(-1, 4)
        g = self.global_boxes
        iw = np.clip(
            np.minimum(g[:, None, 2], cells[None, :, 2]) - np.maximum(g[:, None, 0], cells[None, :, 0]), 0, None
        )
        ih = np.clip(
            np.minimum(g[:, None, 3], cells[None, :, 3]) - np.maximum(g[:, None, 1], cells[None, :, 1]), 0, None
        )
        overlap = iw * ih
        total = overlap.sum(axis=1, keepdims=True)
        weights = np.divide(overlap, total, out=np.zeros_like(overlap), where=total > 0)
        return (g_scores @ weights).reshape(self.grid.shape)

    def _fold_lattice(self, g_scores: np.ndarray) -> np.ndarray | None:
        """:meth:`_fold_pairs` where the global tokens and the grid cells each form a lattice
        (a box's x-extent set by its column, its y-extent by its row), as every adapter's do:
        an overlap area is then an x-overlap times a y-overlap, and the fold is two small
        matrix products, ``Wy.T @ S @ Wx`` instead of a comparison of every token with every cell.
        ``None`` where the boxes are not such a lattice."""
        g, cells = self.global_boxes, self.grid_boxes
        xs, col = np.unique(g[:, [0, 2]], axis=0, return_inverse=True)
        ys, row = np.unique(g[:, [1, 3]], axis=0, return_inverse=True)
        col, row = col.reshape(-1), row.reshape(-1)
        if xs.shape[0] * ys.shape[0] != g.shape[0] or np.unique(row * xs.shape[0] + col).size != g.shape[0]:
            return None
        cx, cy = cells[0, :, [0, 2]].T, cells[:, 0, [1, 3]]  # per column (C, 2), per row (R, 2)
        if not ((cells[..., [0, 2]] == cx).all() and (cells[..., [1, 3]] == cy[:, None]).all()):
            return None

        def spread(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # (n, m) overlaps, each row / its sum
            o = np.clip(np.minimum(a[:, None, 1], b[None, :, 1]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
            total = o.sum(axis=1, keepdims=True)
            return np.divide(o, total, out=np.zeros_like(o), where=total > 0)

        s = np.zeros((ys.shape[0], xs.shape[0]))
        s[row, col] = g_scores
        return spread(ys, cy).T @ s @ spread(xs, cx)


def cell_boxes(rows: int, cols: int, cell_w: float, cell_h: float) -> np.ndarray:
    """Row-major (rows*cols, 4) boxes of a regular grid of ``cell_w`` x ``cell_h`` cells."""
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.stack([c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h], axis=1).astype(np.float64)


def affine(boxes: np.ndarray, scale_x: float, scale_y: float, off_x: float = 0.0, off_y: float = 0.0) -> np.ndarray:
    """Map canvas boxes back to image pixels: ``x = (u - off_x) / scale_x``."""
    out = np.asarray(boxes, dtype=np.float64).copy()
    out[..., [0, 2]] = (out[..., [0, 2]] - off_x) / scale_x
    out[..., [1, 3]] = (out[..., [1, 3]] - off_y) / scale_y
    return out


def size_get(size, key: str):
    """Read ``key`` from a processor size (a dict or a ``SizeDict``)."""
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def resized_size(size, height: int, width: int) -> tuple[int, int]:
    """(h, w) the processor's ``resize`` produces for an (height, width) image."""
    if size_get(size, "shortest_edge"):
        dummy = np.zeros((1, height, width))
        return tuple(
            get_resize_output_image_size(  # type: ignore[return-value]
                dummy,
                size=size_get(size, "shortest_edge"),
                default_to_square=False,
                input_data_format=ChannelDimension.FIRST,
            )
        )
    return size_get(size, "height"), size_get(size, "width")
