"""InternVL-3.5 (``OpenGVLab/InternVL3_5-8B-HF``).

The image is squashed onto a canvas of cols x rows tiles of 448 px chosen by
``get_optimal_tiled_canvas``; tiles go row-major, then a 448 px thumbnail of the whole
image when there is more than one tile. Each tile's 32x32 patches are pixel-shuffled
(0.5) into 16x16 = 256 tokens. The token order inside a tile is taken from the model's
own ``pixel_shuffle`` run on patch coordinates. The tiles form the map's grid; the
thumbnail is a global view folded in by overlap area, as LLaVA-NeXT's base view.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import InternVLForConditionalGeneration
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from egg_eval.backbones.base import Backbone
from egg_eval.backbones.layout import GLOBAL, PRIMARY, affine, cell_boxes, size_get
from egg_eval.backbones.processors import InternVLImageOnlyProcessor


class InternVL(Backbone):
    family = "internvl35"
    default_path = "OpenGVLab/InternVL3_5-8B-HF"
    model_class = InternVLForConditionalGeneration
    processor_class = InternVLImageOnlyProcessor
    vision_keys = feature_keys = ("pixel_values", "_sizes")

    def __init__(self, model, processor, *, max_tiles: int | None = None, **kw):
        super().__init__(model, processor, **kw)
        if max_tiles is not None:
            self.set_max_tiles(max_tiles)

    def set_max_tiles(self, n: int) -> None:
        """At most ``n`` tiles of 448 px per view, besides the thumbnail (``backbone.max_tiles``,
        VLMEvalKit's ``max_num``; InternVL-3.5's checkpoint: 12). Every view is re-tiled, the
        crops too, so this bounds each view's tokens at 256 x (n + 1)."""
        ip = self.processor.image_processor
        if n < max(1, ip.min_patches):
            raise ValueError(f"max_tiles must be at least {max(1, ip.min_patches)} (the processor's min_patches)")
        ip.max_patches = int(n)

    def _tiling(self, image_size: tuple[int, int]) -> tuple[int, int, int, bool]:
        """(cols, rows, tile px, thumbnail?) for an image of ``image_size`` (w, h)."""
        ip = self.processor.image_processor
        tile = size_get(ip.size, "height")
        if not getattr(ip, "crop_to_patches", True):
            return 1, 1, tile, False
        w, h = image_size
        cols, rows = get_optimal_tiled_canvas((h, w), (tile, tile), ip.min_patches, ip.max_patches)
        return cols, rows, tile, cols * rows > 1

    def encode(self, images, text):
        enc = super().encode(images, text)
        enc["_sizes"] = [im.size for im in images]  # kept out of model calls
        return enc

    def _image_stub(self, sizes):
        """``InternVLProcessor`` counts tiles (plus the thumbnail) per image."""
        return {"num_patches": [cols * rows + int(thumb) for cols, rows, _, thumb in map(self._tiling, sizes)]}

    def model_inputs(self, enc):
        return {k: v for k, v in enc.items() if k != "_sizes"}

    def _image_features(self, enc):
        tiles = self._pooled_features(pixel_values=enc["pixel_values"])  # (tiles of all images, 256, D)
        return list(torch.split(tiles, self._image_stub(enc["_sizes"])["num_patches"]))

    def _pack_leaves(self, leaves):
        return torch.cat(leaves, dim=0)

    def token_boxes(self, enc, image_index, image_size) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.model.config
        w, h = image_size
        cols, rows, tile, thumb = self._tiling(image_size)
        p = cfg.vision_config.patch_size
        p = p[0] if isinstance(p, (list, tuple)) else p
        g = tile // p
        patch = torch.from_numpy(cell_boxes(g, g, p, p)).reshape(1, g, g, 4)
        shuffled = self.model.model.pixel_shuffle(patch, scale_factor=cfg.downsample_ratio)
        parts = shuffled.reshape(-1, shuffled.shape[-1] // 4, 4).numpy()  # (tokens, patches merged, 4)
        in_tile = np.concatenate([parts[..., :2].min(axis=1), parts[..., 2:].max(axis=1)], axis=1)
        boxes = [
            affine(in_tile + np.array([c * tile, r * tile] * 2), cols * tile / w, rows * tile / h)
            for r in range(rows)
            for c in range(cols)
        ]
        groups = [np.full(len(in_tile), PRIMARY)] * (rows * cols)
        if thumb:
            boxes.append(affine(in_tile, tile / w, tile / h))
            groups.append(np.full(len(in_tile), GLOBAL))
        return np.concatenate(boxes), np.concatenate(groups)
