"""Iterative refinement (paper Sec. 3.4, Alg. 1) and the final answer.

    views_0 = {I};  H_prev = +inf
    for t in 0..T-1:
        ground every view (a view already grounded is taken from the cache)
        rank all components of all views by w (Eq. 6); keep the top K
        H_t = spatial entropy (Eq. 7-8) of the mask of the view holding the best component
        spatial_entropy rule: if H_t >= H_prev: stop and return views_t
        views_{t+1} = {I} + crops of the K kept components (each cut from its own view)

Which crops are kept on stop: under ``spatial_entropy`` the views returned are those of
the round whose entropy did not decrease, i.e. the crops made in the round before it
(Alg. 1 returns I_t); the K components of that last round are NOT cropped. Under
``confidence`` the crops of the round that lowered the first token's max probability
are dropped and the previous view set is returned. Under ``fixed`` exactly N rounds
crop. Every rule also stops when no view yields a component, or at ``max_rounds``.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from PIL import Image

from egg_eval.backbones.base import Backbone
from egg_eval.backbones.prefix import Prefix
from egg_eval.data.prompts import split_options
from egg_eval.grounding.regions import components, spatial_entropy
from egg_eval.grounding.saliency import Grounding, token_saliency, token_saliency_batch
from egg_eval.grounding.settings import EggConfig
from egg_eval.phases import in_phase
from egg_eval.types import Box, Region, Round, Trace

AUTO_ACTIVATION_FRACTION = 0.4  # of the weights' bytes; leaves room for the answer pass's KV cache


def activation_budget(setting: float | str | None, backbone) -> float | None:
    """Bytes of activations a grounding pass may hold under ``activation_memory_gb``."""
    if setting is None:
        return None
    if setting == "auto":
        if getattr(backbone, "device", None) is None or backbone.device.type != "cuda":
            return None
        return AUTO_ACTIVATION_FRACTION * backbone.weight_bytes
    return float(setting) * 2**30


@dataclass
class _ViewResult:
    grounding: Grounding
    components: list  # regions.Component, view pixels
    entropy: float


class Refiner:
    """Runs Alg. 1 for one image and question; caches each view's grounding by its box."""

    def __init__(
        self,
        backbone: Backbone,
        image: Image.Image,
        question: str,
        config: EggConfig,
        saliency_fn: Callable[..., Grounding] = token_saliency,
    ):
        self.backbone, self.image, self.question, self.config = backbone, image, question, config
        self.saliency_fn = saliency_fn
        self.whole = Box.of_image(*image.size)
        self.cache: dict[tuple, _ViewResult] = {}
        self.memory_budget = activation_budget(config.activation_memory_gb, backbone)

    def crop(self, box: Box) -> Image.Image:
        return self.image if box == self.whole else self.image.crop(tuple(int(v) for v in box.as_list()))

    def _saliency_kw(self, recompute_layers: bool) -> dict:
        c = self.config
        return dict(
            objective=c.objective,
            token_index=c.token_index,
            layer=c.layer,
            recompute_layers=recompute_layers,
            memory_budget=self.memory_budget,
            lean=None if c.lean_activations == "auto" else c.lean_activations,
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

    def ground_view(self, box: Box) -> _ViewResult:
        """One view's grounding; a pass that runs out of accelerator memory is redone with
        its decoder layers recomputed in the backward (same map, about one layer's
        activations held). Only if that fails too does the error reach the runner, which
        records the sample as failed."""
        key = tuple(box.as_list())
        if key not in self.cache:
            image = self.crop(box)

            kw = {}
            if box == self.whole and self.saliency_fn is token_saliency:
                kw["keep_prefix"] = self.config.reuse_prefix and self.config.reuse_features

            def ground(recompute: bool) -> Grounding:
                return self.saliency_fn(self.backbone, image, self.question, **self._saliency_kw(recompute), **kw)

            g = None if self.config.checkpoint_layers else self._unless_out_of_memory(lambda: ground(False))
            self._store(box, g if g is not None else ground(True))
        return self.cache[key]

    def ground_views(self, boxes: list[Box]) -> list[_ViewResult]:
        """Ground every view not yet in the cache, in one batched pass where possible; a
        batch that runs out of accelerator memory is redone one view at a time."""
        c = self.config
        todo = list(dict.fromkeys(tuple(b.as_list()) for b in boxes if tuple(b.as_list()) not in self.cache))
        if len(todo) > 1 and c.batch_views and self.saliency_fn is token_saliency:
            todo_boxes = [Box(*k) for k in todo]
            images = [self.crop(b) for b in todo_boxes]
            kw = self._saliency_kw(c.checkpoint_layers)
            groundings = self._unless_out_of_memory(
                lambda: token_saliency_batch(self.backbone, images, self.question, **kw)
            )
            for box, g in zip(todo_boxes, groundings or []):
                self._store(box, g)
        return [self.ground_view(b) for b in boxes]

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

    @in_phase("regions")
    def _store(self, box: Box, g: Grounding) -> _ViewResult:
        c = self.config
        bounds = Box(0, 0, box.width, box.height)
        comps, mask = components(g.map, g.layout.grid_boxes, bounds, c.regions)
        result = _ViewResult(g, comps, spatial_entropy(mask, c.regions.connectivity))
        self.cache[tuple(box.as_list())] = result
        return result

    def run(self) -> Trace:
        c = self.config
        trace = Trace(image_size=self.image.size)
        views = [self.whole]
        h_prev, conf_prev, prev_views = math.inf, -math.inf, views
        limit = min(c.n_rounds, c.max_rounds) if c.stopping == "fixed" else c.max_rounds
        for _ in range(limit):
            conf = None
            if c.stopping == "confidence":
                conf = self.backbone.first_token_max_prob([self.crop(v) for v in views], self.question)
                if conf < conf_prev:
                    trace.stop_reason, views = "confidence_fell", prev_views
                    break
                conf_prev = conf
            results = self.ground_views(views)
            ranked = sorted(
                (
                    Region(i, comp.box.shift(v.x0, v.y0), comp.score, comp.n_tokens)
                    for i, (v, r) in enumerate(zip(views, results))
                    for comp in r.components
                ),
                key=lambda r: -r.score,
            )
            selected = ranked[: c.regions.top_k]
            h_t = results[selected[0].view].entropy if selected else math.inf
            maps = [(r.grounding.map, r.grounding.layout.grid_boxes) for r in results]
            trace.rounds.append(Round(list(views), ranked, selected, h_t, conf, maps))
            if not selected:
                trace.stop_reason = "no_region"
                break
            if c.stopping == "spatial_entropy" and h_t >= h_prev:  # Alg. 1: stop on H_t >= H_prev
                trace.stop_reason = "entropy_rose" if h_t > h_prev else "entropy_tied"
                break
            h_prev, prev_views = h_t, views
            views = [self.whole] + [r.box for r in selected]
        else:
            trace.stop_reason = "fixed" if c.stopping == "fixed" else "max_rounds"
        trace.final_views = views
        return trace


def refine(backbone: Backbone, image: Image.Image, question: str, config: EggConfig | None = None) -> Trace:
    """Alg. 1 on ``image``: the trace, whose ``final_views`` are the whole image + crops."""
    return Refiner(backbone, image, question, config or EggConfig()).run()


def _view_images(backbone: Backbone, image: Image.Image, views: list[Box], features=None):
    whole = Box.of_image(*image.size)
    crops = [image if v == whole else image.crop(tuple(int(x) for x in v.as_list())) for v in views]
    if backbone.max_images is not None:
        crops = crops[: backbone.max_images]
        features = features[: backbone.max_images] if features is not None else None
    return crops, features


def answer_with_views(
    backbone: Backbone, image: Image.Image, question: str, views: list[Box], features=None, prefix=None
) -> str:
    """The answer from the whole image + crops, each a real image through the processor;
    ``features`` (per view, from grounding) spares the vision tower a second pass, ``prefix``
    (the whole image's grounding cache) the prefill of the prompt through the whole image."""
    crops, features = _view_images(backbone, image, views, features)
    return backbone.answer(crops, question, features=features, prefix=prefix)


def run_egg(
    backbone: Backbone,
    image: Image.Image,
    question: str,
    config: EggConfig | None = None,
    answer: Callable[..., str] = answer_with_views,
) -> tuple[str, Trace]:
    """Refine, then answer from the final views (``answer``: generation, or
    :func:`answer_by_likelihood`). Counters in the trace cover both."""
    backbone.counters.__init__()
    t0 = time.perf_counter()
    config = config or EggConfig()
    refiner = Refiner(backbone, image, question, config)
    trace = refiner.run()
    features = refiner.features(trace.final_views) if config.reuse_features else None
    prefix = refiner.prefix(trace.final_views) if features is not None else None
    text = answer(backbone, image, question, trace.final_views, features=features, prefix=prefix)
    trace.counters = replace(backbone.counters)  # a copy: the backbone's are reset per sample
    trace.counters.time_ground_s = time.perf_counter() - t0 - trace.counters.time_answer_s
    return text, trace


def answer_by_likelihood(
    backbone: Backbone,
    image: Image.Image,
    question: str,
    views: list[Box],
    features=None,
    prefix=None,
    options: tuple[list[str], list[str]] | None = None,
) -> str:
    """V*'s official protocol on the given views: the letter of the option whose text has the
    lowest loss as the answer to the question stem. ``options`` ``(letters, texts)``: the
    options of ``question``, which is then the stem itself; else both are split from
    ``question``'s "(A) ..." lines."""
    stem, letters, texts = (question, *options) if options is not None else split_options(question)
    options = texts
    if not options:
        raise ValueError("likelihood protocol: no '(A) ...' option lines in the question")
    crops, features = _view_images(backbone, image, views, features)
    losses = backbone.option_losses(crops, stem, options, features=features, prefix=prefix)
    return letters[min(range(len(losses)), key=losses.__getitem__)]


def run_vanilla(
    backbone: Backbone, image: Image.Image, question: str, answer: Callable[..., str] = answer_with_views
) -> tuple[str, Trace]:
    """The plain model: the whole image alone."""
    backbone.counters.__init__()
    text = answer(backbone, image, question, [Box.of_image(*image.size)])
    trace = Trace(
        image_size=image.size,
        final_views=[Box.of_image(*image.size)],
        stop_reason="vanilla",
        counters=replace(backbone.counters),
    )
    return text, trace
