"""LLaVA-1.6 / LLaVA-NeXT (``llava-hf/llava-v1.6-mistral-7b-hf``).

Token order per image: the 24x24 base view (the whole image squashed to 336x336), then
the high-resolution grid: the image is resized into the best pinpoint canvas
(``select_best_resolution``), padded symmetrically, cut into 336 px tiles of 24x24
tokens, the tiles are merged into one (nH*24, nW*24) grid, the padding rows/columns are
removed (``unpad_image``) and an ``image_newline`` token (no place) ends every row.

Both parts are grounded: the high-res grid is the map's grid and the base-view scores
are folded into it by overlap area (``TokenLayout.to_map``). The token order is taken
from the model's own ``pack_image_features`` run on box coordinates instead of features,
so it cannot drift from what the model does.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
from transformers.image_utils import ChannelDimension

from egg_eval.backbones.base import Backbone
from egg_eval.backbones.layout import GLOBAL, NO_PLACE, PRIMARY, affine, cell_boxes, size_get


class LlavaNext(Backbone):
    family = "llava16"
    default_path = "llava-hf/llava-v1.6-mistral-7b-hf"
    model_class = LlavaNextForConditionalGeneration
    processor_class = LlavaNextProcessor
    vision_keys = feature_keys = ("pixel_values", "image_sizes")

    def image_inputs(self, encs):
        """Per image (1, patches, 3, H, W): padded with zero patches to the largest count, as
        the processor pads a batch; ``get_image_features`` keeps each image's own count,
        read from ``image_sizes``."""
        pvs = [e["pixel_values"] for e in encs]
        n = max(pv.shape[1] for pv in pvs)
        padded = [torch.nn.functional.pad(pv, (0, 0, 0, 0, 0, 0, 0, n - pv.shape[1])) for pv in pvs]
        return {"pixel_values": torch.cat(padded), "image_sizes": torch.cat([e["image_sizes"] for e in encs])}

    def _image_features(self, enc):
        return list(self._pooled_features(pixel_values=enc["pixel_values"], image_sizes=enc["image_sizes"]))

    def _tile(self) -> tuple[int, int]:
        """(side, tile): the base view's resize side and the processed tile's side in px."""
        ip = self.processor.image_processor
        side = size_get(ip.size, "shortest_edge") or size_get(ip.size, "height")
        return side, size_get(ip.crop_size, "height") or side

    def _image_stub(self, sizes):
        """``LlavaNextProcessor`` counts tokens from each original (h, w) and the tile size."""
        tile = self._tile()[1]
        return {"image_sizes": [[h, w] for w, h in sizes], "pixel_values": np.zeros((1, 1, 1, tile, tile), np.uint8)}

    def token_boxes(self, enc, image_index, image_size) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.model.config
        w, h = image_size
        side, tile = self._tile()
        p = cfg.vision_config.patch_size
        g = cfg.vision_config.image_size // p
        # base view: squashed to side x side, then centre-cropped to tile x tile
        off = (side - tile) // 2
        base = affine(cell_boxes(g, g, p, p) + off, side / w, side / h)
        # high-res canvas: resize to fit the best pinpoint, pad symmetrically, tiles of `tile`
        best_h, best_w = select_best_resolution((h, w), cfg.image_grid_pinpoints)
        new_h, new_w = get_patch_output_size(np.zeros((1, h, w)), (best_h, best_w), ChannelDimension.FIRST)
        pad_x, pad_y = (best_w - new_w) // 2, (best_h - new_h) // 2
        n_h, n_w = best_h // tile, best_w // tile
        tiles = [
            affine(cell_boxes(g, g, p, p) + np.array([j * tile, i * tile] * 2), new_w / w, new_h / h, pad_x, pad_y)
            for i in range(n_h)
            for j in range(n_w)
        ]
        coords = torch.from_numpy(np.stack([base, *tiles]))  # (1 + n_tiles, g*g, 4)
        packed, _ = self.model.model.pack_image_features(
            [coords],
            torch.tensor([[h, w]]),
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            image_newline=torch.full((4,), float("nan"), dtype=coords.dtype),
        )
        boxes = packed[0].numpy()
        groups = np.where(np.isnan(boxes[:, 0]), NO_PLACE, PRIMARY)
        groups[: g * g] = GLOBAL
        return boxes, groups
