"""The view-grounding engine: "ground every view" of Alg. 1, as fast and as lean as it can run.

:class:`ViewGrounder` takes the views of a round (boxes in the original image) and returns each
one's map, components and spatial entropy. How (none of it changes a result): a view already
grounded is taken from the cache by its box; a round's new views go in one batched pass
(``execution.batch_views``); a pass is held to the activation budget
(``execution.activation_memory_gb``: lean activations, then recomputed layers); a pass that runs
out of accelerator memory is redone with less (the batch one view at a time, then a view with its
layers recomputed); the whole image's pass keeps its KV cache and every view its embeddings for
the answer (``execution.reuse_prefix``, ``reuse_features``).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from egg_eval.backbones.base import Backbone
from egg_eval.backbones.prefix import Prefix
from egg_eval.grounding.regions import Component, components, spatial_entropy
from egg_eval.grounding.saliency import Grounding, token_saliency, token_saliency_batch
from egg_eval.grounding.settings import EggConfig, ExecutionConfig
from egg_eval.phases import in_phase
from egg_eval.types import Box

AUTO_ACTIVATION_FRACTION = 0.4  # of the weights' bytes; leaves room for the answer pass's KV cache


def activation_budget(setting: float | str | None, backbone) -> float | None:
    """Bytes of activations a grounding pass may hold under ``execution.activation_memory_gb``."""
    if setting is None:
        return None
    if setting == "auto":
        if getattr(backbone, "device", None) is None or backbone.device.type != "cuda":
            return None
        return AUTO_ACTIVATION_FRACTION * backbone.weight_bytes
    return float(setting) * 2**30


@dataclass
class ViewMap:
    """One view's grounding (Eq. 1-4), its components in the view's pixels (Eq. 5-6) and the
    spatial entropy of its mask (Eq. 7-8)."""

    grounding: Grounding
    components: list[Component]
    entropy: float


class ViewGrounder:
    """Grounds the views of one image and question, each once. ``saliency_fn``: the map of one
    view (a test's scripted maps in place of :func:`token_saliency`)."""

    # every round grounds each of its views again, as Alg. 1 reads literally
    # (egg_eval.bench.undone.no_map_cache sets it, to show what the cache saves)
    reground: bool = False

    def __init__(
        self,
        backbone: Backbone,
        image: Image.Image,
        question: str,
        config: EggConfig,
        execution: ExecutionConfig | None = None,
        saliency_fn: Callable[..., Grounding] = token_saliency,
    ):
        self.backbone, self.image, self.question, self.config = backbone, image, question, config
        self.execution = execution or ExecutionConfig()
        self.saliency_fn = saliency_fn
        self.whole = Box.of_image(*image.size)
        self.cache: dict[tuple, ViewMap] = {}
        self.memory_budget = activation_budget(self.execution.activation_memory_gb, backbone)

    def crop(self, box: Box) -> Image.Image:
        return self.image if box == self.whole else self.image.crop(tuple(int(v) for v in box.as_list()))

    def __call__(self, views: list[Box]) -> list[ViewMap]:
        """Every view's map, its new ones grounded in one batched pass where it can; a batch
        that runs out of accelerator memory is redone one view at a time."""
        first = self.cache.get(tuple(self.whole.as_list()))
        if self.reground:
            for b in views:
                self.cache.pop(tuple(b.as_list()), None)
        todo = list(dict.fromkeys(tuple(b.as_list()) for b in views if tuple(b.as_list()) not in self.cache))
        ex = self.execution
        if len(todo) > 1 and ex.batch_views and self.saliency_fn is token_saliency:
            boxes = [Box(*k) for k in todo]
            images = [self.crop(b) for b in boxes]
            kw = self._saliency_kw(ex.checkpoint_layers)
            batch = self._unless_out_of_memory(lambda: token_saliency_batch(self.backbone, images, self.question, **kw))
            for box, g in zip(boxes, batch or []):
                self._store(box, g)
        out = [self._ground_one(b) for b in views]
        again = self.cache.get(tuple(self.whole.as_list()))
        if first is not None and again is not None and again.grounding.prefix is None:
            again.grounding.prefix = first.grounding.prefix  # grounded again: its first pass's cache serves
        return out

    def _saliency_kw(self, recompute_layers: bool) -> dict:
        c, ex = self.config, self.execution
        return dict(
            objective=c.objective,
            token_index=c.token_index,
            layer=c.layer,
            recompute_layers=recompute_layers,
            memory_budget=self.memory_budget,
            lean=None if ex.lean_activations == "auto" else ex.lean_activations,
        )

    def _unless_out_of_memory(self, attempt: Callable[[], object]):
        """``attempt()``, or ``None`` when it ran out of accelerator memory: the fallback is
        counted and the failed pass's memory handed back (after the ``except`` block, so that
        the traceback no longer holds its tensors) before the caller retries with less."""
        try:
            return attempt()
        except torch.OutOfMemoryError:
            pass
        self.backbone.counters.memory_fallbacks += 1
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None

    def _ground_one(self, box: Box) -> ViewMap:
        """One view's map; a pass that runs out of accelerator memory is redone with its decoder
        layers recomputed in the backward (same map, about one layer's activations held). Only if
        that fails too does the error reach the runner, which records the sample as failed."""
        key = tuple(box.as_list())
        if key not in self.cache:
            image, ex = self.crop(box), self.execution
            kw = {}
            if box == self.whole and self.saliency_fn is token_saliency:
                kw["keep_prefix"] = ex.reuse_prefix and ex.reuse_features

            def ground(recompute: bool) -> Grounding:
                return self.saliency_fn(self.backbone, image, self.question, **self._saliency_kw(recompute), **kw)

            g = None if ex.checkpoint_layers else self._unless_out_of_memory(lambda: ground(False))
            self._store(box, g if g is not None else ground(True))
        return self.cache[key]

    @in_phase("regions")
    def _store(self, box: Box, g: Grounding) -> ViewMap:
        regions = self.config.regions
        comps, mask = components(g.map, g.layout.grid_boxes, Box(0, 0, box.width, box.height), regions)
        self.cache[tuple(box.as_list())] = out = ViewMap(g, comps, spatial_entropy(mask, regions.connectivity))
        return out

    def features(self, views: list[Box]):
        """The cached visual embeddings of ``views`` (all grounded), else None: the answer
        pass then encodes the pixels itself (e.g. the fixed rule's last, ungrounded crops)."""
        feats = [self.cache.get(tuple(v.as_list())) for v in views]
        if any(f is None or f.grounding.features is None for f in feats):
            return None
        return [f.grounding.features for f in feats]

    def prefix(self, views: list[Box]) -> Prefix | None:
        """The whole image's grounding-pass cache, for an answer whose first view it is."""
        result = self.cache.get(tuple(self.whole.as_list()))
        return result.grounding.prefix if result is not None and views and views[0] == self.whole else None
