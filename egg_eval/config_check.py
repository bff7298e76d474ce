"""Types and ranges of the settings, checked before anything is loaded: a mistyped value
(``method.top_k=two``, ``method.batch_views=maybe``, ``dataset.limit=-3``,
``method.objective=entropyy``) stops the run at once with the key and what it takes, instead
of failing every sample after a 7B model has loaded, or being read as something else.

Types are checked by OmegaConf against the schemas below (the structured-config way), on a
resolved copy of the config: the config itself is left as it is. The method's choices and
ranges are :class:`~egg_eval.grounding.refine.EggConfig`'s own checks, which ``egg_eval.cli``
runs next, also before anything loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# ``Optional[...]`` rather than ``X | None``: OmegaConf reads the annotations at run time


@dataclass
class MethodSchema:
    name: str = "egg"
    objective: str = "entropy"
    token_index: int = 1
    layer: Optional[int] = None  # noqa: UP045
    top_k: int = 2
    sigma: float = 1.5
    max_aspect: float = 3.0
    min_size: float = 16.0
    max_rounds: int = 15
    batch_views: bool = True
    reuse_features: bool = True
    reuse_prefix: bool = True
    checkpoint_layers: bool = False
    activation_memory_gb: Any = "auto"  # a number, "auto" or null: checked by EggConfig
    lean_activations: Any = "auto"  # auto, true or false: checked by EggConfig


@dataclass
class StoppingSchema:
    name: str = "spatial_entropy"
    n: Optional[int] = None  # noqa: UP045


@dataclass
class BackboneSchema:
    name: str = ""
    family: str = ""
    path: Optional[str] = None  # noqa: UP045
    revision: Optional[str] = None  # noqa: UP045
    dtype: str = "auto"
    attn_implementation: Optional[str] = "sdpa"  # noqa: UP045
    sdpa_cudnn: bool = False
    device: str = "auto"
    max_new_tokens: int = 32
    repetition_penalty: Optional[float] = None  # noqa: UP045
    min_pixels: Optional[int] = None  # noqa: UP045  (qwen25vl only)
    max_pixels: Optional[int] = None  # noqa: UP045
    max_tiles: Optional[int] = None  # noqa: UP045  (internvl35 only)
    sigma: Optional[float] = None  # noqa: UP045
    tiny: bool = False


@dataclass
class ShardSchema:
    index: int = 0
    count: int = 1


@dataclass
class RunSchema:  # the top level's own settings
    seed: int = 0
    progress: bool = True
    output_root: str = "results"
    output_dir: Optional[str] = None  # noqa: UP045
    cache_dir: str = ""
    pictures: int = 8
    deterministic: bool = False
    retry_failed: bool = True
    max_failures_in_a_row: int = 50
    prefetch: int = 4


# backbone settings of one family's processor: key -> (family, what it bounds)
FAMILY_SETTINGS = {
    "min_pixels": ("qwen25vl", "the area bounds of its dynamic resolution"),
    "max_pixels": ("qwen25vl", "the area bounds of its dynamic resolution"),
    "max_tiles": ("internvl35", "its tiles of 448 px per view"),
}
DTYPES = ("auto", "float32", "float16", "bfloat16")
WANDB_MODES = (None, "online", "offline", "disabled", "shared")  # None: $WANDB_MODE or online


def _typed(section: str, schema: type, values: dict) -> None:
    try:
        OmegaConf.merge(OmegaConf.structured(schema), values)
    except OmegaConfBaseException as e:
        key = f"{section}.{e.key}" if section and getattr(e, "key", None) else section or str(getattr(e, "key", ""))
        msg = str(e).splitlines()[0]
        raise ValueError(f"config {key}: {msg}") from None


def _at_least(key: str, value, low: int | float) -> None:
    if value is not None and value < low:
        raise ValueError(f"config {key} must be >= {low}, got {value!r}")


def check_config(cfg: DictConfig) -> None:
    """Raise ``ValueError`` naming the first setting of ``cfg`` whose type or range is wrong."""
    c = OmegaConf.to_container(cfg, resolve=True)
    top = {k: c[k] for k in RunSchema.__dataclass_fields__ if k in c}
    _typed("", RunSchema, top)
    _typed("shard", ShardSchema, c.get("shard") or {})
    _at_least("pictures", top.get("pictures"), 0)
    _at_least("max_failures_in_a_row", top.get("max_failures_in_a_row"), 0)
    _at_least("prefetch", top.get("prefetch"), 0)

    b = c["backbone"]
    _typed("backbone", BackboneSchema, b)
    _at_least("backbone.max_new_tokens", b.get("max_new_tokens"), 1)
    for k, (family, what) in FAMILY_SETTINGS.items():
        if b.get(k) is not None and b.get("family") != family:
            raise ValueError(f"config backbone.{k} applies to {family} only ({what}), not to {b.get('family')}")
    pixels = {k: b.get(k) for k in ("min_pixels", "max_pixels") if b.get(k) is not None}
    for k, v in pixels.items():
        _at_least(f"backbone.{k}", v, 28 * 28)  # one token's area
    _at_least("backbone.max_tiles", b.get("max_tiles"), 1)
    if len(pixels) == 2 and pixels["min_pixels"] > pixels["max_pixels"]:
        raise ValueError(f"config backbone.min_pixels {pixels['min_pixels']} is above backbone.max_pixels")
    if b.get("repetition_penalty") is not None and not b["repetition_penalty"] > 0:
        raise ValueError(f"config backbone.repetition_penalty must be > 0 (1.0: none), got {b['repetition_penalty']!r}")
    if b.get("dtype", "auto") not in DTYPES:
        raise ValueError(f"config backbone.dtype must be one of {DTYPES}, got {b['dtype']!r}")
    device = b.get("device", "auto")
    if device != "auto":
        import torch

        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ValueError(f"config backbone.device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
        if dev.type == "cuda":
            n = torch.cuda.device_count()  # 0 on a CPU build of torch or with no GPU visible
            if n == 0 or (dev.index or 0) >= n:
                seen = "no CUDA device" if n == 0 else f"{n} CUDA device(s), cuda:0..cuda:{n - 1}"
                raise ValueError(
                    f"config backbone.device={device!r}, but this process sees {seen} "
                    f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                    "use backbone.device=auto or cpu"
                )

    path = b.get("path")
    if path and path.startswith(("/", ".", "~")) and not Path(path).expanduser().exists():
        # a hub id never starts so; without this, transformers reports an invalid repo id
        raise ValueError(f"config backbone.path: no such directory {path!r} (a hub id or a save_pretrained directory)")

    lg = c.get("logger") or {}
    if lg.get("name") == "wandb" and lg.get("mode") not in WANDB_MODES:
        # wandb would refuse it at init, which the logger turns into a warning: the run would go unlogged
        raise ValueError(f"config logger.mode must be one of {WANDB_MODES}, got {lg.get('mode')!r}")

    d = c["dataset"]
    if d.get("path") and not Path(d["path"]).expanduser().exists():
        raise ValueError(f"config dataset.path: no such file or directory {d['path']!r}")
    for key in ("limit", "toy_n"):
        v = d.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"config dataset.{key} must be a whole number >= 1 or null, got {v!r}")

    m = c["method"]
    if m.get("name") == "vanilla":
        return
    _typed("method", MethodSchema, m)
    s = c.get("stopping") or {}
    _typed("stopping", StoppingSchema, s)
    # choices and ranges: EggConfig's own checks (egg_eval.cli.egg_config)
