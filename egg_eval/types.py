"""Plain, frozen data types shared by the core. Pixel boxes are in ORIGINAL-image pixels."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Box:
    """An axis-aligned box ``[x0, y0, x1, y1)`` in original-image pixels (x right, y down)."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return max(0.0, self.x1 - self.x0)

    @property
    def height(self) -> float:
        return max(0.0, self.y1 - self.y0)

    @property
    def area(self) -> float:
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2

    def intersect(self, other: Box) -> Box:
        return Box(max(self.x0, other.x0), max(self.y0, other.y0), min(self.x1, other.x1), min(self.y1, other.y1))

    def contains(self, other: Box) -> bool:
        return self.x0 <= other.x0 and self.y0 <= other.y0 and self.x1 >= other.x1 and self.y1 >= other.y1

    def shift(self, dx: float, dy: float) -> Box:
        return Box(self.x0 + dx, self.y0 + dy, self.x1 + dx, self.y1 + dy)

    def to_int(self) -> Box:
        """Smallest integer box that contains this one."""
        return Box(math.floor(self.x0), math.floor(self.y0), math.ceil(self.x1), math.ceil(self.y1))

    def as_list(self) -> list[float]:
        return [self.x0, self.y0, self.x1, self.y1]

    @classmethod
    def from_xywh(cls, x: float, y: float, w: float, h: float) -> Box:
        return cls(x, y, x + w, y + h)

    @classmethod
    def of_image(cls, width: int, height: int) -> Box:
        return cls(0, 0, width, height)


@dataclass(frozen=True)
class Region:
    """A connected component of a view's mask (Sec. 3.3).

    ``view`` indexes the views of its round; ``score`` is w_j of Eq. 6 (sum of the
    UNSMOOTHED saliency over the component's tokens); ``box`` is the crop box after the
    aspect cap and minimum size, clipped to its view.
    """

    view: int
    box: Box
    score: float
    n_tokens: int


@dataclass
class Round:
    """One pass of Alg. 1's loop: the views grounded, every component ranked, the K kept."""

    views: list[Box]
    regions: list[Region]
    selected: list[Region]
    spatial_entropy: float
    confidence: float | None = None
    # per view: (saliency map (R, C), cell boxes (R, C, 4) in that view's pixels); for
    # pictures only, never written to records
    maps: list = field(default_factory=list, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {
            "views": [v.as_list() for v in self.views],
            "regions": [
                {"view": r.view, "box": r.box.as_list(), "score": r.score, "n_tokens": r.n_tokens} for r in self.regions
            ],
            "selected": [self.regions.index(r) for r in self.selected],
            "spatial_entropy": _finite_or_none(self.spatial_entropy),
            "confidence": self.confidence,
        }


@dataclass
class Counters:
    """Model passes and wall time, accumulated while a sample is processed."""

    n_forward: int = 0
    n_backward: int = 0
    n_tower: int = 0  # vision-tower calls (each embeds one or more images)
    n_grounded: int = 0  # views grounded, a map each (a batched backward grounds several)
    prefix_tokens: int = 0  # answer-prompt tokens taken from a grounding pass's cache, not run again
    time_ground_s: float = 0.0
    time_answer_s: float = 0.0
    # grounding passes that ran out of accelerator memory and were redone with less:
    # a round's views one by one instead of batched, then decoder layers recomputed
    memory_fallbacks: int = 0
    # grounding passes planned smaller up front to stay within execution.activation_memory_gb
    # (a round's views split into single passes, or some of a pass's layers recomputed)
    memory_limited: int = 0
    # decoder layers recomputed in grounding backwards, summed over passes (each costs one
    # more forward of that layer; num_layers of them = one more forward of the prompt)
    recomputed_layers: int = 0
    # grounding passes run with lean activations to stay within it (egg_eval.backbones.lean)
    lean_passes: int = 0


@dataclass
class Trace:
    """Everything the method did for one sample; ``final_views`` are what the answer sees."""

    image_size: tuple[int, int]
    rounds: list[Round] = field(default_factory=list)
    final_views: list[Box] = field(default_factory=list)
    stop_reason: str = ""
    counters: Counters = field(default_factory=Counters)

    def end(self, reason: str, views: list[Box]) -> Trace:
        """Stopped, for ``reason``: the answer gets ``views``."""
        self.stop_reason, self.final_views = reason, list(views)
        return self

    def to_dict(self) -> dict:
        return {
            "image_size": list(self.image_size),
            "rounds": [r.to_dict() for r in self.rounds],
            "final_views": [v.as_list() for v in self.final_views],
            "stop_reason": self.stop_reason,
            **asdict(self.counters),
        }


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None
