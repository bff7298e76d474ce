"""What every backbone adapter shares: loading, prompting, the differentiable leaves,
logits at a chosen layer, greedy answers, and the token -> pixel layout.

An adapter subclass only states its architecture's differences as data and two small
functions: how to call the model's own ``get_image_features`` and where each visual
token lies in the view (``token_boxes``). Everything else is here, once.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.utils.checkpoint
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from egg_eval.backbones.lean import lean_activations, lean_mlp, restore_forward
from egg_eval.backbones.processors import torch_pixel_arithmetic
from egg_eval.types import Counters

# Names of the ranges that EGG's phases run under (torch.profiler.record_function): a
# profile of a run (``scripts/bench.py --profile``, ``egg_eval.profiling``) splits its time
# by them. They are opened only while a profiler runs.
PHASES = {
    "processor": "egg.processor",  # the model's processor: pixels and tokens of a prompt
    "tower": "egg.tower",  # vision-tower calls
    "forward": "egg.ground.forward",  # grounding passes' forward
    "backward": "egg.ground.backward",  # grounding passes' backward to the visual tokens
    "map": "egg.ground.map",  # gradient norms to the host, the token map
    "regions": "egg.regions",  # smoothing, elbow threshold, connected components, entropy
    "answer": "egg.answer",  # the answer pass (prompt, prefill, decoding; or option losses)
}


def phase(name: str) -> contextlib.AbstractContextManager:
    """The profiler range of phase ``name`` (:data:`PHASES`) while a profiler runs, the phase
    on :data:`PHASE_STACK` while :func:`egg_eval.profiling.count_flops` counts, else nothing
    (a range costs about 4 us, the checks 0.3 us)."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(PHASES[name])
    return _NO_RANGE if PHASE_STACK is None else _OnStack(name)


_NO_RANGE = contextlib.nullcontext()
PHASE_STACK: list[str] | None = None  # the open phases, innermost last, while FLOPs are counted


class _OnStack:
    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        if PHASE_STACK is not None:
            PHASE_STACK.append(self.name)

    def __exit__(self, *exc):
        if PHASE_STACK and PHASE_STACK[-1] == self.name:
            PHASE_STACK.pop()


def in_phase(name: str):
    """Run the decorated function under :func:`phase` ``name``."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with phase(name):
                return fn(*args, **kwargs)

        return wrapper

    return decorate


@dataclass
class Prefix:
    """The KV cache of a one-image prompt from its grounding forward, for a later prompt that
    starts with the same tokens through that image (the answer pass: the whole image first,
    then the crops), which then runs only its remaining tokens.

    ``input_ids`` (L,) the prompt the cache holds; ``length`` how many leading entries of the
    cache are still that prompt's (a use cuts the cache back to what it shares and appends)."""

    input_ids: torch.Tensor
    cache: Any
    length: int


def detach_cache(cache) -> None:
    """Keys and values built in a grad pass: keep the tensors, drop the graph, once the
    backward is done or the pass failed. In the layers recomputed in the backward, the
    checkpoint's saved inputs hold the cache (a keyword of the layer's call) and the cache's
    keys hold the graph, a cycle through autograd that Python's collector cannot see: a failed
    pass that kept its cache this way would keep its memory for the rest of the process."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:  # a layer the failed pass did not reach has none
            layer.keys, layer.values = layer.keys.detach(), layer.values.detach()


@dataclass(frozen=True)
class MemoryPlan:
    """How a grounding pass keeps within the activation budget (:meth:`Backbone.memory_plan`):
    ``lean`` activations (:mod:`egg_eval.backbones.lean`) and its first ``recompute`` decoder
    layers recomputed in the backward. Neither changes the maps."""

    lean: bool = False
    recompute: int = 0


# Token groups returned by ``token_boxes``.
PRIMARY = 0  # the fine grid the regions step works on
GLOBAL = 1  # a coarse view of the same pixels (LLaVA-NeXT base view, InternVL thumbnail)
NO_PLACE = -1  # a token with no place in the image (LLaVA-NeXT's image_newline)


@dataclass(frozen=True)
class TokenLayout:
    """Where the visual tokens of ONE image lie, in that image's (the view's) pixels.

    ``grid`` (R, C) holds, for each cell of the map's grid, the index of its token in the
    image's flattened token vector; ``grid_boxes`` (R, C, 4) the cell boxes.
    ``global_index`` (G,) / ``global_boxes`` (G, 4) are tokens of a coarse global view of
    the same pixels, folded into the grid by :meth:`to_map`. ``n_tokens`` counts all
    tokens, placeless ones included.
    """

    grid: np.ndarray
    grid_boxes: np.ndarray
    global_index: np.ndarray
    global_boxes: np.ndarray
    n_tokens: int

    @classmethod
    def from_token_boxes(cls, boxes: np.ndarray, groups: np.ndarray, image_size: tuple[int, int]) -> TokenLayout:
        """Build the grid from per-token boxes (N, 4) on a regular lattice and their groups (N,).

        Lattice rows/columns come from the distinct (unclipped) box corners; boxes are then
        clipped to the image, since padding and centre-crop margins hold no pixels.
        """
        boxes = np.asarray(boxes, dtype=np.float64)
        groups = np.asarray(groups)
        if not (groups == PRIMARY).any():  # the fine grid was cut away whole (LLaVA-NeXT's unpad of an
            groups = np.where(groups == GLOBAL, PRIMARY, groups)  # extreme aspect ratio): the coarse view is the grid
        prim = np.flatnonzero(groups == PRIMARY)
        if prim.size == 0:
            raise ValueError("layout has no primary tokens")
        y0 = np.round(boxes[prim, 1], 3)
        x0 = np.round(boxes[prim, 0], 3)
        ys, xs = np.unique(y0), np.unique(x0)
        rows, cols = np.searchsorted(ys, y0), np.searchsorted(xs, x0)
        grid = np.full((ys.size, xs.size), -1, dtype=np.int64)
        grid[rows, cols] = prim
        if (grid < 0).any() or ys.size * xs.size != prim.size:
            raise ValueError(f"primary tokens do not form a full grid ({prim.size} tokens, {ys.size}x{xs.size})")
        w, h = image_size
        lo, hi = np.array([0, 0, 0, 0.0]), np.array([w, h, w, h], dtype=np.float64)
        clipped = np.clip(boxes, lo, hi)
        glob = np.flatnonzero(groups == GLOBAL)
        return cls(
            grid=grid,
            grid_boxes=clipped[grid],
            global_index=glob,
            global_boxes=clipped[glob],
            n_tokens=int(boxes.shape[0]),
        )

    @property
    def shape(self) -> tuple[int, int]:
        return self.grid.shape  # type: ignore[return-value]

    def token_boxes(self) -> np.ndarray:
        """(n_tokens, 4) boxes in view pixels, NaN for tokens with no place."""
        out = np.full((self.n_tokens, 4), np.nan)
        out[self.grid.reshape(-1)] = self.grid_boxes.reshape(-1, 4)
        out[self.global_index] = self.global_boxes
        return out

    def to_map(self, scores: np.ndarray) -> np.ndarray:
        """Per-token scores (n_tokens,) -> one (R, C) map on the grid.

        Global-view tokens (LLaVA-NeXT's 24x24 base view, InternVL's thumbnail) see the
        same pixels as the grid at lower resolution. Each one's score is spread over the
        grid cells it overlaps in proportion to the overlap area, so the map keeps the
        total saliency mass (the component score of Eq. 6 is a sum) and a location is
        salient if either resolution found it relevant.
        """
        scores = np.asarray(scores, dtype=np.float64)
        out = scores[self.grid].copy()
        if self.global_index.size:
            folded = self._fold_lattice(scores[self.global_index])
            out += self._fold_pairs(scores[self.global_index]) if folded is None else folded
        return out

    def _fold_pairs(self, g_scores: np.ndarray) -> np.ndarray:
        """The global tokens' scores spread over the grid by overlap area, every token
        against every cell: (G, R*C) overlaps."""
        cells = self.grid_boxes.reshape(-1, 4)
        g = self.global_boxes
        iw = np.clip(
            np.minimum(g[:, None, 2], cells[None, :, 2]) - np.maximum(g[:, None, 0], cells[None, :, 0]), 0, None
        )
        ih = np.clip(
            np.minimum(g[:, None, 3], cells[None, :, 3]) - np.maximum(g[:, None, 1], cells[None, :, 1]), 0, None
        )
        overlap = iw * ih
        total = overlap.sum(axis=1, keepdims=True)
        weights = np.divide(overlap, total, out=np.zeros_like(overlap), where=total > 0)
        return (g_scores @ weights).reshape(self.grid.shape)

    def _fold_lattice(self, g_scores: np.ndarray) -> np.ndarray | None:
        """:meth:`_fold_pairs` where the global tokens and the grid cells each form a lattice
        (a box's x-extent set by its column, its y-extent by its row), as every adapter's do:
        an overlap area is then an x-overlap times a y-overlap, and the fold is two small
        matrix products, ``Wy.T @ S @ Wx`` (LLaVA-1.6 at 1024 px: 0.6 ms instead of 11.6 per view).
        ``None`` where the boxes are not such a lattice."""
        g, cells = self.global_boxes, self.grid_boxes
        xs, col = np.unique(g[:, [0, 2]], axis=0, return_inverse=True)
        ys, row = np.unique(g[:, [1, 3]], axis=0, return_inverse=True)
        col, row = col.reshape(-1), row.reshape(-1)
        if xs.shape[0] * ys.shape[0] != g.shape[0] or np.unique(row * xs.shape[0] + col).size != g.shape[0]:
            return None
        cx, cy = cells[0, :, [0, 2]].T, cells[:, 0, [1, 3]]  # per column (C, 2), per row (R, 2)
        if not ((cells[..., [0, 2]] == cx).all() and (cells[..., [1, 3]] == cy[:, None]).all()):
            return None

        def spread(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # (n, m) overlaps, each row / its sum
            o = np.clip(np.minimum(a[:, None, 1], b[None, :, 1]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
            total = o.sum(axis=1, keepdims=True)
            return np.divide(o, total, out=np.zeros_like(o), where=total > 0)

        s = np.zeros((ys.shape[0], xs.shape[0]))
        s[row, col] = g_scores
        return spread(ys, cy).T @ s @ spread(xs, cx)


class _StopForward(Exception):
    """Raised by the logit-lens hook once layer L has run, to skip the layers above it."""

    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


@contextlib.contextmanager
def capture_layer_output(layer: torch.nn.Module) -> Iterator[None]:
    """Stop the forward pass after ``layer`` and carry its output out in ``_StopForward``.

    The hook is removed in ``finally``, so no hook survives an exception.
    """

    def hook(_module, _inputs, output):
        raise _StopForward(output[0] if isinstance(output, tuple) else output)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# the keyword of the KV cache: transformers 5.24 renamed ``past_key_values`` to ``cache`` in
# the models' forward, in ``generate`` and in the decoder layers (the old name is deprecated
# there, to be removed in 5.40); earlier versions know only the old one
CACHE_KEYS = ("cache", "past_key_values")


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword ``model``'s forward (and ``generate``) take a KV cache under."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned (``out.cache`` from transformers 5.24, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@contextlib.contextmanager
def recompute_in_backward(
    layers: Sequence[torch.nn.Module], enabled: bool = True, lean: bool = False
) -> Iterator[None]:
    """Activation checkpointing of each of ``layers`` for the passes run inside: a layer keeps
    only its input for the backward and recomputes the rest there (non-reentrant
    ``torch.utils.checkpoint``, so ``torch.autograd.grad`` to the visual leaves works). Each
    layer so wrapped holds one hidden state per token instead of its activations, for one
    more forward of that layer. The layers' ``forward`` is restored in ``finally`` (the class's,
    or an instance ``forward`` a hook had set).

    A pass that fills a FRESH KV cache (``Prefix``) stays exact: the recomputation runs
    without the cache (which already holds the layer's keys and values from the forward;
    appending them again would corrupt it), and a prefill's attention over its own keys is
    the same with or without an empty cache in front of them.

    ``lean``: the layer's forward and its recomputation both keep lean activations
    (:func:`egg_eval.backbones.lean.lean_activations`), so the recomputation saves the very
    tensors the forward did, as the checkpoint requires."""
    if not enabled or not layers:
        yield
        return
    before = [(layer, vars(layer).get("forward")) for layer in layers]  # an instance forward already set
    for layer in layers:
        original = layer.forward

        def forward(*args, _f=original, _layer=layer, **kwargs):
            first = True

            def run(*a, **k):
                nonlocal first
                if not first:  # the recomputation
                    k = {**k, **{key: None for key in CACHE_KEYS if key in k}}
                first = False
                with lean_activations(_layer, lean):
                    return _f(*a, **k)

            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
    try:
        yield
    finally:
        restore_forward(before)


class Backbone:
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
        tower = getattr(inner, "vision_tower", None) or getattr(inner, "visual", None)
        if tower is not None:
            tower.register_forward_pre_hook(self._count_tower)
            tower.register_forward_hook(self._end_tower_range, always_call=True)
        self._tower_range: Any = None
        self.revision: str | None = None
        self.source: str | None = None  # the hub id or directory it was loaded from
        self.weights_digest: str | None = None  # of a local directory's files (see weights_digest)

    def _count_tower(self, _module, _args) -> None:
        self.counters.n_tower += 1
        self._tower_range = phase("tower")
        self._tower_range.__enter__()

    def _end_tower_range(self, _module, _args, _output) -> None:
        if self._tower_range is not None:
            self._tower_range.__exit__(None, None, None)
            self._tower_range = None

    # ----------------------------------------------------------------- loading
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
    ) -> Backbone:
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

    # --------------------------------------------------------------- prompting
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

    def visual_leaves(self, enc: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Projected visual embeddings as detached leaves that require grad (vision tower without grad)."""
        with torch.no_grad():
            feats = self._image_features(enc)
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

    def activation_bytes_per_token(self, layer: int | None = None, lean: bool = False) -> int:
        """Estimated bytes one prompt token keeps alive for the grounding backward through the
        first ``layer`` decoder layers (None = all), with or without ``lean`` activations
        (:mod:`egg_eval.backbones.lean`).

        Parameters need no gradient, so autograd keeps no input of a linear layer. Per layer
        what stays is: the two RMSNorms' float32 inputs (4 h in bf16 elements, an overcount of a
        float32 model's 2 h that covers the few tensors kept once per token, not per layer; 2 h
        when lean, which keeps the input in the model's dtype), the attention's q and
        output (2 q) and k and v (2 kv), the MLP's gate, activation and up (3 i; 2 i when lean:
        gate and up), and where the attention normalises q and k (Qwen3, InternVL-3.5) their
        norms' inputs (2 q + 2 kv, halved as the other norms'). h: hidden width, q: heads x
        head_dim, kv: key-value heads x head_dim, i: MLP width. Times 1.1 for the allocator and
        the backward's own buffers.

        Checked at the published widths (bf16, CPU, tensors autograd saved per token and layer,
        the difference between 1 and 2 layers; ``scripts/activation_check.py``), as it is and
        lean: LLaVA-1.5 131,720 B (formula 131,584) and 93,312 (93,184), LLaVA-1.6 139,400
        (139,264) and 94,336 (94,208), Qwen2.5-VL 158,840 (158,720) and 106,608 (106,496),
        InternVL-3.5 147,752 (147,456) and 96,384 (96,256). On an H100 LLaVA-1.5's grounding
        passes (not lean) held 141-144 KB per token and layer above the model, within this
        estimate's 145 KB."""
        return self._kept_bytes(self.layers_run(layer), lean)

    def _kept_bytes(self, layers: int, lean: bool) -> int:
        """Per token: what ``layers`` decoder layers and the pass itself keep, times 1.1."""
        per_layer, once = self._saved_elements(lean)
        return int(1.1 * (layers * per_layer + once) * self.dtype.itemsize)

    def _saved_elements(self, lean: bool) -> tuple[int, int]:
        """Per token, in model-dtype elements: what each decoder layer keeps for the backward
        (:meth:`activation_bytes_per_token`) and what the pass keeps once, whatever its depth:
        the final norm's float32 input (2 h; h lean) and the rotary tables' cos and sin
        (2 head_dim)."""
        cfg = self.model.config.get_text_config()
        h, heads = cfg.hidden_size, cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or h // heads
        q = heads * head_dim
        kv = (getattr(cfg, "num_key_value_heads", None) or heads) * head_dim
        i = getattr(cfg, "intermediate_size", None) or 4 * h
        first = self.decoder_layers[0]
        norm_copy = 1 if lean else 2  # the float32 copy, in bf16 elements (on a float32 model: an overcount)
        gated = 2 if lean and lean_mlp(first.mlp) else 3
        per_layer = 2 * h * norm_copy + 2 * q + 2 * kv + gated * i
        if getattr(first.self_attn, "q_norm", None) is not None:
            per_layer += (q + kv) * norm_copy
        return per_layer, h * norm_copy + 2 * head_dim

    def recomputed_bytes_per_token(self) -> int:
        """What one recomputed decoder layer (:func:`recompute_in_backward`) keeps per token
        instead of its activations: its input hidden state (h elements; the masks and rotary
        tables it also takes are the same tensors for every layer). Times 1.1, as above."""
        return int(1.1 * self.model.config.get_text_config().hidden_size * self.dtype.itemsize)

    def pass_activation_bytes(
        self, n_tokens: int, layer: int | None = None, recomputed: int = 0, lean: bool = False
    ) -> int:
        """Estimated activation bytes a grounding pass over ``n_tokens`` prompt tokens holds at
        its peak when its first ``recomputed`` decoder layers are recomputed in the backward
        (and its activations are ``lean`` or not).

        The later layers' activations stay until the backward reaches them and are freed as
        it goes; when it reaches the recomputed layers only their inputs are left, plus the
        one layer being recomputed. So the peak is ``max(n - r, 1 if r else 0)`` layers'
        activations plus ``r`` hidden states, per token, besides what the pass keeps once."""
        held = max(self.layers_run(layer) - recomputed, 1 if recomputed else 0)
        return n_tokens * (self._kept_bytes(held, lean) + recomputed * self.recomputed_bytes_per_token())

    def most_recomputed(self, layer: int | None) -> int:
        """The layers a pass that is to hold the least recomputes: all it runs but the last.
        Recomputing the last too would hold one more hidden state per token and free nothing
        (its activations are the first the backward needs; on CPU, real LLaVA-1.5 widths with 4
        layers, 598 tokens, fp32, the peak resident memory rose by 0.18-0.23 MB per token)."""
        return max(self.layers_run(layer) - 1, 0)

    def memory_plan(
        self, n_tokens: int, layer: int | None, budget: float | None, lean: bool | None = None
    ) -> MemoryPlan | None:
        """The cheapest way a grounding pass over ``n_tokens`` tokens keeps within ``budget``
        activation bytes: as it is where it fits (or there is no budget); else lean activations
        (elementwise work again in the backward, about a third less held) and the fewest
        leading decoder layers recomputed (each one more forward of that layer) that bring it
        within; ``None`` when it does not fit even lean with :meth:`most_recomputed` layers
        recomputed. ``lean`` True or False (``method.lean_activations``) instead makes every
        plan lean, or none."""
        if lean is None:
            lean = not (budget is None or self.pass_activation_bytes(n_tokens, layer) <= budget)
        if budget is None:
            return MemoryPlan(lean=lean)
        plans = range(self.most_recomputed(layer) + 1)
        r = next((r for r in plans if self.pass_activation_bytes(n_tokens, layer, r, lean) <= budget), None)
        return None if r is None else MemoryPlan(lean=lean, recompute=r)

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
        (:meth:`most_recomputed`; method.checkpoint_layers); see :func:`recompute_in_backward`.
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

    # ---------------------------------------------------------------- decoding
    def decoding(self) -> dict[str, Any]:
        """``generate``'s settings for every answer: greedy, one beam, no sampling settings.
        What the checkpoint's generation config sets besides sampling still applies, as in a
        plain ``generate`` call (lmms-eval's): Qwen2.5-VL-7B-Instruct's sets a repetition
        penalty of 1.05, which divides the logit of every token already in the prompt;
        ``repetition_penalty`` (1.0: none) overrides it."""
        kw: dict[str, Any] = {"do_sample": False, "num_beams": 1, "top_p": None, "top_k": None, "temperature": None}
        if self.repetition_penalty is not None:
            kw["repetition_penalty"] = self.repetition_penalty
        return kw

    def effective_decoding(self) -> dict[str, Any]:
        """The decoding settings the answers get, the checkpoint's own included (for the summary)."""
        gc = getattr(self.model, "generation_config", None)
        penalty = self.repetition_penalty
        if penalty is None:
            penalty = getattr(gc, "repetition_penalty", None) or 1.0
        return {"greedy": True, "repetition_penalty": float(penalty), "max_new_tokens": self.max_new_tokens}

    @torch.no_grad()
    def greedy_tokens(self, enc: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        """Greedy-decode ``n`` tokens (1, n) from ``enc`` (one forward per token)."""
        if n <= 0:
            return torch.zeros((1, 0), dtype=torch.long, device=self.device)
        out = self.model.generate(**self.model_inputs(enc), max_new_tokens=n, min_new_tokens=n, **self.decoding())
        new = out[:, enc["input_ids"].shape[1] :]
        self.counters.n_forward += int(new.shape[1])
        return new

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

    # ------------------------------------------------------ reused prompt prefix
    def new_cache(self) -> Any:
        """An empty KV cache for one prompt of this model's language model."""
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config.get_text_config())

    def prefix_length(self, enc: dict[str, torch.Tensor], features, prefix: Prefix | None) -> int:
        """How many leading tokens of ``enc`` (one prompt whose first image is the one
        ``prefix`` was computed on, ``features`` its images' embeddings) the prefix's cache
        holds: their common start with the cached prompt, used only if it takes in every token
        of the first image and leaves at least one token to run; else 0. The later images'
        tokens never fall in it (the cached prompt had one image). Also 0 where a layer with a
        sliding attention window (a Mistral checkpoint that sets one) has held a window's worth
        of tokens: it has dropped its oldest keys, and its cache can no longer be cut back."""
        if prefix is None or features is None or len(features) < 2:
            return 0
        if any(
            getattr(layer, "is_sliding", False) and layer.get_seq_length() >= layer.sliding_window
            for layer in prefix.cache.layers
        ):
            return 0
        ids = enc["input_ids"][0]
        ref = prefix.input_ids.to(ids.device)
        n = min(ids.shape[0] - 1, prefix.length, ref.shape[0])
        differ = (ids[:n] != ref[:n]).nonzero()
        p = int(differ[0, 0]) if differ.shape[0] else n
        first = sum(t.numel() // t.shape[-1] for t in features[0])
        image_tokens = int((ids[:p] == self.model.config.image_token_id).sum())
        return p if image_tokens == first == int((ref == self.model.config.image_token_id).sum()) else 0

    def _on_prefix(self, enc, features, prefix: Prefix, p: int) -> dict[str, Any]:
        """``generate``'s inputs for ``enc`` continuing from the first ``p`` tokens in ``prefix``'s
        cache: the whole prompt's ids and mask (``generate`` runs the uncached ones), the later
        images' embeddings, the cache cut back to ``p``."""
        prefix.cache.crop(p - prefix.cache.get_seq_length())
        prefix.length = p
        self.counters.prefix_tokens += p
        return dict(self.inputs_with_features(enc, features[1:]), **{self.cache_keyword: prefix.cache})

    def _forward_on_prefix(self, enc, features, prefix: Prefix, p: int) -> dict[str, Any]:
        """A plain forward's inputs for the same continuation: only the uncached tokens."""
        kw = self._on_prefix(enc, features, prefix, p)
        for k in ("input_ids", "mm_token_type_ids"):
            if k in kw:
                kw[k] = kw[k][:, p:]
        return kw

    @torch.no_grad()
    @in_phase("answer")
    def answer(
        self,
        images: Sequence[Image.Image],
        text: str,
        max_new_tokens: int | None = None,
        features: Sequence[Sequence[torch.Tensor]] | None = None,
        prefix: Prefix | None = None,
    ) -> str:
        """Greedy answer from ``images`` (whole image first, then crops) as real images in one
        prompt; ``features`` (one entry per image) reuses their already computed embeddings;
        ``prefix`` (the first image's grounding pass, with ``features``) spares the answer's
        prefill the tokens through that image."""
        t0 = time.perf_counter()
        enc = self._encode_for(images, text, features)
        p = self.prefix_length(enc, features, prefix)
        out = self.model.generate(
            **(self._on_prefix(enc, features, prefix, p) if p else self.inputs_with_features(enc, features)),
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            **self.decoding(),
        )
        new = out[0, enc["input_ids"].shape[1] :]
        self.counters.n_forward += max(1, int(new.shape[0]))
        self.counters.time_answer_s += time.perf_counter() - t0
        return self.processor.tokenizer.decode(new, skip_special_tokens=True).strip()

    @torch.no_grad()
    @in_phase("answer")
    def option_losses(
        self,
        images: Sequence[Image.Image],
        text: str,
        options: Sequence[str],
        features: Sequence[Sequence[torch.Tensor]] | None = None,
        prefix: Prefix | None = None,
    ) -> list[float]:
        """Mean token negative log-likelihood of each option's text as the assistant's answer
        (V*'s official protocol picks the option with the lowest).

        The prompt runs once, into a KV cache (continuing ``prefix``'s where it can, see
        :meth:`answer`); each option then runs only its own tokens on that cache, which is cut
        back to the prompt afterwards. Same losses as a full forward per option (tested), for
        one prompt's compute instead of one per option."""
        t0 = time.perf_counter()
        enc = self._encode_for(images, text, features)
        if features is None:  # embed the images once, not once per option
            features = [[f] for f in self._image_features(enc)]
        p = self.prefix_length(enc, features, prefix)
        kw = self._forward_on_prefix(enc, features, prefix, p) if p else self.inputs_with_features(enc, features)
        prompt = self.model(**kw, use_cache=True, logits_to_keep=1)
        self.counters.n_forward += 1
        first, cache = prompt.logits[0, -1:].float(), output_cache(prompt)
        tok = self.processor.tokenizer
        out = []
        for opt in options:
            ids = tok(" " + str(opt).strip(), add_special_tokens=False, return_tensors="pt").input_ids.to(self.device)
            if ids.shape[1] == 0:
                out.append(float("inf"))
                continue
            logits = first
            if ids.shape[1] > 1:  # the option's own tokens predict its next ones
                rest = self.model(input_ids=ids[:, :-1], **{self.cache_keyword: cache}, use_cache=True)
                rest = rest.logits[0].float()
                cache.crop(1 - ids.shape[1])  # a negative count removes that many last tokens
                self.counters.n_forward += 1
                logits = torch.cat([first, rest])
            out.append(float(torch.nn.functional.cross_entropy(logits, ids[0])))
        self.counters.time_answer_s += time.perf_counter() - t0
        return out

    @torch.no_grad()
    def first_token_max_prob(self, images: Sequence[Image.Image], text: str) -> float:
        """Max probability of the first answer token given all ``images`` (the confidence rule)."""
        enc = self.encode(images, text)
        self.counters.n_forward += 1
        logits = self.model(**self.model_inputs(enc), use_cache=False, logits_to_keep=1).logits[0, -1].float()
        return float(torch.softmax(logits, dim=-1).max())

    # ------------------------------------------------------------------ layout
    def token_boxes(self, enc: dict[str, torch.Tensor], image_index: int, image_size: tuple[int, int]):
        """Per-token boxes (N, 4) in the image's pixels and groups (N,) for image ``image_index``."""
        raise NotImplementedError

    def token_layout(self, enc: dict[str, torch.Tensor], image_index: int, image_size: tuple[int, int]) -> TokenLayout:
        boxes, groups = self.token_boxes(enc, image_index, image_size)
        return TokenLayout.from_token_boxes(boxes, groups, image_size)


def concat_encodings(encs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Encodings of matching shapes as one batch: tensors concatenated along dim 0 in order
    (rows, or images for per-image keys), lists joined."""
    return {
        k: torch.cat([e[k] for e in encs]) if isinstance(encs[0][k], torch.Tensor) else [x for e in encs for x in e[k]]
        for k in encs[0]
    }


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_digest(path: str | Path, chunks: int = 32, chunk_bytes: int = 1 << 16) -> str:
    """sha256 over a checkpoint directory's config and weight files: each file's name and
    size, then the whole file if it is small, else ``chunks`` blocks spread evenly from its
    first to its last byte (about 2 MiB read per file, so a 16 GB model is fingerprinted in
    well under a second). A retrained or fine-tuned checkpoint changes the bytes of nearly
    every tensor and so the digest; it is a change detector for resume, not a signature."""
    root = Path(path)
    h = hashlib.sha256()
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json")
    )
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.relative_to(root).as_posix()}\0{size}\0".encode())
        with open(p, "rb") as f:
            if size <= chunks * chunk_bytes:
                h.update(f.read())
                continue
            for i in range(chunks):
                f.seek((size - chunk_bytes) * i // (chunks - 1))
                h.update(f.read(chunk_bytes))
    return h.hexdigest()


def use_cudnn_attention(on: bool) -> None:
    """Whether ``scaled_dot_product_attention`` may pick cuDNN's attention kernels (a
    process-wide PyTorch switch; ``backbone.sdpa_cudnn``). Off by default. PyTorch >= 2.10
    prefers them on Hopper and Blackwell once its bundled cuDNN is newer than 9.15, and cuDNN
    builds a graph for each new shape; in a benchmark run nearly every call has a new length
    (each question, each view's token count, each decoding step). On an H200 (torch 2.11) EGG
    took 1.38 s per LLaVA-1.6 sample with them and 0.80 s without, the plain model 0.19 s and
    0.13 s (``results/bench/h200_2026-12-04``). Off, SDPA takes flash or memory-efficient
    attention, which need no per-shape build. Results are equal up to float rounding."""
    torch.backends.cuda.enable_cudnn_sdp(bool(on))


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """``auto``: CUDA when present; bfloat16 on GPU, float32 on CPU."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, getattr(torch, dtype)


def cell_boxes(rows: int, cols: int, cell_w: float, cell_h: float) -> np.ndarray:
    """Row-major (rows*cols, 4) boxes of a regular grid of ``cell_w`` x ``cell_h`` cells."""
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.stack([c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h], axis=1).astype(np.float64)


def affine(boxes: np.ndarray, scale_x: float, scale_y: float, off_x: float = 0.0, off_y: float = 0.0) -> np.ndarray:
    """Map canvas boxes back to image pixels: ``x = (u - off_x) / scale_x``."""
    out = np.asarray(boxes, dtype=np.float64).copy()
    out[..., [0, 2]] = (out[..., [0, 2]] - off_x) / scale_x
    out[..., [1, 3]] = (out[..., [1, 3]] - off_y) / scale_y
    return out
