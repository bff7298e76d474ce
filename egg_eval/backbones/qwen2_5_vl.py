"""Qwen2.5-VL (``Qwen/Qwen2.5-VL-7B-Instruct``).

The image is smart-resized to multiples of 28 (no crop, no pad): ``image_grid_thw`` =
(1, gh, gw) patches of 14 px, merged 2x2 into gh/2 x gw/2 tokens, row-major, 28 px each
in the resized image. ``mm_encoder_outputs`` hands the merger output in this order (a
hook on ``visual.merger`` would see window order instead), and ``image_grid_thw`` stays
in the language-model inputs so that M-RoPE positions are computed as usual.

Under SDPA the vision tower's attention runs in windows of 8x8 patches (4 of its 32 blocks
over each whole image). transformers' own SDPA path (which takes no ``cu_seqlens``) splits
the sequence and calls attention once per window, in every block: 9 windows x 28 blocks at
320 px, 100 x 28 at 1024 px, 320 x 28 on a 1700x2200 px page, each call a few kernel launches,
and reads the window bounds back from the device (a sync) in each of the 32 blocks. Here
the windows of equal length, which are nearly all of them, go through ONE batched SDPA call
per length, and the bounds are read once per tower call (:class:`GroupedWindowAttention`).
The same attention, to float rounding (tested against the stock module).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import torch
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLVisionAttention,
    apply_rotary_pos_emb_vision,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from egg_eval.backbones.base import Backbone
from egg_eval.backbones.layout import PRIMARY, affine, cell_boxes, size_get
from egg_eval.backbones.processors import Qwen2_5_VLImageOnlyProcessor


class WindowPlan:
    """How one ``cu_seqlens`` (window or image bounds) is run: the token order that puts
    equal-length windows next to each other (``order``; None where it is already so),
    its inverse, and per length the (windows, length) of its batch."""

    def __init__(self, cu_seqlens: torch.Tensor):
        bounds = cu_seqlens.tolist()  # the one read-back from the device for these bounds
        starts: dict[int, list[int]] = {}
        for a, b in itertools.pairwise(bounds):
            if b > a:
                starts.setdefault(b - a, []).append(a)
        self.groups = [(len(s), n) for n, s in starts.items()]
        order = torch.cat([(torch.tensor(s)[:, None] + torch.arange(n)).reshape(-1) for n, s in starts.items()])
        if torch.equal(order, torch.arange(bounds[-1])):
            self.order = self.inverse = None
        else:
            self.order = order.to(cu_seqlens.device)
            self.inverse = torch.argsort(order).to(cu_seqlens.device)


class GroupedWindowAttention(Qwen2_5_VLVisionAttention):
    """Qwen2.5-VL's vision attention under SDPA with the windows of one length batched into
    one call (see the module docstring). A module's class is switched to this one by
    :func:`group_vision_windows`; its weights and config stay the module's own. The plan of
    the last two bounds tensors seen is kept: one tower call passes the same window bounds
    to all its windowed blocks and the same image bounds to its full-attention blocks."""

    _plans: dict[int, tuple[torch.Tensor, WindowPlan]]

    def plan(self, cu_seqlens: torch.Tensor) -> WindowPlan:
        hit = self._plans.get(id(cu_seqlens))
        if hit is not None and hit[0] is cu_seqlens:  # the tensor itself is held, so its id is not reused
            return hit[1]
        plan = WindowPlan(cu_seqlens)
        if len(self._plans) >= 2:
            self._plans.pop(next(iter(self._plans)))
        self._plans[id(cu_seqlens)] = (cu_seqlens, plan)
        return plan

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        if self.training or kwargs.get("output_attentions"):
            return super().forward(hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        n = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        plan = self.plan(cu_seqlens)
        qkv = torch.stack([q, k, v])  # (3, tokens, heads, head_dim)
        if plan.order is not None:
            qkv = qkv.index_select(1, plan.order)
        outs, at = [], 0
        for windows, length in plan.groups:
            g = qkv[:, at : at + windows * length].unflatten(1, (windows, length)).transpose(2, 3)
            o = torch.nn.functional.scaled_dot_product_attention(g[0], g[1], g[2], scale=self.scaling)
            outs.append(o.transpose(1, 2).reshape(windows * length, -1))
            at += windows * length
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        if plan.inverse is not None:
            out = out.index_select(0, plan.inverse)
        return self.proj(out)


def group_vision_windows(model: torch.nn.Module, on: bool = True) -> int:
    """Switch ``model``'s Qwen2.5-VL vision attention modules to :class:`GroupedWindowAttention`
    (``on``) or back to the stock class; only under SDPA (flash attention already takes the
    bounds in one call, eager is left as it is). Returns how many modules it switched."""
    switched = 0
    plans: dict = {}  # one for all the tower's blocks: they see the same bounds tensors
    for m in model.modules():
        if not isinstance(m, Qwen2_5_VLVisionAttention) or m.config._attn_implementation != "sdpa":
            continue
        target = GroupedWindowAttention if on else Qwen2_5_VLVisionAttention
        if type(m) is not target:
            m.__class__ = target
            switched += 1
        m._plans = plans
    return switched


class Qwen25VL(Backbone):
    family = "qwen25vl"
    default_path = "Qwen/Qwen2.5-VL-7B-Instruct"
    model_class = Qwen2_5_VLForConditionalGeneration
    processor_class = Qwen2_5_VLImageOnlyProcessor
    feature_keys = ("pixel_values", "image_grid_thw")

    def __init__(
        self,
        model,
        processor,
        *,
        group_windows: bool = True,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        **kw,
    ):
        super().__init__(model, processor, **kw)
        group_vision_windows(model, group_windows)
        self.set_pixel_range(min_pixels, max_pixels)

    def set_pixel_range(self, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
        """The image area ``smart_resize`` keeps every view within (``backbone.min_pixels`` /
        ``max_pixels``, as lmms-eval's and VLMEvalKit's Qwen settings of those names): each
        view has about area / 784 tokens, within these bounds; None keeps the checkpoint's
        (Qwen2.5-VL-7B-Instruct: 3,136 to 12,845,056, i.e. 4 to 16,384 tokens)."""
        ip = self.processor.image_processor
        lo = size_get(ip.size, "shortest_edge") if min_pixels is None else int(min_pixels)
        hi = size_get(ip.size, "longest_edge") if max_pixels is None else int(max_pixels)
        if lo > hi:
            raise ValueError(f"min_pixels {lo} is above max_pixels {hi}")
        if isinstance(ip.size, dict):  # older releases keep a plain dict
            ip.size = {**ip.size, "shortest_edge": lo, "longest_edge": hi}
        else:
            ip.size = dataclasses.replace(ip.size, shortest_edge=lo, longest_edge=hi)

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

    def token_boxes(self, enc, image_index, image_size) -> tuple[np.ndarray, np.ndarray]:
        w, h = image_size
        _, gh, gw = (int(x) for x in enc["image_grid_thw"][image_index])
        vc = self.model.config.vision_config
        p, m = vc.patch_size, vc.spatial_merge_size
        canvas = cell_boxes(gh // m, gw // m, p * m, p * m)
        boxes = affine(canvas, gw * p / w, gh * p / h)
        return boxes, np.full(len(boxes), PRIMARY)
