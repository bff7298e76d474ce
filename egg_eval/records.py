"""A run folder's ``records.jsonl`` and ``run.json``: the only code that reads or writes them.

``records.jsonl`` is the source of truth: one JSON line per sample, appended, flushed and fsynced
as soon as the sample is done. A killed run leaves at most a torn last line, which
:func:`read_records` cuts off. ``run.json`` (the manifest) holds what the records depend on (the
result-affecting settings, the sample set and the weights' identity); it is written with the
first record, so that a run that fails before any sample pins nothing, and checked on resume.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import IO, Any

from egg_eval.errors import SettingsError
from egg_eval.files import write_atomic

RECORDS = "records.jsonl"
MANIFEST = "run.json"
log = logging.getLogger("egg_eval")


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


def _as_json(fingerprint: dict) -> dict:
    return json.loads(json.dumps(fingerprint, default=str))


def check_manifest(out: Path, fingerprint: dict) -> None:
    """Refuse to add records to ``out`` made with other result-affecting settings, another
    sample set or other weights than the records already there. A folder without records
    (a run that failed before its first sample) holds nothing to protect: its old manifest
    is not a constraint."""
    path = out / MANIFEST
    if not path.exists() or not read_records(out / RECORDS):
        return
    changes = fingerprint_changes(json.loads(path.read_text()), _as_json(fingerprint))
    if changes:
        raise SettingsError(
            f"{out} holds a run made with other settings, samples or model ({'; '.join(changes)}). "
            "Resuming would mix their records. Rerun with the settings of that run, or use another "
            "output directory (output_dir=... or output_root=...) for the new ones."
        )


def write_manifest(out: Path, fingerprint: dict) -> None:
    """``out/run.json``, rewritten whole (with a run's first record, and by the shard merge)."""
    write_atomic(out / MANIFEST, json.dumps(_as_json(fingerprint), indent=1, sort_keys=True))


def read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def read_records(path: Path) -> list[dict]:
    """Complete records of ``path``; a torn last line (killed mid-write) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        with open(path, "r+b") as f:
            f.truncate(cut)
    return [json.loads(line) for line in data[:cut].splitlines() if line.strip()]


def append_record(f: IO[str], record: dict) -> None:
    """One record on its own line, on disk before the next sample starts."""
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


def write_records(path: Path, records: list[dict]) -> None:
    """``path`` rewritten whole, atomically, with ``records``."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def drop_failed(path: Path, records: list[dict]) -> list[dict]:
    """The records without those that hold an error, written back whole (atomically) so that
    the rerun computes those samples again: an out-of-memory sample may fit on a larger GPU, and
    a run stopped by a broken device recorded the sample it broke on."""
    kept = [r for r in records if r.get("error") is None]
    if len(kept) < len(records):
        log.info(
            "%s: retrying %d sample(s) that failed before (retry_failed=false keeps their errors)",
            path.parent,
            len(records) - len(kept),
        )
        write_records(path, kept)
    return kept
