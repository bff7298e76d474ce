"""A prompt as the model takes it: the chat template, the processor (pixels and tokens), its
text without the pixel work where the embeddings are given, tokens appended as if generated."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from egg_eval.backbones.processors import torch_pixel_arithmetic
from egg_eval.phases import phase


class Encoding:
    """The backbone's prompts (a mixin of :class:`~egg_eval.backbones.base.Backbone`, which
    provides ``processor``, ``device``, ``dtype`` and ``max_images``)."""

    def prompt(self, n_images: int, text: str) -> str:
        content: list[dict[str, str]] = [{"type": "image"} for _ in range(n_images)]
        content.append({"type": "text", "text": text})
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode(self, images: Sequence[Image.Image], text: str) -> dict[str, torch.Tensor]:
        """The model's own processor on ``images`` (in order) and the chat-templated ``text``."""
        self._check_image_count(images)
        # same pixels, several cores
        with phase("processor"), torch_pixel_arithmetic(self.processor):
            batch = self.processor(images=list(images), text=self.prompt(len(images), text), return_tensors="pt")
        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device)
                if v.is_floating_point():
                    v = v.to(self.dtype)
            out[k] = v
        return out

    def _image_stub(self, sizes: Sequence[tuple[int, int]]) -> dict[str, Any] | None:
        """What the processor's own ``replace_image_token`` reads of its image processor's
        output, computed from the images' (w, h) sizes alone (no pixel work). ``None`` (the
        default) where the adapter cannot; :meth:`encode_text` then declines."""
        return None

    def encode_text(self, images: Sequence[Image.Image], text: str) -> dict[str, torch.Tensor] | None:
        """``encode`` without the image processor's pixel work, for a pass whose visual
        embeddings are given (``inputs_with_features``): the processor's own placeholder
        expansion on :meth:`_image_stub`, then its tokenizer; the stub's ``stub_lm_keys``
        join the result. ``None`` where there is no stub; the caller then runs :meth:`encode`."""
        stub = self._image_stub([im.size for im in images])
        if stub is None:
            return None
        with phase("processor"):
            proc = self.processor
            reps = [proc.replace_image_token(stub, image_idx=i) for i in range(len(images))]
            texts, _ = proc.get_text_with_replacements([self.prompt(len(images), text)], reps)
            out = dict(proc.tokenizer(texts[0], return_tensors="pt"))
            if getattr(proc, "return_mm_token_type_ids", False):  # as the processor's own call adds them
                out["mm_token_type_ids"] = torch.tensor(proc.create_mm_token_type_ids(out["input_ids"].tolist()))
            out.update({k: torch.as_tensor(stub[k]) for k in self.stub_lm_keys})
            return {k: v.to(self.device) for k, v in out.items() if isinstance(v, torch.Tensor)}

    def _check_image_count(self, images: Sequence[Image.Image]) -> None:
        if self.max_images is not None and len(images) > self.max_images:
            raise ValueError(f"{self.family} takes at most {self.max_images} images per prompt, got {len(images)}")

    def _encode_for(self, images: Sequence[Image.Image], text: str, features) -> dict[str, torch.Tensor]:
        """:meth:`encode_text` where ``features`` are given and the backbone can, else :meth:`encode`."""
        self._check_image_count(images)
        enc = self.encode_text(images, text) if features is not None else None
        return self.encode(images, text) if enc is None else enc

    @staticmethod
    def append_tokens(enc: dict[str, torch.Tensor], tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """``enc`` with ``tokens`` (1, n) appended as if they had been generated."""
        if tokens.shape[1] == 0:
            return enc
        out = dict(enc)
        length = enc["input_ids"].shape[1]
        out["input_ids"] = torch.cat([enc["input_ids"], tokens], dim=1)
        for k, v in enc.items():
            if k != "input_ids" and isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == (1, length):
                fill = torch.ones_like(tokens) if k == "attention_mask" else torch.zeros_like(tokens)
                out[k] = torch.cat([v, fill.to(v.dtype)], dim=1)
        return out


def concat_encodings(encs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Encodings of matching shapes as one batch: tensors concatenated along dim 0 in order
    (rows, or images for per-image keys), lists joined."""
    return {
        k: torch.cat([e[k] for e in encs]) if isinstance(encs[0][k], torch.Tensor) else [x for e in encs for x in e[k]]
        for k in encs[0]
    }
