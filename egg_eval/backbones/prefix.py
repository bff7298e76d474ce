"""Reusing a grounding pass's KV cache: a later prompt that starts with the same tokens through
the same image (the answer: the whole image first, then the crops) runs only the rest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Prefix:
    """The KV cache of a one-image prompt from its grounding forward, for a later prompt that
    starts with the same tokens through that image (the answer pass: the whole image first,
    then the crops), which then runs only its remaining tokens.

    ``input_ids`` (L,) the prompt the cache holds; ``length`` how many leading entries of the
    cache are still that prompt's (a use cuts the cache back to what it shares and appends)."""

    input_ids: torch.Tensor
    cache: Any
    length: int


def detach_cache(cache) -> None:
    """Keys and values built in a grad pass: keep the tensors, drop the graph, once the
    backward is done or the pass failed. In the layers recomputed in the backward, the
    checkpoint's saved inputs hold the cache (a keyword of the layer's call) and the cache's
    keys hold the graph, a cycle through autograd that Python's collector cannot see: a failed
    pass that kept its cache this way would keep its memory for the rest of the process."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:  # a layer the failed pass did not reach has none
            layer.keys, layer.values = layer.keys.detach(), layer.values.detach()


class PrefixReuse:
    """The backbone's prefix reuse (a mixin of :class:`~egg_eval.backbones.base.Backbone`, which
    provides ``model``, ``counters``, ``cache_keyword`` and ``inputs_with_features``)."""

    def new_cache(self) -> Any:
        """An empty KV cache for one prompt of this model's language model."""
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config.get_text_config())

    def prefix_length(self, enc: dict[str, torch.Tensor], features, prefix: Prefix | None) -> int:
        """How many leading tokens of ``enc`` (one prompt whose first image is the one
        ``prefix`` was computed on, ``features`` its images' embeddings) the prefix's cache
        holds: their common start with the cached prompt, used only if it takes in every token
        of the first image and leaves at least one token to run; else 0. The later images'
        tokens never fall in it (the cached prompt had one image). Also 0 where a layer with a
        sliding attention window (a Mistral checkpoint that sets one) has held a window's worth
        of tokens: it has dropped its oldest keys, and its cache can no longer be cut back."""
        if prefix is None or features is None or len(features) < 2:
            return 0
        if any(
            getattr(layer, "is_sliding", False) and layer.get_seq_length() >= layer.sliding_window
            for layer in prefix.cache.layers
        ):
            return 0
        ids = enc["input_ids"][0]
        ref = prefix.input_ids.to(ids.device)
        n = min(ids.shape[0] - 1, prefix.length, ref.shape[0])
        differ = (ids[:n] != ref[:n]).nonzero()
        p = int(differ[0, 0]) if differ.shape[0] else n
        first = sum(t.numel() // t.shape[-1] for t in features[0])
        image_tokens = int((ids[:p] == self.model.config.image_token_id).sum())
        return p if image_tokens == first == int((ref == self.model.config.image_token_id).sum()) else 0

    def _on_prefix(self, enc, features, prefix: Prefix, p: int) -> dict[str, Any]:
        """``generate``'s inputs for ``enc`` continuing from the first ``p`` tokens in ``prefix``'s
        cache: the whole prompt's ids and mask (``generate`` runs the uncached ones), the later
        images' embeddings, the cache cut back to ``p``."""
        prefix.cache.crop(p - prefix.cache.get_seq_length())
        prefix.length = p
        self.counters.prefix_tokens += p
        return dict(self.inputs_with_features(enc, features[1:]), **{self.cache_keyword: prefix.cache})

    def _forward_on_prefix(self, enc, features, prefix: Prefix, p: int) -> dict[str, Any]:
        """A plain forward's inputs for the same continuation: only the uncached tokens."""
        kw = self._on_prefix(enc, features, prefix, p)
        for k in ("input_ids", "mm_token_type_ids"):
            if k in kw:
                kw[k] = kw[k][:, p:]
        return kw
