"""Qwen2.5-VL (``Qwen/Qwen2.5-VL-7B-Instruct``).

The image is smart-resized to multiples of 28 (no crop, no pad): ``image_grid_thw`` =
(1, gh, gw) patches of 14 px, merged 2x2 into gh/2 x gw/2 tokens, row-major, 28 px each
in the resized image. ``mm_encoder_outputs`` hands the merger output in this order (a
hook on ``visual.merger`` would see window order instead), and ``image_grid_thw`` stays
in the language-model inputs so that M-RoPE positions are computed as usual.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from egg_eval.backbones.base import PRIMARY, Backbone, affine, cell_boxes
from egg_eval.backbones.llava import size_get
from egg_eval.backbones.processors import Qwen2_5_VLImageOnlyProcessor


class Qwen25VL(Backbone):
    family = "qwen25vl"
    default_path = "Qwen/Qwen2.5-VL-7B-Instruct"
    model_class = Qwen2_5_VLForConditionalGeneration
    processor_class = Qwen2_5_VLImageOnlyProcessor
    feature_keys = ("pixel_values", "image_grid_thw")

    def _image_features(self, enc):
        out = self.model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"], return_dict=True)
        return list(out.pooler_output)

    stub_lm_keys = ("image_grid_thw",)

    def _image_stub(self, sizes):
        """``image_grid_thw`` as the image processor's ``smart_resize`` gives it."""
        ip = self.processor.image_processor
        p, factor = ip.patch_size, ip.patch_size * ip.merge_size
        lo, hi = size_get(ip.size, "shortest_edge"), size_get(ip.size, "longest_edge")
        grids = []
        for w, h in sizes:
            rh, rw = smart_resize(h, w, factor, min_pixels=lo, max_pixels=hi)
            grids.append([1, rh // p, rw // p])
        return {"image_grid_thw": torch.tensor(grids)}

    def _forward_on_prefix(self, enc, features, prefix, p):
        """Also the uncached tokens' M-RoPE positions, which depend on the images before them
        (``generate`` computes them itself), and the offset that later forwards on the cache
        (the option tokens of :meth:`option_losses`) continue from."""
        kw = super()._forward_on_prefix(enc, features, prefix, p)
        positions, deltas = self.model.model.get_rope_index(
            enc["input_ids"],
            enc["mm_token_type_ids"],
            image_grid_thw=enc["image_grid_thw"],
            attention_mask=enc.get("attention_mask"),
        )
        self.model.model.rope_deltas = deltas
        kw["position_ids"] = positions[..., p:]
        return kw

    def token_boxes(self, enc, image_index, image_size):
        w, h = image_size
        _, gh, gw = (int(x) for x in enc["image_grid_thw"][image_index])
        vc = self.model.config.vision_config
        p, m = vc.patch_size, vc.spatial_merge_size
        canvas = cell_boxes(gh // m, gw // m, p * m, p * m)
        boxes = affine(canvas, gw * p / w, gh * p / h)
        return boxes, np.full(len(boxes), PRIMARY)
