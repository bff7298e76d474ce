"""``python -m egg_eval backbone=qwen25vl dataset=docvqa`` — Hydra composes configs/eval.yaml."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from egg_eval.config_check import FAMILY_SETTINGS, check_config
from egg_eval.data.benchmarks import BenchmarkSpec

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
ASSETS = Path(__file__).resolve().parent / "assets"
log = logging.getLogger("egg_eval")
# ${egg_asset:toy_vlm} -> the shipped checkpoint's directory, wherever egg_eval is installed
OmegaConf.register_new_resolver("egg_asset", lambda name: str(ASSETS / name), replace=True)


def shard_of(cfg: DictConfig) -> tuple[int, int]:
    """(index, count) of ``shard``; a clear error for an index outside 0..count-1."""
    sh = cfg.get("shard") or {}
    index, count = int(sh.get("index", 0)), int(sh.get("count", 1))
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard.index must be in 0..shard.count-1 and shard.count >= 1, got {index} of {count}")
    return index, count


# Settings a sample's record does not depend on: where outputs go and how they are shown,
# which samples run (limit, shard), the device, the speed options that are exact by
# construction, and the checkpoint's path (its weights are fingerprinted instead).
NOT_IN_RESULT = (
    "progress",
    "output_root",
    "output_dir",
    "cache_dir",
    "pictures",
    "logger",
    "shard",
    "dataset.limit",
    "backbone.device",
    "backbone.attn_implementation",
    "backbone.sdpa_cudnn",
    "backbone.path",
    "method.batch_views",
    "method.reuse_features",
    "method.reuse_prefix",
    "method.checkpoint_layers",
    "method.activation_memory_gb",
    "method.lean_activations",
    "deterministic",
    "retry_failed",
    "max_failures_in_a_row",
    "prefetch",
)


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


def run_fingerprint(resolved: dict, model: dict) -> dict:
    """What a run's records depend on (compared on resume): the resolved settings less
    :data:`NOT_IN_RESULT`, and the weights' identity (``Backbone.fingerprint``)."""
    from egg_eval.runner import flatten

    settings = {
        k: v for k, v in flatten(resolved).items() if not any(k == x or k.startswith(x + ".") for x in NOT_IN_RESULT)
    }
    return {"settings": settings, "model": model}


def run_id(cfg: DictConfig) -> str:
    """A stable folder name from the settings that change results (the key for resume)."""
    m, s = cfg.method, cfg.stopping
    protocol = "_likelihood" if cfg.dataset.get("protocol") == "likelihood" else ""
    if m.name == "vanilla":
        return "vanilla" + protocol
    layer = "last" if m.layer is None else m.layer
    stop = s.name if s.get("n") is None else f"{s.name}{s.n}"
    return f"egg_{m.objective}_k{m.top_k}_L{layer}_t{m.token_index}_s{m.sigma}_{stop}{protocol}"


def _boxes_kwargs(boxes) -> dict:
    """``dataset.boxes`` (a side dataset of evidence boxes joined by id) -> BenchmarkSpec fields."""
    if not boxes:
        return {}
    return {
        "boxes_id": boxes.get("hf_id"),
        "boxes_split": boxes.get("split", "train"),
        "boxes_key": boxes.get("key", "dataset_id"),
        "boxes_column": boxes.get("column", "bbox"),
        "boxes_format": boxes.get("format", "xywh"),
        "boxes_path": boxes.get("path"),
    }


def spec_from_config(d) -> BenchmarkSpec:
    """The ``dataset`` config group as a :class:`BenchmarkSpec`."""
    from egg_eval.data.benchmarks import BenchmarkSpec

    return BenchmarkSpec(
        name=d.name,
        hf_id=d.hf_id,
        split=d.split,
        metric=d.metric,
        kind=d.kind,
        config_name=d.get("config_name"),
        revision=d.get("revision"),
        columns=dict(d.get("columns") or {}),
        splits=tuple(d.get("splits") or ()),
        images_id=d.get("images_id"),
        images_config=d.get("images_config"),
        images_split=d.get("images_split"),
        submission=d.get("submission"),
        bbox_format=d.get("bbox_format", "xyxy"),
        max_pixels=d.get("max_pixels"),
        **_boxes_kwargs(d.get("boxes")),
    )


def egg_config(cfg: DictConfig):
    """The :class:`EggConfig` of ``cfg.method`` and ``cfg.stopping`` (``None`` for vanilla);
    its own checks refuse a setting out of range."""
    from egg_eval.grounding.refine import EggConfig
    from egg_eval.grounding.regions import RegionParams

    m, s = cfg.method, cfg.stopping
    if m.name == "vanilla":
        return None
    return EggConfig(
        objective=m.objective,
        token_index=m.token_index,
        layer=m.layer,
        regions=RegionParams(sigma=m.sigma, top_k=m.top_k, max_aspect=m.max_aspect, min_size=m.min_size),
        stopping=s.name,
        n_rounds=1 if s.get("n") is None else s.n,
        max_rounds=m.max_rounds,
        batch_views=m.get("batch_views", True),
        reuse_features=m.get("reuse_features", True),
        reuse_prefix=m.get("reuse_prefix", True),
        checkpoint_layers=m.get("checkpoint_layers", False),
        activation_memory_gb=m.get("activation_memory_gb", "auto"),
        lean_activations=m.get("lean_activations", "auto"),
    )


def build(cfg: DictConfig):
    """Backbone, spec, samples and the method callable from a composed config."""
    import torch

    from egg_eval.backbones import BACKBONES, load_backbone
    from egg_eval.backbones.tiny import save_tiny
    from egg_eval.data.benchmarks import iter_samples
    from egg_eval.data.toy import subset_dirname, write_toy_subset
    from egg_eval.files import built_once

    # before anything loads: a mistyped setting fails now, not on every sample
    check_config(cfg)
    egg = egg_config(cfg)
    answer = answer_for(cfg)
    torch.manual_seed(cfg.seed)
    set_deterministic(bool(cfg.get("deterministic", False)))
    b = cfg.backbone
    path = b.path
    if b.get("tiny"):
        path = built_once(Path(cfg.cache_dir) / f"tiny_{b.family}", lambda out: save_tiny(b.family, out, seed=cfg.seed))
    try:
        backbone = load_backbone(
            b.family,
            str(path) if path else None,
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
        source = str(path) if path else BACKBONES[b.family].default_path
        hint = (
            ""
            if Path(source).is_dir()
            else f"\nWithout the hub: `hf download {source} --local-dir <dir>` where it is reachable, then pass "
            "backbone.path=<dir>."
        )
        raise OSError(f"could not load backbone {b.name!r} from {source!r}: {e}{hint}") from e
    d = cfg.dataset
    spec = spec_from_config(d)
    data_path = d.get("path")
    if d.get("toy"):
        n = d.get("toy_n") or 4
        data_path = built_once(
            Path(cfg.cache_dir) / "toy" / subset_dirname(d.toy, n), lambda out: write_toy_subset(d.toy, out, n=n)
        )
        if spec.boxes_id:  # the toy writes its side dataset of boxes next to the rows
            spec = dataclasses.replace(spec, boxes_path=str(data_path / "gt_bbox"))
    # images are decoded by the runner, for the samples it runs only (not those of other shards or already done)
    path = str(data_path) if data_path else None
    samples = iter_samples(spec, split=d.split, path=path, limit=d.get("limit"), decode=False)
    index, count = shard_of(cfg)
    if count > 1:  # sample i of the stream goes to shard i % count
        samples = (s for i, s in enumerate(samples) if i % count == index)
    return backbone, spec, samples, method_for(backbone, egg, answer)


def answer_for(cfg: DictConfig):
    """The answer pass of ``dataset.protocol``: generated text, or the likeliest option."""
    from egg_eval.grounding.refine import answer_by_likelihood, answer_with_views

    protocol = cfg.dataset.get("protocol") or "generate"
    if protocol not in ("generate", "likelihood"):
        raise ValueError(f"dataset.protocol must be 'generate' or 'likelihood', got {protocol!r}")
    return answer_by_likelihood if protocol == "likelihood" else answer_with_views


def method_for(backbone, egg, answer):
    """The runner's method on ``backbone``: the plain model where ``egg`` is None (method=vanilla),
    else EGG with those settings; either answering with ``answer`` (:func:`answer_for`)."""
    from egg_eval.grounding.refine import run_egg, run_vanilla

    if egg is None:

        def method(image, text):
            return run_vanilla(backbone, image, text, answer=answer)
    else:
        backbone.check_layer(egg.layer)

        def method(image, text):
            return run_egg(backbone, image, text, egg, answer=answer)

    return method


def main(cfg: DictConfig) -> dict:
    from egg_eval.loggers import WandbLogger, folder_run_id
    from egg_eval.runner import RunInfo, failures_text, run, score_text

    backbone, spec, samples, method = build(cfg)
    default_out = Path(cfg.output_root) / "runs" / spec.name / backbone.name / run_id(cfg)
    out = Path(cfg.output_dir) if cfg.output_dir else default_out
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
                name=f"{spec.name}/{backbone.name}/{run_id(cfg)}",
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
    )
    summary = run(samples, method, info, loggers)
    log.info(
        "%s %s %s: %s = %s over %d samples (%d failures) -> %s",
        spec.name,
        backbone.name,
        cfg.method.name,
        spec.metric,
        summary.get("score"),
        summary["n_samples"],
        summary["n_failures"],
        out,
    )
    print(
        f"{spec.name} | {backbone.name} | {run_id(cfg)} | {score_text(summary)} "
        f"| samples {summary['n_samples']} | {failures_text(summary)} | "
        f"{summary.get('mean_time_s', 0):.2f} s/sample | {out}"
    )
    return summary


@hydra.main(config_path=CONFIG_DIR, config_name="eval", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    main(cfg)
