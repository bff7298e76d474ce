"""Stream samples through a method, score them, and write every output of a run.

``records.jsonl`` is the source of truth: one line per sample, appended, flushed and
fsynced as soon as the sample is done. A rerun with the same ``output_dir`` skips the ids
already there (a torn last line from a killed run is cut off first), and every aggregate
is recomputed from the file, so a resumed run ends with the metrics of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import io
import json
import math
import os
import platform
import queue
import re
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egg_eval import metrics as M
from egg_eval.data.benchmarks import BenchmarkSpec, Sample, option_letters, prompt_for, scored_as_text
from egg_eval.files import folder_lock, write_atomic
from egg_eval.types import Trace


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


# -------------------------------------------------------------------- manifest
MANIFEST = "run.json"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs between two fingerprints."""
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_manifest(out: Path, fingerprint: dict) -> None:
    """Write ``out/run.json`` at a run's first start; on a resume, refuse to add records made
    with other result-affecting settings or other weights than the ones already there."""
    path = out / MANIFEST
    new = json.loads(json.dumps(fingerprint, default=str))
    if path.exists():
        changes = fingerprint_changes(json.loads(path.read_text()), new)
        if changes:
            raise ValueError(
                f"{out} holds a run made with other settings or another model ({'; '.join(changes)}). "
                "Resuming would mix their records. Rerun with the settings of that run, or use another "
                "output directory (output_dir=... or output_root=...) for the new ones."
            )
        return
    write_atomic(path, json.dumps(new, indent=1, sort_keys=True))


# --------------------------------------------------------------------- records
def read_records(path: Path) -> list[dict]:
    """Complete records of ``path``; a torn last line (killed mid-write) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        with open(path, "r+b") as f:
            f.truncate(cut)
    out = []
    for line in data[:cut].splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def score_sample(spec: BenchmarkSpec, sample: Sample, prediction: str | None) -> dict[str, float | None]:
    """Per-sample metric values (None where the split has no public answers)."""
    if prediction is None or not sample.answers:
        return {spec.metric: None}
    if spec.metric == "vqa_accuracy":
        return {"vqa_accuracy": M.vqa_accuracy(prediction, sample.answers)}
    if spec.metric == "anls":
        return {"anls": M.anls(prediction, sample.answers)}
    if spec.metric == "multiple_choice":
        if scored_as_text(sample):  # no options to choose from: the answer's text is compared
            return {"multiple_choice": M.free_form_match(prediction, sample.answers[0])}
        choices = sample.options or option_letters(sample.question) or list("ABCD")
        return {"multiple_choice": M.multiple_choice(prediction, choices, sample.answers[0])}
    if spec.metric == "pope":
        return {"pope": float(M.pope_parse(prediction) == M.pope_label(sample.answers[0]))}
    if spec.metric == "exact_match":
        return {"exact_match": M.exact_match(prediction, sample.answers[0])}
    raise ValueError(f"unknown metric {spec.metric!r}")


def localisation(sample: Sample, trace: Trace | None) -> dict[str, float | None]:
    """IoU of the top region (the first crop the answer saw) with the best-matching ground-truth
    box, and a hit when that box's centre lies inside the region."""
    if not sample.bbox or trace is None or len(trace.final_views) < 2:
        return {}
    return M.region_localisation(trace.final_views[1].as_list(), sample.bbox)


def make_record(
    sample: Sample, prediction, trace: Trace | None, error: str | None, spec: BenchmarkSpec, elapsed: float
) -> dict:
    t = trace.to_dict() if trace is not None else {}
    metrics = None
    if error is None:
        try:
            metrics = score_sample(spec, sample, prediction)
        except Exception as e:  # a gold answer the metric cannot read fails this sample, not the run
            error = f"scoring the prediction: {type(e).__name__}: {e}"
    if metrics is None:
        metrics = {spec.metric: 0.0 if sample.answers else None}
    return {
        "id": sample.id,
        "subset": sample.subset,
        "question": sample.question,
        "prediction": prediction,
        "answers": sample.answers,
        "metrics": metrics,
        "localisation": localisation(sample, trace) if error is None else {},
        "rounds": t.get("rounds", []),
        "final_views": t.get("final_views", []),
        "stop_reason": t.get("stop_reason"),
        "n_forward": t.get("n_forward", 0),
        "n_backward": t.get("n_backward", 0),
        "n_tower": t.get("n_tower", 0),
        "n_grounded": t.get("n_grounded", 0),
        "prefix_tokens": t.get("prefix_tokens", 0),
        "memory_fallbacks": t.get("memory_fallbacks", 0),
        "memory_limited": t.get("memory_limited", 0),
        "recomputed_layers": t.get("recomputed_layers", 0),
        "lean_passes": t.get("lean_passes", 0),
        "time_ground_s": t.get("time_ground_s", 0.0),
        "time_answer_s": t.get("time_answer_s", 0.0),
        "time_s": elapsed,
        "error": error,
    }


# ------------------------------------------------------------------- aggregate
def aggregate(records: list[dict], spec: BenchmarkSpec) -> dict[str, Any]:
    """Headline metrics of a run from its records (failures count as wrong where scored)."""
    out: dict[str, Any] = {"n_samples": len(records), "n_failures": sum(r["error"] is not None for r in records)}
    # what failed, by kind (error_kind), most frequent first
    kinds: dict[str, int] = {}
    for r in records:
        if r["error"] is not None:
            kind = error_kind(r["error"])
            kinds[kind] = kinds.get(kind, 0) + 1
    out["failures_by_kind"] = dict(sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
    scored = [r for r in records if r["metrics"].get(spec.metric) is not None]
    out["n_scored"] = len(scored)
    if spec.metric == "pope" and scored:
        per = {}
        for sub in sorted({r["subset"] for r in scored}):
            rs = [r for r in scored if r["subset"] == sub]
            # a failed sample (its error recorded) is wrong in every count and in no yes-ratio
            preds = [r["prediction"] if r["error"] is None else None for r in rs]
            per[sub] = M.pope(preds, [r["answers"][0] for r in rs])
        out["pope_splits"] = per
        for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            out[f"pope_{k}"] = sum(p[k] for p in per.values()) / len(per)
        out["pope_n_failed"] = sum(p["n_failed"] for p in per.values())
        out["score"] = out["pope_accuracy"]
    elif scored:
        out["score"] = sum(r["metrics"][spec.metric] for r in scored) / len(scored)
    else:
        out["score"] = None
    locs = [r["localisation"] for r in records if r.get("localisation")]
    if locs:
        out["mean_iou"] = sum(x["iou"] for x in locs) / len(locs)
        out["hit_rate"] = sum(x["hit"] for x in locs) / len(locs)
    ok = [r for r in records if r["error"] is None]
    if ok:
        out["mean_time_s"] = sum(r["time_s"] for r in ok) / len(ok)
        out["mean_forward"] = sum(r["n_forward"] for r in ok) / len(ok)
        out["mean_backward"] = sum(r["n_backward"] for r in ok) / len(ok)
        # grounding passes redone with less memory (batch split, layers recomputed)
        out["memory_fallbacks"] = sum(r.get("memory_fallbacks", 0) for r in ok)
        # grounding passes planned smaller to keep within method.activation_memory_gb
        out["memory_limited"] = sum(r.get("memory_limited", 0) for r in ok)
        # decoder layers those passes recomputed in their backward (num_layers = one forward)
        out["recomputed_layers"] = sum(r.get("recomputed_layers", 0) for r in ok)
        # passes of those that kept lean activations (egg_eval.backbones.lean)
        out["lean_passes"] = sum(r.get("lean_passes", 0) for r in ok)
    return out


# ----------------------------------------------------------------- submission
def write_submission(records: list[dict], spec: BenchmarkSpec, out_dir: Path) -> Path | None:
    """Predictions in the official server's format (also for splits without answers)."""

    def pred(r):
        return r["prediction"] if r["prediction"] is not None else ""

    if spec.submission == "evalai":  # TextVQA
        rows = [{"question_id": int(r["id"]) if r["id"].isdigit() else r["id"], "answer": pred(r)} for r in records]
    elif spec.submission == "rrc":  # DocVQA, InfographicVQA
        rows = [{"questionId": int(r["id"]) if r["id"].isdigit() else r["id"], "answer": pred(r)} for r in records]
    elif spec.submission == "gqa":
        rows = [{"questionId": r["id"], "prediction": pred(r)} for r in records]
    else:
        return None
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


def append_table_row(tables_dir: Path, info: RunInfo, summary: dict) -> Path:
    """One row per finished run in ``tables_dir/<dataset>.csv`` (header written once)."""
    tables_dir.mkdir(parents=True, exist_ok=True)
    path = tables_dir / f"{info.spec.name}.csv"
    cfg = info.config
    method = cfg.get("method", {})
    stopping = cfg.get("stopping", {}) if method.get("name", info.method) != "vanilla" else {}
    row = {
        "dataset": info.spec.name,
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
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=list(row))
    if not path.exists():
        w.writeheader()
    w.writerow(row)
    with open(path, "a", newline="") as f:  # one write: a killed run adds a whole row or none
        f.write(text.getvalue())
    return path


# ------------------------------------------------------------------------ run
Method = Callable[[Any, str], tuple[str, Trace]]


_END = object()  # the prefetching thread's last item; an exception of the stream is put in its place


def prefetched(samples: Iterable[Sample], depth: int, skip: Collection[str] = ()) -> Iterator[Sample]:
    """``samples`` in their order, each read from the stream and its image decoded
    (:meth:`Sample.load`) up to ``depth`` samples ahead, in a background thread, so that
    reading and decoding (tens of milliseconds for a document page) overlap the model's work
    on the sample before. Samples whose id is in ``skip`` (already recorded) are passed on
    undecoded. An error of the stream itself (a missing column, a dataset that cannot be
    read) is raised here after the samples before it, as it would be without prefetching.
    ``depth`` 0: the stream as it is, decoded by the caller."""
    if depth <= 0:
        yield from samples
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for sample in samples:
                if sample.id not in skip:
                    sample.load()
                if not put(sample):
                    return
            put(_END)
        except BaseException as e:  # the consumer raises it in its turn
            put(e)

    thread = threading.Thread(target=produce, name="egg_eval-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:  # the consumer stopped (done, or an error): the thread stops at its next sample
        stop.set()


def run(samples: Iterable[Sample], method: Method, info: RunInfo, loggers: list | None = None) -> dict:
    """Process every sample not yet in ``records.jsonl``; return the summary. One process at
    a time per output folder (:func:`~egg_eval.files.folder_lock`)."""
    with folder_lock(info.output_dir):
        return _run(samples, method, info, loggers)


def _run(samples: Iterable[Sample], method: Method, info: RunInfo, loggers: list | None = None) -> dict:
    import torch

    loggers = loggers or []
    out = info.output_dir
    out.mkdir(parents=True, exist_ok=True)
    if info.fingerprint is not None:
        check_manifest(out, info.fingerprint)
    rec_path = out / "records.jsonl"
    records = read_records(rec_path)
    if info.retry_failed:
        records = _drop_failed(rec_path, records)
    done = {r["id"]: r.get("question") for r in records}  # id -> the question it was asked with
    bar = None
    if info.progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"{info.spec.name}/{info.method}", unit="sample", initial=len(done))
    running = [r["metrics"].get(info.spec.metric) for r in records if r["metrics"].get(info.spec.metric) is not None]
    seen: set[str] = set()  # ids of this stream so far: an id is a record's key, so it must be unique
    streak: list[str] = []  # the model-call errors since the last sample the model answered
    stream = prefetched(samples, info.prefetch, skip=set(done))
    with open(rec_path, "a") as f, contextlib.closing(stream):
        for sample in stream:
            if sample.id in seen:
                raise ValueError(
                    f"sample id {sample.id!r} occurs twice in the dataset (question {sample.question!r} the second "
                    "time): ids key the records, the resume and the submission file, so they must be unique. Point "
                    "dataset.columns.id at a unique column. The records written so far are kept."
                )
            seen.add(sample.id)
            if sample.id in done:
                if done[sample.id] not in (None, sample.question):
                    raise ValueError(
                        f"{rec_path} already holds sample {sample.id!r} with another question "
                        f"({done[sample.id]!r}, now {sample.question!r}): the data changed since that run. "
                        "Resume only the same data; for new data use another output directory "
                        "(output_root=... or run_id=...) or move the old one away."
                    )
                continue
            sample.load()  # decoded only for a sample that runs (or already, ahead); not timed: time_s is the method's
            t0 = time.perf_counter()
            prediction, trace, error, fatal, out_of_memory = None, None, sample.error, False, False
            if error is None:
                try:
                    prediction, trace = method(sample.image, prompt_for(sample, info.spec.kind))
                    streak.clear()
                except torch.OutOfMemoryError as e:  # recorded; the run goes on
                    error, out_of_memory = f"OutOfMemoryError: {str(e)[:200]}", True
                    streak.append(error)
                except Exception as e:
                    error = f"{type(e).__name__}: {e}"
                    streak.append(error)
                    fatal = _device_broken(e)
                if out_of_memory and torch.cuda.is_available():
                    # out of the except block, the traceback no longer holds the failed
                    # sample's tensors: hand their memory back before the next sample
                    gc.collect()
                    torch.cuda.empty_cache()
            rec = make_record(sample, prediction, trace, error, info.spec, time.perf_counter() - t0)
            if info.pictures and trace is not None and trace.rounds:
                _picture(out, sample, trace, info.pictures, loggers)
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
            done[sample.id] = sample.question
            records.append(rec)
            for lg in loggers:
                lg.log_record(rec)
            v = rec["metrics"].get(info.spec.metric)
            if v is not None:
                running.append(v)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    acc=f"{sum(running) / len(running):.3f}" if running else "-", s_per=f"{rec['time_s']:.2f}"
                )
            if fatal or (info.max_failures_in_a_row and len(streak) >= info.max_failures_in_a_row):
                if bar is not None:
                    bar.close()
                raise RuntimeError(_stop_message(sample.id, streak, fatal, rec_path, len(records)))
    if bar is not None:
        bar.close()
    return finalize(out, info, loggers)


def _drop_failed(rec_path: Path, records: list[dict]) -> list[dict]:
    """The records without those that hold an error, written back whole (atomically) so that
    the rerun computes those samples again: an out-of-memory sample may fit on a larger GPU, and
    a run stopped by a broken device recorded the sample it broke on."""
    kept = [r for r in records if r.get("error") is None]
    if len(kept) < len(records):
        import logging

        logging.getLogger("egg_eval").info(
            "%s: retrying %d sample(s) that failed before (retry_failed=false keeps their errors)",
            rec_path.parent,
            len(records) - len(kept),
        )
        write_atomic(rec_path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _device_broken(e: Exception) -> bool:
    """A CUDA error other than out-of-memory (a device-side assert, an illegal memory access)
    leaves the process's CUDA context unusable: every later sample would fail with it."""
    import torch

    accel = getattr(torch, "AcceleratorError", ())
    text = str(e)
    return (isinstance(e, accel) or "CUDA error" in text) and "out of memory" not in text


def _stop_message(sample_id: str, streak: list[str], fatal: bool, rec_path: Path, n_records: int) -> str:
    if fatal:
        why = (
            f"sample {sample_id!r} raised a device error ({streak[-1][:300]}), after which this process "
            "cannot use the GPU again"
        )
    else:
        why = (
            f"the last {len(streak)} samples all failed in the model (the last, {sample_id!r}: {streak[-1][:300]}), "
            "which points at the model, the device or the settings rather than at the samples "
            "(max_failures_in_a_row sets how many; 0 never stops)"
        )
    return (
        f"stopped: {why}. The {n_records} records in {rec_path} are kept; rerunning the same command resumes "
        "the run and computes the failed samples again (retry_failed=false keeps their errors and goes on past them)."
    )


def finalize(out: Path, info: RunInfo, loggers: list | None = None) -> dict:
    """Recompute every aggregate from ``out/records.jsonl``; write the summary, the submission
    file, the gallery and the table row (used by a run and by the shard merge)."""
    records = read_records(out / "records.jsonl")
    summary = {
        "dataset": info.spec.name,
        "hf_id": info.spec.hf_id,
        "split": info.spec.split,
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
        from egg_eval.viz import write_gallery

        write_gallery(out, title=f"{info.spec.name} / {info.backbone} / {info.method}")
    sub = write_submission(records, info.spec, out)
    summary["submission_file"] = sub.name if sub else None
    write_atomic(out / "summary.json", json.dumps(summary, indent=2, default=_json_default))
    if info.tables_dir is not None:
        append_table_row(info.tables_dir, info, summary)
    for lg in loggers or []:
        lg.finish(summary, records)
    return summary


def error_kind(error: str) -> str:
    """A record's error without what varies per sample: its type and the head of its message,
    less names, numbers and bracketed parts ("OutOfMemoryError: CUDA out of memory",
    "ValueError: not an image PIL can read", "ValueError: empty question")."""
    head, _, msg = error.partition(": ")
    msg = re.sub(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|\b\d[\d.,]*\b", "", msg)  # names, numbers, [Errno 2]
    msg = " ".join(re.split(r"[.:(;,\n]", msg, maxsplit=1)[0].split())[:60]
    return f"{head}: {msg}" if msg else head


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


def safe_name(sample_id: str) -> str:
    """A file name for a sample id (ids may hold '/', e.g. POPE's 'adversarial/12')."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(sample_id))[:150]


def _picture(out: Path, sample: Sample, trace: Trace, limit: int, loggers: list) -> None:
    """Save the sample's figure while fewer than ``limit`` exist; a drawing failure never stops the run."""
    from egg_eval.viz import sample_figure

    pics = out / "pictures"
    pics.mkdir(exist_ok=True)
    if sum(1 for _ in pics.glob("*.png")) >= limit:
        return
    try:
        path = pics / f"{safe_name(sample.id)}.png"
        figure = sample_figure(sample.image, trace, evidence=sample.bbox)
        write_atomic(path, lambda tmp: figure.save(tmp, format="PNG"))
    except Exception as e:  # pragma: no cover - drawing is best effort
        import logging

        logging.getLogger(__name__).warning("picture of %s failed: %s", sample.id, e)
        return
    for lg in loggers:
        if hasattr(lg, "log_picture"):
            lg.log_picture(sample.id, path)


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)
