"""Files and folders written so that a run killed at any point (``kill -9``) leaves either
the old or the new, never a torn one: outputs rewritten whole (summary, submission, gallery,
pictures) and folders built once and reused (the toy datasets, the tiny test checkpoints).
``records.jsonl``, which is appended to, has its own rule (``records.read_records``), and
one writer at a time (:func:`folder_lock`)."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

from egg_eval.errors import FolderBusy

COMPLETE = ".complete"
log = logging.getLogger("egg_eval")


def write_atomic(path: str | Path, data: str | bytes | Callable[[Path], object]) -> Path:
    """Write ``data`` (text, bytes, or a function that writes a given path, which cannot
    infer a format from that path's suffix) to a hidden sibling, then rename it over ``path``."""
    path = Path(path)
    # opened as usual (the umask's mode); ends in .tmp, so that no *.png or *.json glob sees it
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        with open(tmp, "rb") as f:  # on disk before it replaces the old one (a power cut keeps one of the two)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def built_once(path: str | Path, build: Callable[[Path], object]) -> Path:
    """``path``, built by ``build(directory)`` the first time it is asked for.

    ``build`` writes into a fresh sibling directory, which gets a ``.complete`` marker and is
    then renamed to ``path`` (a rename within one directory is atomic): a run killed while
    building leaves only a hidden ``.<name>.partial-<host>-<pid>-*`` sibling, and the next
    run builds again and removes such siblings of its host's dead processes. A ``path``
    without the marker (a cache half-written by a version that wrote in place) is set aside
    and rebuilt. Processes that build the same ``path`` at once (shards starting together)
    each build a copy; the first rename wins and the others' copies are dropped."""
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


LOCK = ".lock"


def _flock(f, operation: int) -> None:
    fcntl.flock(f, operation)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s writer lock (an ``flock`` on ``folder/.lock``) while inside, or stop at
    once if another process holds it: two runs appending to one ``records.jsonl`` would
    score samples twice. The system drops the lock when its process dies, ``kill -9``
    included, so a killed run never leaves it held."""
    if fcntl is None:  # pragma: no cover - not on POSIX: no lock
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a+") as f:
        try:
            _flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise FolderBusy(
                f"{folder} is being written by another process ({holder}); two runs into one folder would "
                "score samples twice. Let it finish (a rerun then resumes), or give this run another output_dir."
            ) from None
        except OSError as e:  # a file system without locks (some NFS mounts: ENOLCK): run unguarded
            log.warning("no lock on %s (%s): make sure one process at a time writes it", folder, e)
            yield
            return
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            _flock(f, fcntl.LOCK_UN)


def safe_name(sample_id: str) -> str:
    """A file name for a sample id (ids may hold '/', e.g. POPE's 'adversarial/12')."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(sample_id))[:150]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_digest(path: str | Path, chunks: int = 32, chunk_bytes: int = 1 << 16) -> str:
    """sha256 over a checkpoint directory's config and weight files: each file's name and
    size, then the whole file if it is small, else ``chunks`` blocks spread evenly from its
    first to its last byte (about 2 MiB read per file, so a 16 GB model is fingerprinted in
    well under a second). A retrained or fine-tuned checkpoint changes the bytes of nearly
    every tensor and so the digest; it is a change detector for resume, not a signature."""
    root = Path(path)
    h = hashlib.sha256()
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json")
    )
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.relative_to(root).as_posix()}\0{size}\0".encode())
        with open(p, "rb") as f:
            if size <= chunks * chunk_bytes:
                h.update(f.read())
                continue
            for i in range(chunks):
                f.seek((size - chunk_bytes) * i // (chunks - 1))
                h.update(f.read(chunk_bytes))
    return h.hexdigest()
