"""The settings' schemas: the one place their defaults and types are written, and where each
says whether a run's records depend on it.

Each schema is registered with Hydra's ConfigStore as ``schema/<group>/<name>``, the base of its
group's YAML files (``defaults: [/schema/<group>/<name>@_here_, _self_]``), which list only what
differs: ``configs/method/egg.yaml``
lists nothing, the paper's defaults being :class:`~egg_eval.grounding.settings.EggConfig`'s. The
schemas are stored as plain values, so that a value of the wrong type reaches
:func:`egg_eval.config_check.check_config`, which checks it against the same dataclasses and says
so in one line. A field with ``metadata=NO_EFFECT`` (and every field of the ``execution``,
``shard`` and ``logger`` groups) is left out of a run's fingerprint: :data:`NOT_IN_RESULT`.

``Optional[...]`` rather than ``X | None``: OmegaConf reads the annotations at run time.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Optional

from egg_eval.grounding.regions import RegionParams
from egg_eval.grounding.settings import NO_EFFECT, EggConfig, ExecutionConfig, affects_result


def _no_effect(default: Any) -> Any:
    """A field no record depends on."""
    return field(default=default, metadata=NO_EFFECT)


@dataclass
class EggSchema:
    """``method=egg``: the paper's settings, flat as the command line spells them."""

    name: str = "egg"
    objective: str = EggConfig.objective
    token_index: int = EggConfig.token_index
    layer: Optional[int] = EggConfig.layer  # noqa: UP045
    top_k: int = RegionParams.top_k
    sigma: float = f"${{egg_default:${{oc.select:backbone.sigma,null}},{RegionParams.sigma}}}"  # type: ignore[assignment]  # the backbone's, if set
    max_aspect: float = RegionParams.max_aspect
    min_size: float = RegionParams.min_size
    max_rounds: int = EggConfig.max_rounds


@dataclass
class VanillaSchema:
    """``method=vanilla``: the plain model, the whole image only."""

    name: str = "vanilla"


@dataclass
class StoppingSchema:
    name: str = EggConfig.stopping
    n: Optional[int] = None  # noqa: UP045  stopping=fixed: its rounds (EggConfig.n_rounds)


@dataclass
class ExecutionSchema:
    """``execution``: :class:`ExecutionConfig`'s fields as values (a number, "auto" or null)."""

    batch_views: bool = ExecutionConfig.batch_views
    reuse_features: bool = ExecutionConfig.reuse_features
    reuse_prefix: bool = ExecutionConfig.reuse_prefix
    checkpoint_layers: bool = ExecutionConfig.checkpoint_layers
    activation_memory_gb: Any = ExecutionConfig.activation_memory_gb
    lean_activations: Any = ExecutionConfig.lean_activations


@dataclass
class BackboneSchema:
    name: str = ""
    family: str = ""
    path: Optional[str] = _no_effect(None)  # noqa: UP045  (the weights are fingerprinted instead)
    revision: Optional[str] = None  # noqa: UP045
    dtype: str = "auto"  # bfloat16 on GPU, float32 on CPU
    attn_implementation: Optional[str] = _no_effect("sdpa")  # noqa: UP045  eager | sdpa | flash_attention_2
    sdpa_cudnn: bool = _no_effect(False)  # SDPA may use cuDNN attention (slow on new shapes)
    device: str = _no_effect("auto")
    max_new_tokens: int = 32
    repetition_penalty: Optional[float] = None  # noqa: UP045  None: the checkpoint's generation config's
    min_pixels: Optional[int] = None  # noqa: UP045  qwen25vl: the bounds of each view's area
    max_pixels: Optional[int] = None  # noqa: UP045
    max_tiles: Optional[int] = None  # noqa: UP045  internvl35: 448 px tiles per view; None: the checkpoint's
    sigma: Optional[float] = None  # noqa: UP045  the method's smoothing on this backbone's grid
    tiny: bool = False


@dataclass
class DatasetSchema:
    name: str = ""
    hf_id: str = ""
    split: Any = ""  # a split name; a benchmark of sub-splits (POPE): all, one, or a list
    sizes: dict = field(default_factory=dict, metadata=NO_EFFECT)  # rows per split: the progress bar's total
    config_name: Optional[str] = None  # noqa: UP045
    revision: Optional[str] = None  # noqa: UP045
    metric: str = ""  # egg_eval.scoring.METRICS
    kind: str = "open"  # open | mc | pope: how it is prompted
    protocol: str = "generate"  # or likelihood (multiple choice)
    submission: Optional[str] = None  # noqa: UP045  egg_eval.outputs.SUBMISSIONS
    columns: dict = field(default_factory=dict)
    splits: list = field(default_factory=list)
    images_id: Optional[str] = None  # noqa: UP045  GQA: the images (a dataset of their own, or hf_id's config)
    images_config: Optional[str] = None  # noqa: UP045  joined on the image_id column
    images_split: Optional[str] = None  # noqa: UP045
    annotations: Optional[str] = None  # noqa: UP045  V*: the suffix of each image's annotation file
    bbox_format: str = "xyxy"
    boxes: Optional[dict] = None  # noqa: UP045  a side dataset of evidence boxes, joined by id
    max_pixels: Optional[int] = None  # noqa: UP045  the decompression-bomb limit
    path: Optional[str] = None  # noqa: UP045  a local copy
    limit: Optional[int] = None  # noqa: UP045  the first N samples (of each sub-split)
    toy: Optional[str] = None  # noqa: UP045  the built-in offline rows of this schema
    toy_n: Optional[int] = None  # noqa: UP045


@dataclass
class RunSchema:
    """The top level's own settings (``configs/eval.yaml``)."""

    seed: int = 0
    progress: bool = _no_effect(True)
    output_root: str = _no_effect("results")  # runs under <output_root>/runs/, tables under <output_root>/tables/
    output_dir: Optional[str] = _no_effect(None)  # noqa: UP045  pins a run's folder
    cache_dir: str = _no_effect("${output_root}/.cache")  # the toy subsets and tiny checkpoints
    pictures: int = _no_effect(8)  # draw the first N samples into <run>/pictures and gallery.html
    deterministic: bool = _no_effect(False)  # GPU: deterministic kernels (slower), bit-equal runs
    retry_failed: bool = _no_effect(True)  # a rerun computes again the samples whose record holds an error
    max_failures_in_a_row: int = _no_effect(50)  # model failures in a row that stop the run (0: never)
    prefetch: int = _no_effect(4)  # samples read and decoded ahead in a background thread (0: none)
    # shard.count=N shard.index=i (i in 0..N-1), then `python -m egg_eval.merge <run dir>`
    shard: dict = field(default_factory=lambda: {"index": 0, "count": 1}, metadata=NO_EFFECT)


@dataclass
class ShardSchema:
    index: int = 0
    count: int = 1


METHOD_SCHEMAS = {"egg": EggSchema, "vanilla": VanillaSchema}  # method.name -> its settings' schema
STOPPED = ("egg",)  # the methods with rounds, which the stopping group stops (for the others it has no effect)
GROUPS = {"method": EggSchema, "stopping": StoppingSchema, "backbone": BackboneSchema, "dataset": DatasetSchema}
NO_EFFECT_GROUPS = ("execution", "logger", "shard")  # no setting of these changes a record


def _not_in_result() -> tuple[str, ...]:
    top = [f.name for f in fields(RunSchema) if not affects_result(f)]
    grouped = [f"{g}.{f.name}" for g, s in GROUPS.items() for f in fields(s) if not affects_result(f)]
    return tuple(dict.fromkeys([*top, *NO_EFFECT_GROUPS, *grouped]))


# the settings a sample's record does not depend on (left out of run.json's fingerprint)
NOT_IN_RESULT = _not_in_result()


def defaults(schema: type) -> dict[str, Any]:
    """A schema's defaults as plain values (what its YAML files start from)."""
    out = {}
    for f in fields(schema):
        out[f.name] = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
    return asdict(schema(**out))


def register() -> None:
    """Store each schema's defaults as ``schema/<group>/<name>`` in Hydra's ConfigStore;
    ``${egg_default:x,d}`` is ``d`` where ``x`` is null."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver(
        "egg_default", lambda value, default: default if value is None else value, replace=True
    )
    cs = ConfigStore.instance()
    for group, name, schema in (
        ("method", "egg", EggSchema),
        ("method", "vanilla", VanillaSchema),
        ("stopping", "base", StoppingSchema),
        ("execution", "base", ExecutionSchema),
        ("backbone", "base", BackboneSchema),
        ("dataset", "base", DatasetSchema),
        ("run", "base", RunSchema),
    ):
        cs.store(group=f"schema/{group}", name=name, node=defaults(schema))
