"""How a run scores its samples: the metrics registry, a sample's record, and the run's aggregates.

A :class:`Metric` is, as in lm-evaluation-harness, a per-sample score, how the scores of a run
aggregate, and which way is better; ``dataset.metric`` names one of :data:`METRICS` and is
checked against it before anything loads. The scorers themselves are the pure functions of
:mod:`egg_eval.metrics`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from egg_eval import metrics as M
from egg_eval.data.benchmarks import BenchmarkSpec, Sample
from egg_eval.data.prompts import option_letters, scored_as_text, split_options
from egg_eval.types import Trace


def _multiple_choice(prediction: str, sample: Sample) -> float:
    if scored_as_text(sample):  # no options to choose from: the answer's text is compared
        return M.free_form_match(prediction, sample.answers[0])
    texts = split_options(sample.question)[2]
    choices = sample.options or texts or option_letters(sample.question) or list("ABCD")
    return M.multiple_choice(prediction, choices, sample.answers[0])


def _pope_aggregate(records: list[dict]) -> dict[str, Any]:
    """``eval_pope.py``'s counts per sub-split, and their means (the paper's headline: the
    accuracy averaged over the splits); a failed sample is wrong in every count, in no yes-ratio."""
    per = {}
    for sub in sorted({r["subset"] for r in records}, key=str):
        rs = [r for r in records if r["subset"] == sub]
        preds = [r["prediction"] if r["error"] is None else None for r in rs]
        per[sub] = M.pope(preds, [r["answers"][0] for r in rs])
    out: dict[str, Any] = {"pope_splits": per}
    for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        out[f"pope_{k}"] = sum(p[k] for p in per.values()) / len(per)
    out["pope_n_failed"] = sum(p["n_failed"] for p in per.values())
    out["score"] = out["pope_accuracy"]
    return out


@dataclass(frozen=True)
class Metric:
    """``score(prediction, sample)`` in [0, 1]; ``binary`` when it is 0 or 1 (an exact McNemar
    test applies to two runs); ``aggregate(records)`` the run's summary keys beyond the mean score
    (``None``: the mean of the per-sample scores is the score)."""

    name: str
    score: Callable[[str, Sample], float]
    binary: bool
    higher_is_better: bool = True
    aggregate: Callable[[list[dict]], dict[str, Any]] | None = None


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("vqa_accuracy", lambda p, s: M.vqa_accuracy(p, s.answers), binary=False),
        Metric("anls", lambda p, s: M.anls(p, s.answers), binary=False),
        Metric("multiple_choice", _multiple_choice, binary=True),
        Metric("pope", lambda p, s: float(M.pope_parse(p) == M.pope_label(s.answers[0])), True, True, _pope_aggregate),
        Metric("exact_match", lambda p, s: M.exact_match(p, s.answers[0]), binary=True),
    )
}
KINDS = ("open", "mc", "pope")  # how a benchmark is prompted (egg_eval.data.prompts.prompt_for)


def score_sample(spec: BenchmarkSpec, sample: Sample, prediction: str | None) -> dict[str, float | None]:
    """Per-sample metric values (None where the split has no public answers)."""
    if prediction is None or not sample.answers:
        return {spec.metric: None}
    return {spec.metric: METRICS[spec.metric].score(prediction, sample)}


def localisation(sample: Sample, trace: Trace | None) -> dict[str, float | None]:
    """IoU of the top region (the first crop the answer saw) with the best-matching ground-truth
    box, and a hit when that box's centre lies inside the region; ``gt_inside`` 0.0 when a
    ground-truth box reaches more than a pixel beyond the image (boxes in another pixel frame
    than the image's, say), ``rotated`` 1.0 when the image was turned upright by its EXIF
    orientation (its boxes with it)."""
    if not sample.bbox or trace is None or len(trace.final_views) < 2:
        return {}
    out = M.region_localisation(trace.final_views[1].as_list(), sample.bbox)
    w, h = trace.image_size
    out["gt_inside"] = float(all(b[0] >= -1 and b[1] >= -1 and b[2] <= w + 1 and b[3] <= h + 1 for b in sample.bbox))
    out["rotated"] = float(sample.orientation not in (None, 1))
    return out


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


def aggregate(records: list[dict], spec: BenchmarkSpec) -> dict[str, Any]:
    """Headline metrics of a run from its records (failures count as wrong where scored)."""
    out: dict[str, Any] = {"n_samples": len(records), "n_failures": sum(r["error"] is not None for r in records)}
    kinds: dict[str, int] = {}  # what failed, by kind (error_kind), most frequent first
    for r in records:
        if r["error"] is not None:
            kind = error_kind(r["error"])
            kinds[kind] = kinds.get(kind, 0) + 1
    out["failures_by_kind"] = dict(sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
    scored = [r for r in records if r["metrics"].get(spec.metric) is not None]
    out["n_scored"] = len(scored)
    metric = METRICS[spec.metric]
    if scored and metric.aggregate is not None:
        out.update(metric.aggregate(scored))
    elif scored:
        out["score"] = sum(r["metrics"][spec.metric] for r in scored) / len(scored)
    else:
        out["score"] = None
    locs = [r["localisation"] for r in records if r.get("localisation")]
    if locs:
        out["mean_iou"] = sum(x["iou"] for x in locs) / len(locs)
        out["hit_rate"] = sum(x["hit"] for x in locs) / len(locs)
        # ground-truth boxes beyond their image: a pixel-frame mismatch if there are many
        out["gt_boxes_outside_image"] = sum(1 for x in locs if x.get("gt_inside") == 0.0)
        out["n_exif_rotated"] = sum(1 for x in locs if x.get("rotated") == 1.0)
    ok = [r for r in records if r["error"] is None]
    if ok:
        out["mean_time_s"] = sum(r["time_s"] for r in ok) / len(ok)
        out["mean_forward"] = sum(r["n_forward"] for r in ok) / len(ok)
        out["mean_backward"] = sum(r["n_backward"] for r in ok) / len(ok)
        # grounding passes redone with less memory (batch split, layers recomputed)
        out["memory_fallbacks"] = sum(r.get("memory_fallbacks", 0) for r in ok)
        # grounding passes planned smaller to keep within execution.activation_memory_gb
        out["memory_limited"] = sum(r.get("memory_limited", 0) for r in ok)
        # decoder layers those passes recomputed in their backward (num_layers = one forward)
        out["recomputed_layers"] = sum(r.get("recomputed_layers", 0) for r in ok)
        # passes of those that kept lean activations (egg_eval.backbones.lean)
        out["lean_passes"] = sum(r.get("lean_passes", 0) for r in ok)
    return out


def error_kind(error: str) -> str:
    """A record's error without what varies per sample: its type and the head of its message,
    less names, numbers and bracketed parts ("OutOfMemoryError: CUDA out of memory",
    "ValueError: not an image PIL can read", "ValueError: empty question")."""
    head, _, msg = error.partition(": ")
    msg = re.sub(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|\b\d[\d.,]*\b", "", msg)  # names, numbers, [Errno 2]
    msg = " ".join(re.split(r"[.:(;,\n]", msg, maxsplit=1)[0].split())[:60]
    return f"{head}: {msg}" if msg else head
