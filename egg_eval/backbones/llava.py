"""LLaVA-1.5 (``llava-hf/llava-1.5-7b-hf``): one 24x24 grid over the processor's centre crop.

The processor optionally pads to a square (``do_pad``), resizes the shortest edge to
336 and centre-crops 336x336, so the margins cut away along the long side are never
seen; token (r, c) covers crop pixels [14c, 14c+14) x [14r, 14r+14).
"""

from __future__ import annotations

import numpy as np
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from egg_eval.backbones.base import Backbone
from egg_eval.backbones.layout import NO_PLACE, PRIMARY, affine, cell_boxes, resized_size, size_get


class Llava(Backbone):
    family = "llava15"
    default_path = "llava-hf/llava-1.5-7b-hf"
    model_class = LlavaForConditionalGeneration
    processor_class = LlavaProcessor
    batch_grounding = True

    def _image_features(self, enc):
        return list(self._pooled_features(pixel_values=enc["pixel_values"]))

    def _image_stub(self, sizes):
        """``LlavaProcessor`` counts tokens from the processed pixels' height and width."""
        return {"pixel_values": [np.zeros((1, *self._geometry(size)[-2:]), np.uint8) for size in sizes]}

    def _geometry(self, image_size):
        """(pad_x, pad_y, w_in, h_in, rh, rw, top, left, ch, cw): the processor's pad to a
        square, resize to (rh, rw) and centre crop of (ch, cw) at (top, left)."""
        ip = self.processor.image_processor
        w, h = image_size
        pad_x = pad_y = 0
        if getattr(ip, "do_pad", False):  # pad_to_square, image centred
            side = max(w, h)
            pad_x, pad_y = (side - w) // 2, (side - h) // 2
            w_in, h_in = side, side
        else:
            w_in, h_in = w, h
        if getattr(ip, "do_resize", True):
            rh, rw = resized_size(ip.size, h_in, w_in)
        else:
            rh, rw = h_in, w_in
        top = left = 0
        ch, cw = rh, rw
        if getattr(ip, "do_center_crop", False):
            ch, cw = size_get(ip.crop_size, "height"), size_get(ip.crop_size, "width")
            top, left = (rh - ch) // 2, (rw - cw) // 2
        return pad_x, pad_y, w_in, h_in, rh, rw, top, left, ch, cw

    def token_boxes(self, enc, image_index, image_size) -> tuple[np.ndarray, np.ndarray]:
        pad_x, pad_y, w_in, h_in, rh, rw, top, left, ch, cw = self._geometry(image_size)
        p = self.model.config.vision_config.patch_size
        canvas = cell_boxes(ch // p, cw // p, p, p) + np.array([left, top, left, top])
        boxes = affine(affine(canvas, rw / w_in, rh / h_in), 1.0, 1.0, pad_x, pad_y)
        groups = np.full(len(boxes), PRIMARY)
        if self.model.config.vision_feature_select_strategy == "full":  # CLS kept: no place
            boxes = np.concatenate([np.full((1, 4), np.nan), boxes])
            groups = np.concatenate([[NO_PLACE], groups])
        return boxes, groups
