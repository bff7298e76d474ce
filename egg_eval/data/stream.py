"""Samples read and decoded ahead of the model, in a background thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Collection, Iterable, Iterator

from egg_eval.data.benchmarks import Sample

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
