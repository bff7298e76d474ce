"""Hooks on the model, each held only inside a context manager and removed in ``finally``."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch


class _StopForward(Exception):
    """Raised by the logit-lens hook once layer L has run, to skip the layers above it."""

    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


@contextlib.contextmanager
def capture_layer_output(layer: torch.nn.Module) -> Iterator[None]:
    """Stop the forward pass after ``layer`` and carry its output out in ``_StopForward``.

    The hook is removed in ``finally``, so no hook survives an exception.
    """

    def hook(_module, _inputs, output):
        raise _StopForward(output[0] if isinstance(output, tuple) else output)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


F = TypeVar("F", bound=Callable[..., Any])


def counts_tower(fn: F) -> F:
    """Count the vision-tower calls ``fn`` makes (``counters.n_tower``), each under the
    ``tower`` phase: hooks on the tower for the call's duration, removed in ``finally``."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with self.tower_counted():
            return fn(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
