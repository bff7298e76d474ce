"""What a finished run writes beside its records: ``summary.json`` (every aggregate recomputed
from ``records.jsonl``, with provenance), the official server's submission file, the gallery, and
its one row in ``results/tables/<dataset>.csv``."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egg_eval.data.benchmarks import BenchmarkSpec
from egg_eval.files import write_atomic
from egg_eval.records import RECORDS, read_records
from egg_eval.scoring import aggregate
from egg_eval.viz import write_gallery

log = logging.getLogger("egg_eval")


@dataclass
class RunInfo:
    output_dir: Path
    spec: BenchmarkSpec
    method: str
    backbone: str
    tables_dir: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    model_revision: str | None = None
    progress: bool = True
    pictures: int = 0  # draw the first N samples (saliency overlay + boxes per round) into pictures/
    fingerprint: dict[str, Any] | None = None  # what the records depend on; checked on resume (run.json)
    decoding: dict[str, Any] | None = None  # the answers' effective decoding settings (Backbone.effective_decoding)
    retry_failed: bool = True  # a rerun computes again the samples whose record holds an error
    max_failures_in_a_row: int = 50  # stop when this many model calls fail in a row (0: never)
    prefetch: int = 4  # samples read and decoded ahead in a background thread (0: none)
    total: int | None = None  # samples the run will see, where the split's size is known (the progress bar's)
    sample_set: dict[str, Any] = field(default_factory=dict)  # split, sub-splits, limit (summary, tables)


def _question_id(r: dict):
    return int(r["id"]) if r["id"].isdigit() else r["id"]


def _prediction(r: dict) -> str:
    return r["prediction"] if r["prediction"] is not None else ""


# the official servers' formats: file name suffix -> one row per record
SUBMISSIONS: dict[str, Callable[[dict], dict]] = {
    "evalai": lambda r: {"question_id": _question_id(r), "answer": _prediction(r)},  # TextVQA
    "rrc": lambda r: {"questionId": _question_id(r), "answer": _prediction(r)},  # DocVQA, InfographicVQA
    "gqa": lambda r: {"questionId": r["id"], "prediction": _prediction(r)},
}


def write_submission(records: list[dict], spec: BenchmarkSpec, out_dir: Path) -> Path | None:
    """Predictions in the official server's format (also for splits without answers)."""
    if spec.submission is None:
        return None
    rows = [SUBMISSIONS[spec.submission](r) for r in records]
    return write_atomic(out_dir / f"submission_{spec.submission}.json", json.dumps(rows, indent=1))


def _git_revision() -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
            ).stdout.strip()
            or None
        )
    except Exception:
        return None


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "datasets", "hydra-core", "egg_eval"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def table_row(info: RunInfo, summary: dict) -> dict[str, Any]:
    cfg = info.config
    method = cfg.get("method", {})
    stopping = cfg.get("stopping", {}) if method.get("name", info.method) != "vanilla" else {}
    sample_set = info.sample_set
    return {
        "dataset": info.spec.name,
        "split": sample_set.get("split", info.spec.split),
        "limit": sample_set.get("limit"),
        "backbone": info.backbone,
        "method": info.method,
        "objective": method.get("objective"),
        "top_k": method.get("top_k"),
        "layer": method.get("layer"),
        "token_index": method.get("token_index"),
        "sigma": method.get("sigma"),
        # the stopping group is composed for every method, but only EGG has rounds to stop
        "stopping": stopping.get("name"),
        "n_rounds": stopping.get("n"),
        "metric": info.spec.metric,
        "score": summary.get("score"),
        "n_samples": summary["n_samples"],
        "n_failures": summary["n_failures"],
        "mean_time_s": summary.get("mean_time_s"),
        "mean_iou": summary.get("mean_iou"),
        "output_dir": str(info.output_dir),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def write_table_row(tables_dir: Path, info: RunInfo, summary: dict) -> Path:
    """The run's row in ``tables_dir/<dataset>.csv``, one per run folder: a rerun of the same
    folder replaces its row (rewritten whole, atomically) instead of adding a second."""
    tables_dir.mkdir(parents=True, exist_ok=True)
    path = tables_dir / f"{info.spec.name}.csv"
    row = table_row(info, summary)
    rows = list(csv.DictReader(io.StringIO(path.read_text()))) if path.exists() else []
    rows = [r for r in rows if r.get("output_dir") != row["output_dir"]] + [row]
    fields = list(dict.fromkeys([*row, *(k for r in rows for k in r)]))
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=fields, restval="")
    w.writeheader()
    w.writerows(rows)
    return write_atomic(path, text.getvalue())


def finalize(out: Path, info: RunInfo, loggers: list | None = None, ids: list[str] | None = None) -> dict:
    """Recompute every aggregate from ``out/records.jsonl``; write the summary, the submission
    file, the gallery and the table row (used by a run and by the shard merge). ``ids``: the
    samples of the run's stream; a record of another sample is not reported (the manifest
    already refuses to mix sample sets: this is the last guard)."""
    records = read_records(out / RECORDS)
    if ids is not None:
        wanted = set(ids)
        extra = [r["id"] for r in records if r["id"] not in wanted]
        if extra:
            log.warning("%s: %d record(s) of samples outside this run's sample set are not reported", out, len(extra))
        records = [r for r in records if r["id"] in wanted]
    summary = {
        "dataset": info.spec.name,
        "hf_id": info.spec.hf_id,
        "split": info.spec.split,
        "sample_set": info.sample_set,
        "dataset_revision": info.spec.revision,
        "backbone": info.backbone,
        "model_revision": info.model_revision,
        "decoding": info.decoding,
        "fingerprint": info.fingerprint,
        "method": info.method,
        "metric": info.spec.metric,
        **aggregate(records, info.spec),
        "seed": info.seed,
        "versions": _versions(),
        "git_revision": _git_revision(),
        "config": info.config,
    }
    if (out / "pictures").is_dir():
        write_gallery(out, title=f"{info.spec.name} / {info.backbone} / {info.method}")
    sub = write_submission(records, info.spec, out)
    summary["submission_file"] = sub.name if sub else None
    write_atomic(out / "summary.json", json.dumps(summary, indent=2, default=_json_default))
    if info.tables_dir is not None:
        write_table_row(info.tables_dir, info, summary)
    for lg in loggers or []:
        lg.finish(summary, records)
    return summary


def failures_text(summary: dict) -> str:
    """``failures 3 (2 OutOfMemoryError, 1 UnidentifiedImageError)`` for the printed line."""
    kinds = summary.get("failures_by_kind") or {}
    detail = ", ".join(f"{n} {k}" for k, n in kinds.items())
    return f"failures {summary['n_failures']}" + (f" ({detail})" if detail else "")


def score_text(summary: dict) -> str:
    """The run's score as its one printed line shows it: ``exact_match = 66.67%``, in percent
    like the paper's tables, or the reason there is none."""
    score = summary.get("score")
    if score is None:
        why = "no public answers in this split" if summary.get("n_samples") else "no samples"
        return f"{summary.get('metric')} = - ({why})"
    return f"{summary.get('metric')} = {100 * score:.2f}%"


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)
