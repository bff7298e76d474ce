"""``python -m egg_eval backbone=qwen25vl dataset=docvqa`` — Hydra composes configs/eval.yaml."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from egg_eval.config import register
from egg_eval.config_check import FAMILY_SETTINGS, ConfigError, check_config, check_layer
from egg_eval.data.specs import spec_from_config
from egg_eval.errors import LoadError, UsageError
from egg_eval.outputs import RunInfo, failures_text, score_text
from egg_eval.runs import expected_total, run_dir, run_fingerprint, sample_set

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
ASSETS = Path(__file__).resolve().parent / "assets"
log = logging.getLogger("egg_eval")
# ${egg_asset:toy_vlm} -> the shipped checkpoint's directory, wherever egg_eval is installed
OmegaConf.register_new_resolver("egg_asset", lambda name: str(ASSETS / name), replace=True)
register()  # the groups' defaults (egg_eval/config.py), which the YAML files build on


def shard_of(cfg: DictConfig) -> tuple[int, int]:
    """(index, count) of ``shard``; a clear error for an index outside 0..count-1."""
    sh = cfg.get("shard") or {}
    index, count = int(sh.get("index", 0)), int(sh.get("count", 1))
    if count < 1 or not 0 <= index < count:
        raise ConfigError(
            f"config shard.index must be in 0..shard.count-1 and shard.count >= 1, got {index} of {count}"
        )
    return index, count


def fix_cublas_workspace() -> None:
    """cuBLAS's fixed workspace, which its deterministic GEMMs need (unless the environment sets
    one). cuBLAS reads it when it starts: call this before any GPU work that may later run
    under ``deterministic=true``."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def set_deterministic(on: bool) -> None:
    """``deterministic=true``: only deterministic kernels (cuBLAS with a fixed workspace, no
    cuDNN autotuning, PyTorch's deterministic variants), so that two runs on one GPU give
    bit-equal maps and predictions. A kernel with no deterministic variant warns and runs
    (``warn_only``), and the warning names it; the grounding backward runs in the strict mode
    (:func:`egg_eval.grounding.saliency._gradients`), where the fused attention backwards
    take their deterministic variants. Off by default: it costs speed, and on CPU the
    kernels are deterministic anyway."""
    import torch

    if on:
        fix_cublas_workspace()
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.benchmark = False if on else torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic = on


def method_of(cfg: DictConfig):
    """The :class:`~egg_eval.methods.Method` that ``cfg.method`` names, with its settings and the
    ``execution`` group's checked (their range errors said as config errors)."""
    from egg_eval.grounding.settings import ExecutionConfig
    from egg_eval.methods import METHODS

    try:
        execution = ExecutionConfig(**OmegaConf.to_container(cfg.execution, resolve=True))
        return METHODS[cfg.method.name].from_config(cfg.method, cfg.stopping, execution)
    except ValueError as e:  # the dataclasses' range checks
        raise ConfigError(f"config {e}") from None


def _checkpoint_path(cfg: DictConfig) -> str | None:
    from egg_eval.backbones.tiny import save_tiny
    from egg_eval.files import built_once

    b = cfg.backbone
    if b.get("tiny"):
        return str(
            built_once(Path(cfg.cache_dir) / f"tiny_{b.family}", lambda out: save_tiny(b.family, out, seed=cfg.seed))
        )
    return str(b.path) if b.path else None


def _load(cfg: DictConfig, path: str | None):
    from egg_eval.backbones import BACKBONES, load_backbone

    b = cfg.backbone
    try:
        return load_backbone(
            b.family,
            path,
            dtype=b.dtype,
            device=b.device,
            revision=b.get("revision"),
            attn_implementation=b.get("attn_implementation", "sdpa"),
            sdpa_cudnn=b.get("sdpa_cudnn", False),
            max_new_tokens=b.max_new_tokens,
            name=b.name,
            repetition_penalty=b.get("repetition_penalty"),
            **{k: b[k] for k in FAMILY_SETTINGS if b.get(k) is not None},
        )
    except OSError as e:  # transformers' message does not say which model it was loading
        source = path or BACKBONES[b.family].default_path
        hint = (
            ""
            if Path(source).is_dir()
            else f"\nWithout the hub: `hf download {source} --local-dir <dir>` where it is reachable, then pass "
            "backbone.path=<dir>."
        )
        raise LoadError(f"could not load backbone {b.name!r} from {source!r}: {e}{hint}") from e


def _data(cfg: DictConfig, spec):
    """The spec and the local path its rows are read from: ``dataset.path``, or for a toy subset
    without one its rows written offline under ``cache_dir``."""
    from egg_eval.data.toy import subset_dirname, write_toy_subset
    from egg_eval.files import built_once

    d = cfg.dataset
    path = Path(d.path).expanduser() if d.get("path") else None
    if d.get("toy") and path is None:
        n = d.get("toy_n") or 4
        path = built_once(
            Path(cfg.cache_dir) / "toy" / subset_dirname(d.toy, n), lambda o: write_toy_subset(d.toy, o, n=n)
        )
    if d.get("toy") and spec.boxes_id and (path / "gt_bbox").is_dir():  # a toy's side dataset of boxes
        spec = dataclasses.replace(spec, boxes_path=str(path / "gt_bbox"))
    return spec, (str(path) if path else None)


def _quiet_downloads() -> None:
    """No progress bars of the weights' and rows' loading: the run's own bar is the one shown."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def build(cfg: DictConfig):
    """Backbone, spec, samples and the method callable from a composed config."""
    # before anything loads (torch included): a mistyped setting fails now, not on every sample
    check_config(cfg)
    method = method_of(cfg)
    index, count = shard_of(cfg)
    b = cfg.backbone
    if b.path and not b.get("tiny"):  # the method's layer against the checkpoint's config.json
        check_layer(method.layer, b.path, b.get("revision"))
    import torch

    from egg_eval.backbones import BACKBONES
    from egg_eval.data.benchmarks import iter_samples

    _quiet_downloads()
    spec, data_path = _data(cfg, spec_from_config(cfg.dataset))
    path = _checkpoint_path(cfg)
    if not b.path:  # a tiny test model (built just now) or the family's default
        check_layer(method.layer, path or BACKBONES[b.family].default_path, b.get("revision"))
    torch.manual_seed(cfg.seed)
    set_deterministic(bool(cfg.get("deterministic", False)))
    backbone = _load(cfg, path)
    # images are decoded by the runner, for the samples it runs only (not those of other shards or already done)
    samples = iter_samples(spec, split=spec.split, path=data_path, limit=cfg.dataset.get("limit"), decode=False)
    if count > 1:  # sample i of the stream goes to shard i % count
        samples = (s for i, s in enumerate(samples) if i % count == index)
    return backbone, spec, samples, method


def main(cfg: DictConfig) -> dict:
    from egg_eval.loggers import WandbLogger, folder_run_id
    from egg_eval.runner import run

    backbone, spec, samples, method = build(cfg)
    rid = method.run_id(spec.protocol)
    out = run_dir(cfg, spec, backbone.name, rid)
    index, count = shard_of(cfg)
    if count > 1:  # each shard in its own folder; `python -m egg_eval.merge <out>` joins them
        out = out / f"shard-{index}-of-{count}"
    resolved = OmegaConf.to_container(cfg, resolve=True)
    loggers = []
    if cfg.logger.name == "wandb":
        loggers.append(
            WandbLogger(
                cfg.logger.project,
                resolved,
                name=f"{spec.name}/{backbone.name}/{rid}",
                mode=cfg.logger.get("mode"),
                entity=cfg.logger.get("entity"),
                run_id=folder_run_id(out),
            )
        )
    info = RunInfo(
        output_dir=out,
        spec=spec,
        method=cfg.method.name,
        backbone=backbone.name,
        tables_dir=Path(cfg.output_root) / "tables" if count == 1 else None,  # the merge writes the row
        config=resolved,
        seed=cfg.seed,
        model_revision=backbone.revision,
        decoding=backbone.effective_decoding(),
        progress=cfg.progress,
        pictures=cfg.get("pictures") or 0,
        retry_failed=cfg.get("retry_failed", True),
        max_failures_in_a_row=cfg.get("max_failures_in_a_row", 50),
        prefetch=cfg.get("prefetch", 4),
        fingerprint=run_fingerprint(resolved, backbone.fingerprint()),
        total=expected_total(cfg.dataset, spec, (index, count)),
        sample_set=sample_set(spec, cfg.dataset.get("limit")),
    )
    summary = run(samples, method.bind(backbone, spec.protocol), info, loggers)
    summary["output_dir"] = str(out)
    print(
        f"{spec.name} | {backbone.name} | {rid} | {score_text(summary)} "
        f"| samples {summary['n_samples']} | {failures_text(summary)} | "
        f"{summary.get('mean_time_s', 0):.2f} s/sample | {out}"
    )
    return summary


@hydra.main(config_path=CONFIG_DIR, config_name="eval", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    from egg_eval.runner import RunInterrupted

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        main(cfg)
    except ConfigError as e:  # one line, no traceback: the key and what it takes
        print(f"egg_eval: {e}", file=sys.stderr)
        sys.exit(2)
    except UsageError as e:  # the data, the folder or the model: the message says what to do
        print(f"egg_eval: {e}", file=sys.stderr)
        sys.exit(1)
    except RunInterrupted as e:
        print(f"\negg_eval: interrupted; {e}; rerun the same command to resume.", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("\negg_eval: interrupted before the first sample; nothing was recorded.", file=sys.stderr)
        sys.exit(130)
