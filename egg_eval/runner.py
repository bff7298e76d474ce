"""Stream samples through a method, record each one, and finish the run's outputs.

Each sample's record is appended to ``records.jsonl`` (:mod:`egg_eval.records`) as soon as it
is done. A rerun of the same folder skips the ids already there and computes again those that
failed (``retry_failed``); every aggregate is recomputed from the file (:mod:`egg_eval.outputs`),
so a resumed run ends with the metrics of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from egg_eval.data.benchmarks import Sample
from egg_eval.data.prompts import prompt_for
from egg_eval.data.stream import prefetched
from egg_eval.errors import RunStopped, SettingsError
from egg_eval.files import folder_lock, safe_name, write_atomic
from egg_eval.outputs import RunInfo, finalize
from egg_eval.progress import Progress
from egg_eval.records import RECORDS, append_record, check_manifest, drop_failed, read_records, write_manifest
from egg_eval.scoring import make_record
from egg_eval.types import Trace
from egg_eval.viz import sample_figure

__all__ = ["Method", "RunInfo", "RunInterrupted", "run"]
log = logging.getLogger("egg_eval")
Method = Callable[[Any, str], tuple[str, Trace]]


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: what was recorded, and where (the CLI says so in one line)."""

    def __init__(self, records: Path, n_records: int):
        super().__init__(f"{n_records} records kept in {records}")
        self.records, self.n_records = records, n_records


def run(samples: Iterable[Sample], method: Method, info: RunInfo, loggers: list | None = None) -> dict:
    """Process every sample not yet in ``records.jsonl``; return the summary. One process at
    a time per output folder (:func:`~egg_eval.files.folder_lock`)."""
    with folder_lock(info.output_dir):
        return _run(samples, method, info, loggers or [])


def _run(samples: Iterable[Sample], method: Method, info: RunInfo, loggers: list) -> dict:
    out = info.output_dir
    out.mkdir(parents=True, exist_ok=True)
    if info.fingerprint is not None:
        check_manifest(out, info.fingerprint)
    rec_path = out / RECORDS
    records = read_records(rec_path)
    if info.retry_failed:
        records = drop_failed(rec_path, records)
    done = {r["id"]: r.get("question") for r in records}  # id -> the question it was asked with
    progress = Progress(f"{info.spec.name}/{info.method}", info.total, len(done), enabled=info.progress)
    metric = info.spec.metric
    running = [r["metrics"][metric] for r in records if r["metrics"].get(metric) is not None]
    seen: dict[str, None] = {}  # ids of this stream, in order: an id is a record's key, so it must be unique
    streak: list[str] = []  # the model-call errors since the last sample the model answered
    stream = prefetched(samples, info.prefetch, skip=set(done))
    try:
        with open(rec_path, "a") as f, contextlib.closing(stream):
            for sample in stream:
                _check_id(sample, seen, done, rec_path)
                seen[sample.id] = None
                if sample.id in done:
                    continue
                rec, trace, fatal = _one(sample, method, info, streak)
                if info.pictures and trace is not None and trace.rounds:
                    _picture(out, sample, trace, info.pictures, loggers)
                if not records and info.fingerprint is not None:  # the first record pins the run's settings
                    write_manifest(out, info.fingerprint)
                append_record(f, rec)
                done[sample.id] = sample.question
                records.append(rec)
                for lg in loggers:
                    lg.log_record(rec)
                if rec["metrics"].get(metric) is not None:
                    running.append(rec["metrics"][metric])
                score = f"{metric} {sum(running) / len(running):.3f}" if running else ""
                progress.update(f"{score}, {rec['time_s']:.2f} s/sample" if score else f"{rec['time_s']:.2f} s/sample")
                if fatal or (info.max_failures_in_a_row and len(streak) >= info.max_failures_in_a_row):
                    raise RunStopped(_stop_message(sample.id, streak, fatal, rec_path, len(records)))
    except KeyboardInterrupt:
        raise RunInterrupted(rec_path, len(records)) from None
    finally:
        progress.close()
    return finalize(out, info, loggers, ids=list(seen))


def _check_id(sample: Sample, seen: dict, done: dict, rec_path: Path) -> None:
    if sample.id in seen:
        raise SettingsError(
            f"sample id {sample.id!r} occurs twice in the dataset (question {sample.question!r} the second "
            "time): ids key the records, the resume and the submission file, so they must be unique. Point "
            "dataset.columns.id at a unique column. The records written so far are kept."
        )
    if sample.id in done and done[sample.id] not in (None, sample.question):
        raise SettingsError(
            f"{rec_path} already holds sample {sample.id!r} with another question "
            f"({done[sample.id]!r}, now {sample.question!r}): the data changed since that run. "
            "Resume only the same data; for new data use another output directory "
            "(output_root=... or output_dir=...) or move the old one away."
        )


def _one(sample: Sample, method: Method, info: RunInfo, streak: list[str]) -> tuple[dict, Trace | None, bool]:
    """The sample's record, its trace, and whether its error leaves the device unusable."""
    import torch

    sample.load()  # decoded only for a sample that runs (or already, ahead); not timed: time_s is the method's
    t0 = time.perf_counter()
    prediction, trace, error, fatal, out_of_memory = None, None, sample.error, False, False
    if error is None:
        try:
            prediction, trace = method(sample.image, prompt_for(sample, info.spec.kind, info.spec.protocol))
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
    return make_record(sample, prediction, trace, error, info.spec, time.perf_counter() - t0), trace, fatal


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


def _picture(out: Path, sample: Sample, trace: Trace, limit: int, loggers: list) -> None:
    """Save the sample's figure while fewer than ``limit`` exist; a drawing failure never stops the run."""
    pics = out / "pictures"
    pics.mkdir(exist_ok=True)
    if sum(1 for _ in pics.glob("*.png")) >= limit:
        return
    try:
        path = pics / f"{safe_name(sample.id)}.png"
        figure = sample_figure(sample.image, trace, evidence=sample.bbox)
        write_atomic(path, lambda tmp: figure.save(tmp, format="PNG"))
    except Exception as e:  # pragma: no cover - drawing is best effort
        log.warning("picture of %s failed: %s", sample.id, e)
        return
    for lg in loggers:
        if hasattr(lg, "log_picture"):
            lg.log_picture(sample.id, path)
