"""Join the shards of one run: ``python -m egg_eval.merge <run dir>``.

A run launched as ``shard.count=N shard.index=i`` (i = 0..N-1, one process or GPU each)
writes ``<run dir>/shard-i-of-N/``. The merge puts every record back in stream order
(sample j came from shard j % N), refuses to merge while a shard is missing or a sample
id appears twice, and writes into ``<run dir>`` one ``records.jsonl``, one ``summary.json``
(every aggregate recomputed from the records), the submission file, the gallery and the
row in ``results/tables/<dataset>.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from egg_eval.data.specs import spec_from_config
from egg_eval.files import folder_lock, write_atomic
from egg_eval.outputs import RunInfo, failures_text, finalize, score_text
from egg_eval.records import (
    MANIFEST,
    RECORDS,
    check_manifest,
    fingerprint_changes,
    read_records,
    write_manifest,
    write_records,
)

SHARD = re.compile(r"^shard-(\d+)-of-(\d+)$")


def merge(run_dir: str | Path, tables_dir: str | Path | None = None) -> dict:
    run_dir = Path(run_dir)
    shards = {}
    for p in run_dir.iterdir() if run_dir.is_dir() else []:
        m = SHARD.match(p.name)
        if m and p.is_dir():
            shards[int(m.group(1))] = (int(m.group(2)), p)
    if not shards:
        raise FileNotFoundError(f"no shard-*-of-* folders under {run_dir}")
    counts = {n for n, _ in shards.values()}
    if len(counts) != 1:
        raise ValueError(f"shards of different counts under {run_dir}: {sorted(counts)}")
    n = counts.pop()
    missing = sorted(set(range(n)) - set(shards))
    if missing:
        raise FileNotFoundError(f"shards {missing} of {n} are missing under {run_dir}")
    with contextlib.ExitStack() as held:  # a shard still being written (or rerun) stops the merge
        for i in range(n):
            held.enter_context(folder_lock(shards[i][1]))
        held.enter_context(folder_lock(run_dir))
        return _merge(run_dir, shards, n, tables_dir)


def _merge(run_dir: Path, shards: dict, n: int, tables_dir: str | Path | None) -> dict:
    prints = [json.loads(p.read_text()) if (p := shards[i][1] / MANIFEST).exists() else None for i in range(n)]
    for i in range(1, n):
        changes = fingerprint_changes(prints[0], prints[i]) if prints[0] and prints[i] else []
        if changes:
            raise ValueError(
                f"shard {i} was run with other settings or another model than shard 0: {'; '.join(changes)}"
            )
    per_shard = [read_records(shards[i][1] / RECORDS) for i in range(n)]
    unfinished = [i for i in range(n) if not (shards[i][1] / "summary.json").exists()]
    if unfinished:
        raise RuntimeError(f"shards {unfinished} have not finished (no summary.json); rerun them to resume")
    merged, seen = [], set()
    for j in range(max(len(r) for r in per_shard)):
        for i in range(n):
            if j < len(per_shard[i]):
                rec = per_shard[i][j]
                if rec["id"] in seen:
                    raise ValueError(f"sample {rec['id']!r} appears in two shards")
                seen.add(rec["id"])
                merged.append(rec)
    if prints[0]:
        check_manifest(run_dir, prints[0])
        write_manifest(run_dir, prints[0])
    write_records(run_dir / RECORDS, merged)
    pics = run_dir / "pictures"
    for i in range(n):
        for png in (shards[i][1] / "pictures").glob("*.png"):
            pics.mkdir(exist_ok=True)
            shutil.copy2(png, pics / png.name)
    first = json.loads((shards[0][1] / "summary.json").read_text())
    config = first["config"]
    spec = spec_from_config(OmegaConf.create(config["dataset"]))
    if tables_dir is None:
        tables_dir = Path(config.get("output_root", "results")) / "tables"
    info = RunInfo(
        output_dir=run_dir,
        spec=spec,
        method=first["method"],
        backbone=first["backbone"],
        tables_dir=Path(tables_dir),
        config={**config, "shard": {"index": None, "count": n}},
        seed=first.get("seed", 0),
        model_revision=first.get("model_revision"),
        decoding=first.get("decoding"),
        fingerprint=prints[0],
        sample_set=first.get("sample_set") or {},
    )
    summary = finalize(run_dir, info)
    summary["n_shards"] = n
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m egg_eval.merge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("run_dir", help="the run folder holding shard-i-of-N/ folders")
    ap.add_argument("--tables", default=None, help="tables folder (default: <output_root>/tables of the run's config)")
    args = ap.parse_args(argv)
    try:
        s = merge(args.run_dir, args.tables)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # what the merge refuses: said, not traced
        ap.exit(2, f"{ap.prog}: cannot merge {args.run_dir}: {e}\n")
    print(
        f"merged {s['n_shards']} shards: {s['dataset']} | {s['backbone']} | {score_text(s)} "
        f"| samples {s['n_samples']} | {failures_text(s)} | {args.run_dir}"
    )


if __name__ == "__main__":
    main()
