"""Iterative refinement (paper Sec. 3.4, Alg. 1), then the answer.

The loop reads as Alg. 1 does; how a round's views are grounded (cache, batching, memory) is
:class:`~egg_eval.grounding.engine.ViewGrounder`'s business, and when to stop a rule's
(:mod:`egg_eval.grounding.stopping`: spatial entropy, confidence, fixed rounds).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from PIL import Image

from egg_eval.backbones.base import Backbone
from egg_eval.grounding.answer import answer_by_likelihood, answer_with_views
from egg_eval.grounding.engine import ViewGrounder, ViewMap
from egg_eval.grounding.settings import EggConfig, ExecutionConfig
from egg_eval.grounding.stopping import RULES, Confidence, Fixed, StoppingRule
from egg_eval.types import Box, Region, Round, Trace

__all__ = [
    "EggConfig",
    "ExecutionConfig",
    "answer_by_likelihood",
    "answer_with_views",
    "refine",
    "rule_for",
    "run_egg",
    "run_vanilla",
]


def rule_for(config: EggConfig, ground: ViewGrounder) -> StoppingRule:
    """``config.stopping``'s rule, for the image and question ``ground`` works on."""
    if config.stopping == "fixed":
        return Fixed(config.n_rounds)
    if config.stopping == "confidence":
        return Confidence(
            lambda views: ground.backbone.first_token_max_prob(list(map(ground.crop, views)), ground.question)
        )
    return RULES[config.stopping]()


def rank(views: list[Box], maps: list[ViewMap]) -> list[Region]:
    """Every component C_ij of every view I_i, in original-image pixels, best w_ij first (Eq. 6)."""
    found = (
        Region(i, comp.box.shift(view.x0, view.y0), comp.score, comp.n_tokens)
        for i, (view, m) in enumerate(zip(views, maps))
        for comp in m.components
    )
    return sorted(found, key=lambda r: -r.score)


def refine(ground: ViewGrounder, config: EggConfig, rule: StoppingRule | None = None) -> Trace:
    """Alg. 1 on ``ground``'s image: the trace, whose ``final_views`` are the whole image + crops."""
    rule = rule or rule_for(config, ground)
    whole = ground.whole
    views, trace = [whole], Trace(image_size=ground.image.size)  # I_0 = {I}
    for t in range(config.max_rounds):  # for t = 0 .. T-1
        if rule.before(t, views):  # (the confidence and fixed rules stop before a round)
            return trace.end(rule.reason, rule.views or views)
        maps = ground(views)  # S_i of every view (Eq. 1-4), each grounded once
        ranked = rank(views, maps)  # all (I_i, C_ij, w_ij), best first (Eq. 5-6)
        top = ranked[: config.regions.top_k]  # the top-K components
        h_t = maps[top[0].view].entropy if top else float("inf")  # H_t of the best one's view (Eq. 7-8)
        pictures = [(m.grounding.map, m.grounding.layout.grid_boxes) for m in maps]
        trace.rounds.append(Round(list(views), ranked, top, h_t, rule.confidence, pictures))
        if not top:  # no view has a component: nothing to crop
            return trace.end("no_region", views)
        if rule.after(t, h_t, views):  # e.g. if H_t >= H_prev: break
            return trace.end(rule.reason, rule.views or views)
        views = [whole] + [r.box for r in top]  # I_{t+1} = {I} + the crops of the top-K
    return trace.end(rule.reason, views)


def run_egg(
    backbone: Backbone,
    image: Image.Image,
    question: str,
    config: EggConfig | None = None,
    answer: Callable[..., str] = answer_with_views,
    execution: ExecutionConfig | None = None,
) -> tuple[str, Trace]:
    """Refine, then answer from the final views (``answer``: generation, or
    :func:`answer_by_likelihood`). Counters in the trace cover both."""
    backbone.counters = type(backbone.counters)()
    t0 = time.perf_counter()
    config, execution = config or EggConfig(), execution or ExecutionConfig()
    ground = ViewGrounder(backbone, image, question, config, execution)
    trace = refine(ground, config)
    features = ground.features(trace.final_views) if execution.reuse_features else None
    prefix = ground.prefix(trace.final_views) if features is not None else None
    text = answer(backbone, image, question, trace.final_views, features=features, prefix=prefix)
    trace.counters = replace(backbone.counters)  # a copy: the backbone's are reset per sample
    trace.counters.time_ground_s = time.perf_counter() - t0 - trace.counters.time_answer_s
    return text, trace


def run_vanilla(
    backbone: Backbone, image: Image.Image, question: str, answer: Callable[..., str] = answer_with_views
) -> tuple[str, Trace]:
    """The plain model: the whole image alone."""
    backbone.counters = type(backbone.counters)()
    whole = Box.of_image(*image.size)
    text = answer(backbone, image, question, [whole])
    return text, Trace(image_size=image.size, final_views=[whole], stop_reason="vanilla", counters=backbone.counters)
