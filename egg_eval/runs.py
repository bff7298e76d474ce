"""What a run is: the samples it covers and the settings its records depend on, which together
name its folder, ``results/runs/<dataset>/<sample set>/<backbone>/<run id>/``.

One folder holds one set of samples with one set of settings: the split (POPE: its sub-splits)
and ``dataset.limit`` name the sample set (``validation``, ``validation-first50``,
``popular``), the result-affecting settings name the run id, and both are written into the
folder's ``run.json`` with the first record, so that a resume can never mix other samples or
settings into it. Which settings a record depends on is declared on each one's field
(:data:`egg_eval.config.NOT_IN_RESULT`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from egg_eval.config import NOT_IN_RESULT, STOPPED
from egg_eval.data.benchmarks import BenchmarkSpec
from egg_eval.records import flatten


def sample_set(spec: BenchmarkSpec, limit: int | None) -> dict[str, Any]:
    """The samples a run covers: the split (for POPE the sub-splits it takes, their name joined
    with '+', or 'all'), and the first ``limit`` of each in stream order (None: all)."""
    return {"split": spec.split, "subsets": list(spec.splits) or None, "limit": limit}


def sample_set_name(ss: dict[str, Any]) -> str:
    """``validation``, ``validation-first50``; for POPE ``all``, ``popular``, ``all-first50`` (50 of each)."""
    return ss["split"] + (f"-first{ss['limit']}" if ss.get("limit") is not None else "")


def run_dir(cfg, spec: BenchmarkSpec, backbone_name: str, run_id: str) -> Path:
    """``<output_root>/runs/<dataset>/<sample set>/<backbone>/<run id>`` (or ``output_dir``);
    ``run_id``: the method's (:meth:`egg_eval.methods.Method.run_id`)."""
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    ss = sample_set_name(sample_set(spec, cfg.dataset.get("limit")))
    return Path(cfg.output_root) / "runs" / spec.name / ss / backbone_name / run_id


def run_fingerprint(resolved: dict, model: dict) -> dict:
    """What a run's records depend on (compared on resume): the resolved settings less
    :data:`NOT_IN_RESULT` (the sample set among them), and the weights' identity
    (``Backbone.fingerprint``). The stopping rule is left out of the fingerprint of a method
    without rounds."""
    skip = NOT_IN_RESULT + (("stopping",) if resolved.get("method", {}).get("name") not in STOPPED else ())
    settings = {k: v for k, v in flatten(resolved).items() if not any(k == x or k.startswith(x + ".") for x in skip)}
    return {"settings": settings, "model": model}


def expected_total(d, spec: BenchmarkSpec, shard: tuple[int, int]) -> int | None:
    """How many samples the run's stream holds, where it is known: ``dataset.limit`` per split,
    capped by the split's size (``dataset.sizes``; a toy subset's ``toy_n``), over its shard."""
    sizes = dict(d.get("sizes") or {})
    limit = d.get("limit")
    total = 0
    for split in spec.splits or (spec.split,):
        size = (d.get("toy_n") or 4) if d.get("toy") and not d.get("path") else sizes.get(split)
        n = min(limit, size) if limit is not None and size is not None else (limit if size is None else size)
        if n is None:
            return None
        total += n
    index, count = shard
    return max(0, -(-(total - index) // count))  # the stream's samples i with i % count == index
