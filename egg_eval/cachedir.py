"""Directories built once and reused (the toy datasets, the tiny test checkpoints), built so
that a run killed while building one leaves nothing half-built behind."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

COMPLETE = ".complete"


def built_once(path: str | Path, build: Callable[[Path], object]) -> Path:
    """``path``, built by ``build(directory)`` the first time it is asked for.

    ``build`` writes into a fresh sibling directory, which gets a ``.complete`` marker and is
    then renamed to ``path`` (a rename within one directory is atomic): a run killed while
    building leaves only a hidden ``.<name>.partial-<host>-<pid>-*`` sibling, and the next
    run builds again and removes such siblings of its host's dead processes. A ``path``
    without the marker (a cache half-written by a version that wrote in place) is set aside
    and rebuilt. Processes that build the same ``path`` at once (shards
    on one machine) each build a copy; the first rename wins and the others' copies are
    dropped."""
    path = Path(path)
    if (path / COMPLETE).exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.partial-{socket.gethostname()}-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
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
    remove_abandoned(path)
    return path


def remove_abandoned(path: Path) -> None:
    """Remove the ``.partial-`` siblings of ``path`` left by killed processes of this host (a
    shared file system may hold other hosts' builds in progress, which are left alone)."""
    mine = f".{path.name}.partial-{socket.gethostname()}-"
    for d in path.parent.glob(f"{glob.escape(mine)}*"):
        pid = d.name[len(mine) :].split("-", 1)[0]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
