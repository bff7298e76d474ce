"""The method's settings (Sec. 4.3's defaults) and their checks: importable without torch, so that
the CLI refuses a setting out of range before anything heavy loads."""

from __future__ import annotations

from dataclasses import dataclass, field

from egg_eval.grounding.regions import RegionParams

# the objectives of egg_eval.grounding.saliency.OBJECTIVES (a test holds the two equal)
OBJECTIVE_NAMES = ("entropy", "entropy_top_p", "max_prob")
STOPPING_RULES = ("spatial_entropy", "confidence", "fixed")


@dataclass(frozen=True)
class EggConfig:
    """Method settings; defaults are the paper's (Sec. 4.3)."""

    objective: str = "entropy"
    token_index: int = 1
    layer: int | None = None
    regions: RegionParams = field(default_factory=RegionParams)
    stopping: str = "spatial_entropy"
    n_rounds: int = 1  # for stopping="fixed"
    max_rounds: int = 15
    batch_views: bool = True  # ground the new views of a round in one pass where the backbone allows
    reuse_features: bool = True  # the answer takes each view's embeddings from its grounding pass
    # the answer continues the whole image's grounding pass's KV cache through that image
    # (with reuse_features): its prefill runs only the crops and the question
    reuse_prefix: bool = True
    checkpoint_layers: bool = False  # recompute decoder layers in the backward: less memory, more time
    # activations a grounding pass may hold, GiB: over it, a pass keeps lean activations, a
    # round's views that do not fit even so go one by one, and a view recomputes the fewest
    # leading decoder layers that bring it within. "auto" =
    # AUTO_ACTIVATION_FRACTION of the weights' bytes on a GPU (peak within 1.5x the plain
    # model's), no limit on CPU; None = no limit.
    activation_memory_gb: float | str | None = "auto"
    # lean activations in the grounding backward (egg_eval.backbones.lean; the same maps to the
    # bit): "auto" = where a pass is over the budget, before recomputing layers; True = every
    # pass (less memory for a little elementwise work); False = never (over the budget, only
    # layers are recomputed)
    lean_activations: bool | str = "auto"

    def __post_init__(self):
        # the messages name the settings as `python -m egg_eval` spells them
        if self.objective not in OBJECTIVE_NAMES:
            raise ValueError(
                f"unknown objective {self.objective!r}; method.objective must be one of {sorted(OBJECTIVE_NAMES)}"
            )
        if self.stopping not in STOPPING_RULES:
            raise ValueError(f"unknown stopping rule {self.stopping!r}; stopping.name must be one of {STOPPING_RULES}")
        r = self.regions
        bounds = (
            ("token_index", self.token_index, 1),
            ("top_k", r.top_k, 1),
            ("max_rounds", self.max_rounds, 1),
            ("sigma", r.sigma, 0),
            ("min_size", r.min_size, 0),
            ("max_aspect", r.max_aspect, 1),
        )
        for key, value, low in bounds:
            if value < low:
                raise ValueError(f"method.{key} must be >= {low}, got {value!r}")
        if self.stopping == "fixed" and self.n_rounds < 1:
            raise ValueError(f"stopping.n must be >= 1, got {self.n_rounds!r}")
        a = self.activation_memory_gb
        if not (a is None or a == "auto" or (isinstance(a, int | float) and not isinstance(a, bool) and a > 0)):
            raise ValueError(f"activation_memory_gb must be a positive number of GiB, 'auto' or null, got {a!r}")
        if self.lean_activations not in ("auto", True, False):
            raise ValueError(f"method.lean_activations must be auto, true or false, got {self.lean_activations!r}")
