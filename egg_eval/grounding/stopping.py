"""When Alg. 1 stops (Tab. 2), as small rules like the objectives: each is asked before a
round is grounded and after its spatial entropy is known, and says why it stopped and which
views the answer gets.

- :class:`SpatialEntropy` (the paper's): stop when H_t >= H_prev (Eq. 7-8); the views returned
  are that round's, i.e. the crops made the round before (Alg. 1 returns I_t); the round's own
  top-K are not cropped. ``entropy_rose`` or, on equality, ``entropy_tied``.
- :class:`Confidence`: stop when the first answer token's max probability, given the whole
  image and the current crops, falls; those crops are dropped (``confidence_fell``).
- :class:`Fixed`: exactly n rounds crop (``fixed``).

Every rule also ends at ``max_rounds`` (``max_rounds``), or where no view has a component
(``no_region``, said by the loop itself).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from egg_eval.types import Box


class StoppingRule:
    """The base rule never stops on its own. ``reason`` and ``views`` say why and with what it
    stopped; ``confidence`` the value :meth:`before` recorded for the round (or None)."""

    reason = "max_rounds"
    views: list[Box] | None = None  # the views the answer gets; None: the current round's
    confidence: float | None = None

    def before(self, t: int, views: list[Box]) -> bool:
        """Stop before round ``t`` (0-based) grounds ``views``?"""
        return False

    def after(self, t: int, h_t: float, views: list[Box]) -> bool:
        """Stop after round ``t``, whose best view's spatial entropy is ``h_t``?"""
        return False


class SpatialEntropy(StoppingRule):
    def __init__(self) -> None:
        self.h_prev = math.inf

    def after(self, t: int, h_t: float, views: list[Box]) -> bool:
        if h_t >= self.h_prev:  # Alg. 1: if H_t >= H_prev: break
            self.reason = "entropy_rose" if h_t > self.h_prev else "entropy_tied"
            return True
        self.h_prev = h_t
        return False


class Confidence(StoppingRule):
    """``confidence_of(views)``: the first answer token's max probability given those views."""

    def __init__(self, confidence_of: Callable[[Sequence[Box]], float]) -> None:
        self.confidence_of, self.prev, self.prev_views = confidence_of, -math.inf, None

    def before(self, t: int, views: list[Box]) -> bool:
        self.confidence = self.confidence_of(views)
        if self.confidence < self.prev:
            self.reason, self.views = "confidence_fell", self.prev_views
            return True
        self.prev, self.prev_views = self.confidence, views
        return False


class Fixed(StoppingRule):
    def __init__(self, n: int) -> None:
        self.n = n
        self.reason = "fixed"  # also where max_rounds comes first

    def before(self, t: int, views: list[Box]) -> bool:
        return t >= self.n


RULES: dict[str, Any] = {"spatial_entropy": SpatialEntropy, "confidence": Confidence, "fixed": Fixed}
