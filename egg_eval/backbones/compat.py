"""What the next transformers upgrade touches: names that moved between releases."""

from __future__ import annotations

import inspect
from typing import Any

import torch

# the keyword of the KV cache: transformers 5.24 renamed ``past_key_values`` to ``cache`` in
# the models' forward, in ``generate`` and in the decoder layers (the old name is deprecated
# there, to be removed in 5.40); earlier versions know only the old one
CACHE_KEYS = ("cache", "past_key_values")


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword ``model``'s forward (and ``generate``) take a KV cache under."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned (``out.cache`` from transformers 5.24, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
