"""Image-only variants of the Qwen2.5-VL and InternVL processors, and the pixel arithmetic
of every PIL image processor in torch (same values, several threads).

The stock processors build a video processor, and without torchvision (which we must
not install, see REFERENCE.md) that fails with ``VIDEO_PROCESSOR_MAPPING has no
attribute _extra_content``. Leaving ``video_processor`` out of ``__init__`` makes
``ProcessorMixin`` neither build nor load one; everything image-related is inherited
unchanged, and ``from_pretrained`` reads the same files a stock checkpoint ships.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from transformers import InternVLProcessor, Qwen2_5_VLProcessor
from transformers.image_processing_backends import PilBackend


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class InternVLImageOnlyProcessor(InternVLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs):
        super().__init__(
            image_processor, tokenizer, None, image_seq_length=image_seq_length, chat_template=chat_template, **kwargs
        )


def _rescale(image: np.ndarray, scale: float, **_) -> np.ndarray:
    """``PilBackend.rescale``: the float64 product, then float32, as transformers' numpy
    ``rescale`` computes it; the same IEEE operations in torch give the same bits."""
    return (torch.from_numpy(np.ascontiguousarray(image)).to(torch.float64) * scale).to(torch.float32).numpy()


def _normalize(image: np.ndarray, mean: float | Iterable[float], std: float | Iterable[float], **_) -> np.ndarray:
    """``PilBackend.normalize`` of a channels-first image: ``(x - mean) / std`` per channel in
    the image's float dtype (float32 for integers), as transformers' numpy ``normalize``."""
    t = torch.from_numpy(np.ascontiguousarray(image))
    if not t.is_floating_point():
        t = t.to(torch.float32)
    c = t.shape[0]

    def per_channel(v: Any, name: str) -> torch.Tensor:  # in the image's dtype, as numpy casts it
        v = list(v) if isinstance(v, Iterable) else [v] * c
        if len(v) != c:
            raise ValueError(f"{name} must have {c} elements if it is an iterable, got {len(v)}")
        return torch.tensor(v, dtype=t.dtype).view(-1, 1, 1)

    return ((t - per_channel(mean, "mean")) / per_channel(std, "std")).numpy()


@contextlib.contextmanager
def torch_pixel_arithmetic(processor: Any) -> Iterator[bool]:
    """While inside, ``processor``'s PIL image processor (this instance only) rescales and
    normalizes in torch: bit-identical pixel values (tested on every family), on several
    cores. transformers' numpy versions run on one core over strided copies, which a crop cut
    into many tiles feels (timed in ``results/bench/h200_2026-12-04d/REPORT.md``). Set per
    call and removed after, so that the processor still serializes (``save_pretrained``).
    Yields whether it applied (a processor whose class overrides them keeps its own)."""
    ip = getattr(processor, "image_processor", None)
    if (
        not isinstance(ip, PilBackend)
        or type(ip).rescale is not PilBackend.rescale
        or type(ip).normalize is not PilBackend.normalize
        or "rescale" in vars(ip)
    ):
        yield False
        return
    ip.rescale, ip.normalize = _rescale, _normalize
    try:
        yield True
    finally:
        del ip.rescale, ip.normalize
