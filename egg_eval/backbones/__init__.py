"""Backbone adapters: one file per family behind :class:`~egg_eval.backbones.base.Backbone`."""

from __future__ import annotations

from egg_eval.backbones.base import Backbone
from egg_eval.backbones.internvl import InternVL
from egg_eval.backbones.layout import TokenLayout
from egg_eval.backbones.llava import Llava
from egg_eval.backbones.llava_next import LlavaNext
from egg_eval.backbones.qwen2_5_vl import Qwen25VL

BACKBONES: dict[str, type[Backbone]] = {cls.family: cls for cls in (Llava, LlavaNext, Qwen25VL, InternVL)}


def load_backbone(family: str, path: str | None = None, **kwargs) -> Backbone:
    """Load ``family`` (llava15, llava16, qwen25vl, internvl35) from a hub id or local directory."""
    if family not in BACKBONES:
        raise ValueError(f"unknown backbone family {family!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[family].from_pretrained(path, **kwargs)


__all__ = ["BACKBONES", "Backbone", "InternVL", "Llava", "LlavaNext", "Qwen25VL", "TokenLayout", "load_backbone"]
