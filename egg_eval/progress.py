"""The run's progress: a bar with a total and an ETA on a terminal; one line per few percent
elsewhere (a log file, a SLURM job's output), where a bar would write a carriage return per sample."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class Progress:
    """``update()`` once per sample done. ``total``: the samples the run will see, where known;
    ``initial``: those already done (a resumed run), counted but not timed. Off (``enabled``
    false): silent."""

    def __init__(
        self,
        desc: str,
        total: int | None,
        initial: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
        step_percent: float = 5.0,
        every_unknown: int = 100,
    ):
        self.desc, self.total, self.done, self.enabled = desc, total, initial, enabled
        self.stream = stream or sys.stderr
        self.t0, self.timed = time.perf_counter(), 0
        self.bar = None
        if not enabled:
            return
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                desc=desc, total=total, initial=initial, unit="sample", file=self.stream, dynamic_ncols=True
            )
            return
        # without a terminal: a line each time this many more samples are done
        self.every = max(1, round(total * step_percent / 100)) if total else every_unknown
        self.next = (initial // self.every + 1) * self.every

    def update(self, postfix: str = "") -> None:
        self.done += 1
        self.timed += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)
            return
        if self.done >= self.next or (self.total and self.done == self.total):
            self.next = (self.done // self.every + 1) * self.every
            self.stream.write(self.line(postfix) + "\n")
            self.stream.flush()

    def line(self, postfix: str = "") -> str:
        elapsed = time.perf_counter() - self.t0
        rate = self.timed / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total} ({100 * self.done / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.desc}: {self.done}{of}"]
        if postfix:
            parts.append(postfix)
        parts.append(f"{_clock(elapsed)} elapsed")
        if self.total and rate > 0:
            parts.append(f"ETA {_clock(max(0, self.total - self.done) / rate)}")
        return " | ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
