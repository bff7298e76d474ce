"""EGG's phases: named ranges a profiler splits a run's time by, and that a FLOP count
attributes its arithmetic to (``egg_eval.bench.profiling``). Nothing is recorded unless one of
them runs: a range costs about 4 us, the checks 0.3 us."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

# Names of the ranges that EGG's phases run under (torch.profiler.record_function).
PHASES = {
    "processor": "egg.processor",  # the model's processor: pixels and tokens of a prompt
    "tower": "egg.tower",  # vision-tower calls
    "forward": "egg.ground.forward",  # grounding passes' forward
    "backward": "egg.ground.backward",  # grounding passes' backward to the visual tokens
    "map": "egg.ground.map",  # gradient norms to the host, the token map
    "regions": "egg.regions",  # smoothing, elbow threshold, connected components, entropy
    "answer": "egg.answer",  # the answer pass (prompt, prefill, decoding; or option losses)
}


class _Stack:
    """The open phases, innermost last, while :func:`tracking` is on (``None`` otherwise). One
    for the process, not a ContextVar: a GPU backward runs its ops on autograd's own thread,
    where a context variable would not be seen. Only :func:`tracking` sets it."""

    phases: list[str] | None = None


_STACK = _Stack()


def phase(name: str) -> contextlib.AbstractContextManager:
    """The profiler range of phase ``name`` (:data:`PHASES`) while a profiler runs, the phase
    on the stack while :func:`tracking` is on, else nothing."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(PHASES[name])
    return _NO_RANGE if _STACK.phases is None else _OnStack(name)


_NO_RANGE = contextlib.nullcontext()


class _OnStack:
    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        if _STACK.phases is not None:
            _STACK.phases.append(self.name)

    def __exit__(self, *exc):
        if _STACK.phases and _STACK.phases[-1] == self.name:
            _STACK.phases.pop()


def in_phase(name: str):
    """Run the decorated function under :func:`phase` ``name``."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with phase(name):
                return fn(*args, **kwargs)

        return wrapper

    return decorate


def current() -> str | None:
    """The innermost open phase while :func:`tracking` is on (None outside every phase, or off)."""
    return _STACK.phases[-1] if _STACK.phases else None


def is_tracking() -> bool:
    return _STACK.phases is not None


@contextlib.contextmanager
def tracking() -> Iterator[None]:
    """Keep the stack of open phases while inside (a FLOP count asks :func:`current`)."""
    previous, _STACK.phases = _STACK.phases, []
    try:
        yield
    finally:
        _STACK.phases = previous
