"""Directories built once and reused (the toy datasets, the tiny test checkpoints), built so
that a run killed while building one leaves nothing half-built behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

COMPLETE = ".complete"


def built_once(path: str | Path, build: Callable[[Path], object]) -> Path:
    """``path``, built by ``build(directory)`` the first time it is asked for.

    ``build`` writes into a fresh sibling directory, which gets a ``.complete`` marker and is
    then renamed to ``path`` (a rename within one directory is atomic): a run killed while
    building leaves only a hidden ``.<name>.partial-*`` sibling, and the next run builds
    again. A ``path`` without the marker (a cache half-written by a version that wrote in
    place) is set aside and rebuilt. Processes that build the same ``path`` at once (shards
    on one machine) each build a copy; the first rename wins and the others' copies are
    dropped."""
    path = Path(path)
    if (path / COMPLETE).exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        build(tmp)
        (tmp / COMPLETE).touch()
        if path.exists() and not (path / COMPLETE).exists():
            stale = Path(tempfile.mkdtemp(prefix=f".{path.name}.stale-", dir=path.parent))
            os.replace(path, stale / path.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, path)
        except OSError:  # another process put its complete copy there first
            if not (path / COMPLETE).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
