"""Loading a backbone: from a hub id or a directory, on its device and dtype, with the identity
of its weights for the resume check, and the process-wide attention switch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from egg_eval.files import weights_digest


def use_cudnn_attention(on: bool) -> None:
    """Whether ``scaled_dot_product_attention`` may pick cuDNN's attention kernels (a
    process-wide PyTorch switch; ``backbone.sdpa_cudnn``). Off by default. PyTorch >= 2.10
    prefers them on Hopper and Blackwell once its bundled cuDNN is newer than 9.15, and cuDNN
    builds a graph for each new shape; in a benchmark run nearly every call has a new length
    (each question, each view's token count, each decoding step), so the builds dominate (timed
    in ``results/bench/h200_2026-12-04``). Off, SDPA takes flash or memory-efficient attention,
    which need no per-shape build. Results are equal up to float rounding."""
    torch.backends.cuda.enable_cudnn_sdp(bool(on))


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """``auto``: CUDA when present; bfloat16 on GPU, float32 on CPU."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, getattr(torch, dtype)


class Loading:
    """The backbone's loading (a mixin of :class:`~egg_eval.backbones.base.Backbone`)."""

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        dtype: str = "auto",
        device: str = "auto",
        revision: str | None = None,
        attn_implementation: str | None = "sdpa",
        sdpa_cudnn: bool = False,
        max_new_tokens: int = 32,
        name: str | None = None,
        repetition_penalty: float | None = None,
        **adapter: Any,
    ) -> Any:
        """Load from a hub id or a local ``save_pretrained`` directory; ``trust_remote_code`` stays
        off. ``adapter``: the family's own settings (Qwen2.5-VL: ``min_pixels``, ``max_pixels``).
        ``sdpa_cudnn``: see :func:`use_cudnn_attention` (process-wide)."""
        use_cudnn_attention(sdpa_cudnn)
        path = str(path or cls.default_path)
        dev, torch_dtype = resolve_device_dtype(device, dtype)
        kw: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": False}
        if revision:
            kw["revision"] = revision
        if attn_implementation:
            kw["attn_implementation"] = attn_implementation
        model = cls.model_class.from_pretrained(path, **kw).to(dev)
        pkw = {"revision": revision} if revision else {}
        processor = cls.processor_class.from_pretrained(path, **pkw)
        bb = cls(
            model, processor, max_new_tokens=max_new_tokens, name=name, repetition_penalty=repetition_penalty, **adapter
        )
        bb.revision = revision or getattr(model.config, "_commit_hash", None)
        bb.source = path
        if Path(path).is_dir():
            bb.weights_digest = weights_digest(path)
        return bb

    def fingerprint(self) -> dict[str, str | None]:
        """What identifies the weights for resume checks: a local directory by its files'
        digest (wherever it lies), a hub model by its id and commit."""
        if self.weights_digest is not None:
            return {"weights": self.weights_digest}
        return {"source": self.source, "revision": self.revision}
