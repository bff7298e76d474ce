"""The backbone contract: one VLM behind the few calls EGG makes, and what an adapter supplies.

A family's adapter (``llava.py``, ``llava_next.py``, ``qwen2_5_vl.py``, ``internvl.py``) states
its differences as the class attributes and hooks below; everything else is shared here and in
the mixins beside it (``memory.py``: activation arithmetic; ``prefix.py``: KV-cache reuse;
``answering.py``: the answer pass; ``layout.py``: token -> pixel geometry).

Adapter hooks (what a subclass sets or overrides):

- ``family``, ``default_path``, ``model_class``, ``processor_class``: what to load.
- ``vision_keys`` / ``feature_keys``: the encoding's keys the vision tower takes / that
  ``_image_features`` reads; ``stub_lm_keys``: keys of ``_image_stub`` the language model takes.
- ``max_images``: images per prompt (None: any); ``batch_grounding``: a round's views in one pass.
- ``_image_features(enc) -> list[Tensor]``: the projected visual embeddings per image, by the
  model's own ``get_image_features`` (required).
- ``token_boxes(enc, image_index, (w, h)) -> (boxes (N, 4), groups (N,))``: where each of that
  image's N tokens lies in its pixels, and its group (``layout.PRIMARY``, ``GLOBAL``,
  ``NO_PLACE``) (required).
- optional: ``_image_stub(sizes)`` (the processor's placeholders without pixel work),
  ``image_inputs(encs)``, ``_pack_leaves(leaves)``, ``model_inputs(enc)``, ``encode``,
  ``_forward_on_prefix``, and the family's own settings in ``__init__``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from egg_eval.backbones.answering import Answering
from egg_eval.backbones.compat import cache_keyword
from egg_eval.backbones.encoding import Encoding, concat_encodings
from egg_eval.backbones.hooks import _StopForward, capture_layer_output, counts_tower
from egg_eval.backbones.layout import TokenLayout
from egg_eval.backbones.lean import lean_activations
from egg_eval.backbones.loading import Loading
from egg_eval.backbones.memory import ActivationMemory, recompute_in_backward
from egg_eval.backbones.prefix import PrefixReuse
from egg_eval.phases import phase
from egg_eval.types import Counters


class Backbone(Loading, Encoding, ActivationMemory, PrefixReuse, Answering):
    """One VLM behind the interface the method needs.

    Subclasses set the class attributes and implement ``_image_features`` and
    ``token_boxes``. All methods take PIL images (views) and a question text; prompts go
    through the processor's own chat template, images through its own image processor.
    """

    family: ClassVar[str]
    default_path: ClassVar[str]
    model_class: ClassVar[type]
    processor_class: ClassVar[type]
    vision_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)
    # what ``_image_features`` reads of an encoding (see :meth:`image_inputs`)
    feature_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)
    # How many images the model takes natively in one prompt (None = no limit).
    max_images: ClassVar[int | None] = None
    # views of one round may be grounded in one batched pass: prompts of different lengths
    # (per-view token counts of LLaVA-1.6, Qwen2.5-VL, InternVL) are right-padded, which a
    # causal model's real tokens never see (:meth:`stack_lm_inputs`)
    batch_grounding: ClassVar[bool] = True
    # keys of ``_image_stub`` that the language model also takes (Qwen2.5-VL's image_grid_thw)
    stub_lm_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        *,
        max_new_tokens: int = 32,
        name: str | None = None,
        repetition_penalty: float | None = None,
    ):
        model.requires_grad_(False)
        self.model = model.eval()
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.repetition_penalty = repetition_penalty  # None: the checkpoint's generation config's
        self.name = name or self.family
        self.counters = Counters()
        self.cache_keyword = cache_keyword(model)
        inner = getattr(model, "model", None)
        self._tower = getattr(inner, "vision_tower", None) or getattr(inner, "visual", None)
        self._tower_depth = 0
        self._tower_range: Any = None
        self.revision: str | None = None
        self.source: str | None = None  # the hub id or directory it was loaded from
        self.weights_digest: str | None = None  # of a local directory's files (files.weights_digest)

    @contextlib.contextmanager
    def tower_counted(self) -> Iterator[None]:
        """While inside (re-entrant), each vision-tower call is counted and runs under the
        ``tower`` phase; the hooks are removed on the way out, exception or not."""
        handles = []
        if self._tower_depth == 0 and self._tower is not None:
            handles = [
                self._tower.register_forward_pre_hook(self._count_tower),
                self._tower.register_forward_hook(self._end_tower_range, always_call=True),
            ]
        self._tower_depth += 1
        try:
            yield
        finally:
            self._tower_depth -= 1
            for h in handles:
                h.remove()

    def _count_tower(self, _module, _args) -> None:
        self.counters.n_tower += 1
        self._tower_range = phase("tower")
        self._tower_range.__enter__()

    def _end_tower_range(self, _module, _args, _output) -> None:
        if self._tower_range is not None:
            self._tower_range.__exit__(None, None, None)
            self._tower_range = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @functools.cached_property
    def weight_bytes(self) -> int:
        """Bytes of the model's parameters (summed once: the activation budget asks per sample)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    # ---------------------------------------------------------- visual leaves
    def _image_features(self, enc: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Projected visual embeddings per image, via the model's own ``get_image_features``."""
        raise NotImplementedError

    def _pooled_features(self, **inputs) -> torch.Tensor:
        """``get_image_features(**inputs)``'s projected embeddings, the vision feature layer and
        selection strategy taken from the model's config (LLaVA-1.5, LLaVA-1.6, InternVL)."""
        cfg = self.model.config
        return self.model.model.get_image_features(
            **inputs,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            return_dict=True,
        ).pooler_output

    def image_inputs(self, encs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """What ``_image_features`` reads of several encodings, joined so that ONE vision-tower
        call embeds all their images, in order (one entry per image in its result). The
        tower embeds each image on its own: separate rows (LLaVA), tiles (InternVL) or
        attention windows bounded per image (Qwen2.5-VL's ``cu_seqlens``)."""
        return concat_encodings([{k: e[k] for k in self.feature_keys} for e in encs])

    @counts_tower
    def image_features(self, enc: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`_image_features`, its vision-tower calls counted."""
        return self._image_features(enc)

    def visual_leaves(self, enc: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Projected visual embeddings as detached leaves that require grad (vision tower without grad)."""
        with torch.no_grad():
            feats = self.image_features(enc)
        return [f.detach().requires_grad_(True) for f in feats]

    def _pack_leaves(self, leaves: list[torch.Tensor]) -> Any:
        return list(leaves)

    def lm_inputs(self, enc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the language model needs besides the visual embeddings."""
        return {k: v for k, v in enc.items() if k not in self.vision_keys}

    def model_inputs(self, enc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What a plain forward / ``generate`` takes."""
        return enc

    def stack_lm_inputs(self, encs: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], torch.Tensor]:
        """The language-model inputs of several one-prompt encodings as one batch, and each
        row's last real position (B,).

        Prompts are RIGHT-padded with their own last token (:meth:`append_tokens`): under the
        causal mask no real token attends to a later position, and the real tokens keep
        positions 0..n-1, so every row computes exactly what it computes alone (no padding
        mask, no position shift, no fully masked rows).
        """
        parts = [self.lm_inputs(e) for e in encs]
        lengths = [int(p["input_ids"].shape[1]) for p in parts]
        width = max(lengths)
        padded = [self.append_tokens(p, p["input_ids"][:, -1:].expand(1, width - n)) for p, n in zip(parts, lengths)]
        return concat_encodings(padded), torch.tensor(lengths, device=parts[0]["input_ids"].device) - 1

    # ------------------------------------------------------------------ layers
    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    def runs_all_layers(self, layer: int | None) -> bool:
        """Whether the logit-lens setting ``layer`` (None or -1 = last) is the full model."""
        return layer is None or layer == -1 or layer == self.num_layers

    def layers_run(self, layer: int | None) -> int:
        """How many decoder layers a pass with the logit-lens setting ``layer`` runs."""
        return self.num_layers if self.runs_all_layers(layer) else layer

    def check_layer(self, layer: int | None) -> None:
        """Refuse a logit-lens ``layer`` the model does not have (1..num_layers, -1 / None: the last)."""
        if not (layer is None or layer == -1 or 1 <= layer <= self.num_layers):
            raise ValueError(f"method.layer must be in 1..{self.num_layers} (or -1 / null: the last), got {layer}")

    def next_token_logits(
        self,
        enc: dict[str, torch.Tensor],
        leaves: list[torch.Tensor],
        *,
        layer: int | None = None,
        recompute_layers: bool | int = False,
        positions: torch.Tensor | None = None,
        cache: Any = None,
        lean: bool = False,
    ) -> torch.Tensor:
        """Next-token logits (V,) at the last position, differentiable in ``leaves``; (B, V)
        for a batch of B equal-length prompts, or at each row's ``positions`` (B,) for a
        right-padded batch (:meth:`stack_lm_inputs`).

        ``layer`` L in 1..num_layers is the logit lens: the first L decoder layers, then the
        final norm and the LM head (the reference code skips the norm; applying it is the
        usual logit lens and keeps the scale of the last layer). ``None`` = last layer.
        ``recompute_layers``: recompute this many leading decoder layers in the backward (an
        int: the activation budget's plan), or True for the least memory
        (:meth:`most_recomputed`; execution.checkpoint_layers); see :func:`recompute_in_backward`.
        ``cache`` (a full pass of one prompt): a fresh ``DynamicCache`` that the pass fills with
        its keys and values (:class:`Prefix`). ``lean``: keep lean activations for the backward
        (:func:`egg_eval.backbones.lean.lean_activations`; same logits and gradients).
        """
        self.check_layer(layer)
        self.counters.n_forward += 1
        kw = dict(self.lm_inputs(enc), use_cache=cache is not None)
        if cache is not None:
            if not self.runs_all_layers(layer) or enc["input_ids"].shape[0] != 1:
                raise ValueError("a cache is kept only by a one-prompt pass through all layers")
            kw[self.cache_keyword] = cache
        kw["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=self._pack_leaves(leaves))}
        n_recompute = self.most_recomputed(layer) if recompute_layers is True else int(recompute_layers)
        grad = torch.is_grad_enabled()
        if grad:
            self.counters.recomputed_layers += min(n_recompute, self.layers_run(layer))
            self.counters.lean_passes += int(lean)
        recomputed = self.decoder_layers[:n_recompute]
        recompute = recompute_in_backward(recomputed, grad, lean)
        slim = lean_activations(self.language_model, lean and grad, skip=recomputed)
        keep = 1 if positions is None else positions.reshape(-1, 1)
        if self.runs_all_layers(layer):
            with recompute, slim:
                logits = self.model(**kw, logits_to_keep=keep).logits[:, -1].float()
            return logits[0] if logits.shape[0] == 1 else logits
        try:
            with recompute, slim, capture_layer_output(self.decoder_layers[layer - 1]):
                self.model.model(**kw)
        except _StopForward as stop:
            hidden = stop.hidden[:, -1] if positions is None else stop.hidden[torch.arange(len(positions)), positions]
        else:  # pragma: no cover - the hook always fires
            raise RuntimeError("logit-lens hook did not fire")
        logits = self.model.lm_head(self.language_model.norm(hidden)).float()
        return logits[0] if logits.shape[0] == 1 else logits

    def inputs_with_features(
        self, enc: dict[str, torch.Tensor], features: Sequence[Sequence[torch.Tensor]] | None
    ) -> dict[str, Any]:
        """What a forward / ``generate`` takes for ``enc``; with ``features`` (per image, its
        projected visual embeddings from an earlier pass, e.g. ``Grounding.features``) the
        vision tower is skipped and they enter as ``mm_encoder_outputs``. Features do not
        depend on the text, so this is exact."""
        if features is None:
            return self.model_inputs(enc)
        kw = dict(self.lm_inputs(enc))
        flat = [t.to(self.device) for f in features for t in f]
        kw["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=self._pack_leaves(flat))}
        return kw

    # ------------------------------------------------------------------ layout
    def token_boxes(
        self, enc: dict[str, torch.Tensor], image_index: int, image_size: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-token boxes (N, 4) in the image's pixels and groups (N,) for image ``image_index``."""
        raise NotImplementedError

    def token_layout(self, enc: dict[str, torch.Tensor], image_index: int, image_size: tuple[int, int]) -> TokenLayout:
        boxes, groups = self.token_boxes(enc, image_index, image_size)
        return TokenLayout.from_token_boxes(boxes, groups, image_size)
