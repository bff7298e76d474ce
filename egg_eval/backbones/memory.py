"""How much a grounding pass holds for its backward, and how it keeps within a budget: the
activation estimates per token (from the text config's widths), lean activations and
recomputed layers (:class:`MemoryPlan`). None of it changes a map."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from egg_eval.backbones.compat import CACHE_KEYS
from egg_eval.backbones.lean import lean_activations, lean_mlp, restore_forward


@dataclass(frozen=True)
class MemoryPlan:
    """How a grounding pass keeps within the activation budget (:meth:`Backbone.memory_plan`):
    ``lean`` activations (:mod:`egg_eval.backbones.lean`) and its first ``recompute`` decoder
    layers recomputed in the backward. Neither changes the maps."""

    lean: bool = False
    recompute: int = 0


@contextlib.contextmanager
def recompute_in_backward(
    layers: Sequence[torch.nn.Module], enabled: bool = True, lean: bool = False
) -> Iterator[None]:
    """Activation checkpointing of each of ``layers`` for the passes run inside: a layer keeps
    only its input for the backward and recomputes the rest there (non-reentrant
    ``torch.utils.checkpoint``, so ``torch.autograd.grad`` to the visual leaves works). Each
    layer so wrapped holds one hidden state per token instead of its activations, for one
    more forward of that layer. The layers' ``forward`` is restored in ``finally`` (the class's,
    or an instance ``forward`` a hook had set).

    A pass that fills a FRESH KV cache (``Prefix``) stays exact: the recomputation runs
    without the cache (which already holds the layer's keys and values from the forward;
    appending them again would corrupt it), and a prefill's attention over its own keys is
    the same with or without an empty cache in front of them.

    ``lean``: the layer's forward and its recomputation both keep lean activations
    (:func:`egg_eval.backbones.lean.lean_activations`), so the recomputation saves the very
    tensors the forward did, as the checkpoint requires."""
    if not enabled or not layers:
        yield
        return
    before = [(layer, vars(layer).get("forward")) for layer in layers]  # an instance forward already set
    for layer in layers:
        original = layer.forward

        def forward(*args, _f=original, _layer=layer, **kwargs):
            first = True

            def run(*a, **k):
                nonlocal first
                if not first:  # the recomputation
                    k = {**k, **{key: None for key in CACHE_KEYS if key in k}}
                first = False
                with lean_activations(_layer, lean):
                    return _f(*a, **k)

            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
    try:
        yield
    finally:
        restore_forward(before)


class ActivationMemory:
    """The backbone's activation arithmetic (a mixin of :class:`~egg_eval.backbones.base.Backbone`,
    which provides ``model``, ``dtype``, ``decoder_layers`` and ``layers_run``)."""

    def activation_bytes_per_token(self, layer: int | None = None, lean: bool = False) -> int:
        """Estimated bytes one prompt token keeps alive for the grounding backward through the
        first ``layer`` decoder layers (None = all), with or without ``lean`` activations
        (:mod:`egg_eval.backbones.lean`).

        Parameters need no gradient, so autograd keeps no input of a linear layer. Per layer
        what stays is: the two RMSNorms' float32 inputs (4 h in bf16 elements, an overcount of a
        float32 model's 2 h that covers the few tensors kept once per token, not per layer; 2 h
        when lean, which keeps the input in the model's dtype), the attention's q and
        output (2 q) and k and v (2 kv), the MLP's gate, activation and up (3 i; 2 i when lean:
        gate and up), and where the attention normalises q and k (Qwen3, InternVL-3.5) their
        norms' inputs (2 q + 2 kv, halved as the other norms'). h: hidden width, q: heads x
        head_dim, kv: key-value heads x head_dim, i: MLP width. Times 1.1 for the allocator and
        the backward's own buffers. ``scripts/activation_check.py`` compares it with what
        autograd saves at the published widths (its figures: ``results/bench/cpu_2026-12-04``)."""
        return self._kept_bytes(self.layers_run(layer), lean)

    def _kept_bytes(self, layers: int, lean: bool) -> int:
        """Per token: what ``layers`` decoder layers and the pass itself keep, times 1.1."""
        per_layer, once = self._saved_elements(lean)
        return int(1.1 * (layers * per_layer + once) * self.dtype.itemsize)

    def _saved_elements(self, lean: bool) -> tuple[int, int]:
        """Per token, in model-dtype elements: what each decoder layer keeps for the backward
        (:meth:`activation_bytes_per_token`) and what the pass keeps once, whatever its depth:
        the final norm's float32 input (2 h; h lean) and the rotary tables' cos and sin
        (2 head_dim)."""
        cfg = self.model.config.get_text_config()
        h, heads = cfg.hidden_size, cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or h // heads
        q = heads * head_dim
        kv = (getattr(cfg, "num_key_value_heads", None) or heads) * head_dim
        i = getattr(cfg, "intermediate_size", None) or 4 * h
        first = self.decoder_layers[0]
        norm_copy = 1 if lean else 2  # the float32 copy, in bf16 elements (on a float32 model: an overcount)
        gated = 2 if lean and lean_mlp(first.mlp) else 3
        per_layer = 2 * h * norm_copy + 2 * q + 2 * kv + gated * i
        if getattr(first.self_attn, "q_norm", None) is not None:
            per_layer += (q + kv) * norm_copy
        return per_layer, h * norm_copy + 2 * head_dim

    def recomputed_bytes_per_token(self) -> int:
        """What one recomputed decoder layer (:func:`recompute_in_backward`) keeps per token
        instead of its activations: its input hidden state (h elements; the masks and rotary
        tables it also takes are the same tensors for every layer). Times 1.1, as above."""
        return int(1.1 * self.model.config.get_text_config().hidden_size * self.dtype.itemsize)

    def pass_activation_bytes(
        self, n_tokens: int, layer: int | None = None, recomputed: int = 0, lean: bool = False
    ) -> int:
        """Estimated activation bytes a grounding pass over ``n_tokens`` prompt tokens holds at
        its peak when its first ``recomputed`` decoder layers are recomputed in the backward
        (and its activations are ``lean`` or not).

        The later layers' activations stay until the backward reaches them and are freed as
        it goes; when it reaches the recomputed layers only their inputs are left, plus the
        one layer being recomputed. So the peak is ``max(n - r, 1 if r else 0)`` layers'
        activations plus ``r`` hidden states, per token, besides what the pass keeps once."""
        held = max(self.layers_run(layer) - recomputed, 1 if recomputed else 0)
        return n_tokens * (self._kept_bytes(held, lean) + recomputed * self.recomputed_bytes_per_token())

    def most_recomputed(self, layer: int | None) -> int:
        """The layers a pass that is to hold the least recomputes: all it runs but the last.
        Recomputing the last too would hold one more hidden state per token and free nothing
        (its activations are the first the backward needs; measured: ``results/bench/HISTORY.md``)."""
        return max(self.layers_run(layer) - 1, 0)

    def memory_plan(
        self, n_tokens: int, layer: int | None, budget: float | None, lean: bool | None = None
    ) -> MemoryPlan | None:
        """The cheapest way a grounding pass over ``n_tokens`` tokens keeps within ``budget``
        activation bytes: as it is where it fits (or there is no budget); else lean activations
        (elementwise work again in the backward, about a third less held) and the fewest
        leading decoder layers recomputed (each one more forward of that layer) that bring it
        within; ``None`` when it does not fit even lean with :meth:`most_recomputed` layers
        recomputed. ``lean`` True or False (``execution.lean_activations``) instead makes every
        plan lean, or none."""
        if lean is None:
            lean = not (budget is None or self.pass_activation_bytes(n_tokens, layer) <= budget)
        if budget is None:
            return MemoryPlan(lean=lean)
        plans = range(self.most_recomputed(layer) + 1)
        r = next((r for r in plans if self.pass_activation_bytes(n_tokens, layer, r, lean) <= budget), None)
        return None if r is None else MemoryPlan(lean=lean, recompute=r)
