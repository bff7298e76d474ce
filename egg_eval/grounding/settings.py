"""What EGG computes and how it is run, as two dataclasses: :class:`EggConfig`, the paper's
settings (Sec. 4.3's defaults: objective, decoding step, layer, regions, stopping, rounds), and
:class:`ExecutionConfig`, the execution settings (batching, reuse, memory), none of which changes
a map, a region or an answer (``affects_result`` false on each field: the resume check skips
them). Importable without torch, so that the CLI refuses a setting out of range at once."""

from __future__ import annotations

from dataclasses import dataclass, field

from egg_eval.grounding.regions import RegionParams

# the objectives of egg_eval.grounding.saliency.OBJECTIVES (a test holds the two equal)
OBJECTIVE_NAMES = ("entropy", "entropy_top_p", "max_prob")
STOPPING_RULES = ("spatial_entropy", "confidence", "fixed")  # egg_eval.grounding.stopping.RULES
NO_EFFECT = {"affects_result": False}  # field metadata: a setting no record depends on


def affects_result(f) -> bool:
    """Whether a dataclass field's value changes what a run records (the default: it does)."""
    return f.metadata.get("affects_result", True)


@dataclass(frozen=True)
class EggConfig:
    """The method's settings; defaults are the paper's (Sec. 4.3)."""

    objective: str = "entropy"  # Tab. 3
    token_index: int = 1  # the decoding step t whose entropy is differentiated (Tab. 6)
    layer: int | None = None  # the logit-lens layer L; None: the last (Tab. 5)
    regions: RegionParams = field(default_factory=RegionParams)  # smoothing, K (Tab. 4), box limits
    stopping: str = "spatial_entropy"  # Tab. 2
    n_rounds: int = 1  # rounds of stopping="fixed"
    max_rounds: int = 15  # every rule stops here (the reference code's cap)

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


@dataclass(frozen=True)
class ExecutionConfig:
    """How EGG runs (the ``execution`` config group); every field gives the same maps, regions
    and answers, up to float rounding (tested)."""

    # ground the new views of a round in one batched pass where the backbone allows
    batch_views: bool = field(default=True, metadata=NO_EFFECT)
    # the answer takes each view's visual embeddings from its grounding pass
    reuse_features: bool = field(default=True, metadata=NO_EFFECT)
    # with reuse_features: the answer continues the whole image's grounding KV cache
    reuse_prefix: bool = field(default=True, metadata=NO_EFFECT)
    # recompute every decoder layer but the last in the grounding backward: less memory, more time
    checkpoint_layers: bool = field(default=False, metadata=NO_EFFECT)
    # GiB of activations a grounding pass may hold; "auto": 0.4x the weights on a GPU, none on CPU;
    # None: no limit (egg_eval.grounding.engine.activation_budget)
    activation_memory_gb: float | str | None = field(default="auto", metadata=NO_EFFECT)
    # lean activations (egg_eval.backbones.lean): "auto" where a pass is over the budget; True
    # every pass; False never (over the budget, only layers are recomputed)
    lean_activations: bool | str = field(default="auto", metadata=NO_EFFECT)

    def __post_init__(self):
        a = self.activation_memory_gb
        if not (a is None or a == "auto" or (isinstance(a, int | float) and not isinstance(a, bool) and a > 0)):
            raise ValueError(
                f"execution.activation_memory_gb must be a positive number of GiB, 'auto' or null, got {a!r}"
            )
        if self.lean_activations not in ("auto", True, False):
            raise ValueError(f"execution.lean_activations must be auto, true or false, got {self.lean_activations!r}")
