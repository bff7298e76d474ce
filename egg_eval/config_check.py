"""The settings, checked before anything is loaded: a mistyped value (``method.top_k=two``,
``execution.batch_views=maybe``, ``dataset.limit=-3``, ``dataset.metric=vqa_acuracy``), a name
that is not in its registry, or a setting that has no effect in its combination
(``stopping=confidence stopping.n=2``) stops the run at once with one line naming the key and
what it takes (:class:`ConfigError`), instead of failing every sample after a 7B model has
loaded, or being silently ignored.

Types are checked by OmegaConf against the schemas below (the structured-config way), on a
resolved copy of the config: the config itself is left as it is. The method's choices and
ranges are :class:`~egg_eval.grounding.refine.EggConfig`'s own checks, which ``egg_eval.cli``
runs next, also before anything loads.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from egg_eval.config import (
    METHOD_SCHEMAS,
    STOPPED,
    BackboneSchema,
    ExecutionSchema,
    RunSchema,
    ShardSchema,
    StoppingSchema,
)
from egg_eval.errors import UsageError
from egg_eval.outputs import SUBMISSIONS
from egg_eval.scoring import KINDS, METRICS


class ConfigError(UsageError, ValueError):
    """A setting that cannot run as given; its message is one line naming the key and what it takes."""


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
        raise ConfigError(f"config {key}: {msg}") from None


def _at_least(key: str, value, low: int | float) -> None:
    if value is not None and value < low:
        raise ConfigError(f"config {key} must be >= {low}, got {value!r}")


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the first setting of ``cfg`` whose type, range or name
    is wrong, or that has no effect in its combination."""
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
            raise ConfigError(f"config backbone.{k} applies to {family} only ({what}), not to {b.get('family')}")
    pixels = {k: b.get(k) for k in ("min_pixels", "max_pixels") if b.get(k) is not None}
    for k, v in pixels.items():
        _at_least(f"backbone.{k}", v, 28 * 28)  # one token's area
    _at_least("backbone.max_tiles", b.get("max_tiles"), 1)
    if len(pixels) == 2 and pixels["min_pixels"] > pixels["max_pixels"]:
        raise ConfigError(f"config backbone.min_pixels {pixels['min_pixels']} is above backbone.max_pixels")
    if b.get("repetition_penalty") is not None and not b["repetition_penalty"] > 0:
        raise ConfigError(f"config backbone.repetition_penalty must be > 0 (1.0: none), got {b['repetition_penalty']}")
    if b.get("dtype", "auto") not in DTYPES:
        raise ConfigError(f"config backbone.dtype must be one of {DTYPES}, got {b['dtype']!r}")
    device = b.get("device", "auto")
    if device not in ("auto", "cpu"):
        import torch

        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ConfigError(f"config backbone.device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
        if dev.type == "cuda":
            n = torch.cuda.device_count()  # 0 on a CPU build of torch or with no GPU visible
            if n == 0 or (dev.index or 0) >= n:
                seen = "no CUDA device" if n == 0 else f"{n} CUDA device(s), cuda:0..cuda:{n - 1}"
                raise ConfigError(
                    f"config backbone.device={device!r}, but this process sees {seen} "
                    f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                    "use backbone.device=auto or cpu"
                )

    path = b.get("path")
    if path and path.startswith(("/", ".", "~")) and not Path(path).expanduser().exists():
        # a hub id never starts so; without this, transformers reports an invalid repo id
        raise ConfigError(f"config backbone.path: no such directory {path!r} (a hub id or a save_pretrained directory)")

    lg = c.get("logger") or {}
    if lg.get("name") == "wandb" and lg.get("mode") not in WANDB_MODES:
        # wandb would refuse it at init, which the logger turns into a warning: the run would go unlogged
        raise ConfigError(f"config logger.mode must be one of {WANDB_MODES}, got {lg.get('mode')!r}")

    _check_dataset(c["dataset"])
    _typed("execution", ExecutionSchema, c.get("execution") or {})
    m, s = c["method"], c.get("stopping") or {}
    name = m.get("name")
    if name not in METHOD_SCHEMAS:
        raise ConfigError(f"config method.name={name!r} is none of {', '.join(sorted(METHOD_SCHEMAS))}")
    _typed("method", METHOD_SCHEMAS[name], m)
    _typed("stopping", StoppingSchema, s)
    if name not in STOPPED:
        if s.get("name", "spatial_entropy") != "spatial_entropy" or s.get("n") is not None:
            raise ConfigError(
                f"config stopping={s.get('name')}{' stopping.n=' + str(s.get('n')) if s.get('n') is not None else ''}"
                f" has no effect with method={name} (it has no rounds to stop); leave stopping out"
            )
        return
    if s.get("n") is not None and s.get("name") != "fixed":
        raise ConfigError(
            f"config stopping.n={s['n']} has no effect with stopping={s.get('name')}, which decides when to stop "
            "by itself; stopping.n sets the rounds of stopping=fixed only"
        )
    # choices and ranges: EggConfig's own checks (egg_eval.methods.Egg.from_config, run by the CLI)


PROTOCOLS = ("generate", "likelihood")
BOX_FRAMES = ("upright", "stored")


def _check_dataset(d: dict) -> None:
    for key, value, names in (
        ("metric", d.get("metric"), sorted(METRICS)),
        ("kind", d.get("kind"), list(KINDS)),
        ("protocol", d.get("protocol") or "generate", list(PROTOCOLS)),
    ):
        if value not in names:
            raise ConfigError(f"config dataset.{key}={value!r} is none of {', '.join(names)}")
    if d.get("submission") is not None and d["submission"] not in SUBMISSIONS:
        raise ConfigError(
            f"config dataset.submission={d['submission']!r} is none of {', '.join(sorted(SUBMISSIONS))} (or null)"
        )
    if (d.get("protocol") or "generate") == "likelihood" and d.get("kind") != "mc":
        raise ConfigError(
            f"config dataset.protocol=likelihood has no effect on {d.get('name')} (kind {d.get('kind')}): it scores "
            "the options of a multiple-choice benchmark"
        )
    boxes = d.get("boxes") or {}
    if boxes and boxes.get("frame", "upright") not in BOX_FRAMES:
        raise ConfigError(f"config dataset.boxes.frame={boxes.get('frame')!r} is none of {', '.join(BOX_FRAMES)}")
    if d.get("path") and not Path(d["path"]).expanduser().exists():
        raise ConfigError(f"config dataset.path: no such file or directory {d['path']!r}")
    for key in ("limit", "toy_n"):
        v = d.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"config dataset.{key} must be a whole number >= 1 or null, got {v!r}")
    if d.get("toy_n") is not None and not d.get("toy"):
        raise ConfigError(f"config dataset.toy_n has no effect on {d.get('name')}: it sizes the built-in toy subsets")
    if d.get("toy_n") is not None and d.get("path"):
        raise ConfigError("config dataset.toy_n has no effect with dataset.path: the rows are read from that path")
    subsets = list(d.get("splits") or [])
    split = d.get("split")
    if subsets:  # a benchmark of sub-splits (POPE): dataset.split takes all, one, or a list of them
        chosen = subsets if split in (None, "all") else [split] if isinstance(split, str) else list(split)
        unknown = [x for x in chosen if x not in subsets]
        if unknown or not chosen:
            raise ConfigError(
                f"config dataset.split={split!r}: {d.get('name')} has the splits {', '.join(subsets)}; take all "
                "(dataset.split=all), one (dataset.split=popular) or several (dataset.split=[adversarial,random])"
            )
    elif not isinstance(split, str) or not split:
        raise ConfigError(f"config dataset.split must be the name of one split, got {split!r}")


def checkpoint_layers(path: str | Path, revision: str | None = None) -> int | None:
    """The decoder layers of the checkpoint at ``path`` (a directory, or a hub id whose
    ``config.json`` is in the hub's cache or can be fetched), read from its ``config.json``
    without loading anything; ``None`` where it cannot be read."""
    import json

    p = Path(str(path)).expanduser()
    try:
        if p.is_dir():
            config = json.loads((p / "config.json").read_text())
        else:
            from huggingface_hub import hf_hub_download

            config = json.loads(Path(hf_hub_download(str(path), "config.json", revision=revision)).read_text())
    except Exception:
        return None
    for section in ("text_config", "llm_config", "language_config"):
        if isinstance(config.get(section), dict) and config[section].get("num_hidden_layers"):
            return int(config[section]["num_hidden_layers"])
    n = config.get("num_hidden_layers")
    return int(n) if n else None


def check_layer(layer: int | None, path: str | Path, revision: str | None = None) -> None:
    """``method.layer`` against the checkpoint's ``config.json``, before its weights load."""
    n = checkpoint_layers(path, revision)
    if layer is not None and layer != -1 and n is not None and not 1 <= layer <= n:
        raise ConfigError(f"config method.layer must be in 1..{n} for {path} (or -1 / null: the last), got {layer}")
