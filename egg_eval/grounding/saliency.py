"""Entropy-gradient saliency (paper Sec. 3.2, Eq. 1-4).

    H_t = -sum_y p_t(y) log p_t(y)            (Eq. 1-2, t = ``token_index``)
    G   = dH_t / dV                            (Eq. 3, V = projected visual tokens)
    s_i = ||G_i||_2                            (Eq. 4)

Gradients come from ``torch.autograd.grad`` with respect to detached leaves, so no
parameter ever receives a ``.grad`` and the vision tower builds no graph.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from egg_eval.backbones.base import Backbone
from egg_eval.backbones.layout import TokenLayout
from egg_eval.backbones.memory import MemoryPlan
from egg_eval.backbones.prefix import Prefix, detach_cache
from egg_eval.phases import in_phase, phase


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of softmax(logits) (Eq. 1)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum()


def entropy_top_p(logits: torch.Tensor, p: float = 0.9) -> torch.Tensor:
    """The entropy terms -p(y) log p(y) of the FULL next-token distribution, summed over its
    nucleus: the fewest most-probable tokens whose mass reaches ``p`` (Tab. 3, 'Entropy Top-P').

    Not renormalised over the nucleus, as the paper's reference code computes it
    (``entropyTopP`` in its ``utils.py``): a nucleus of one token (top-1 >= ``p``) still has the
    non-zero term -p log p and so a gradient, where renormalising would give exactly 0 and no
    map. The set is chosen without gradient; the terms are differentiable."""
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_p, order = probs.sort(descending=True)
    keep = int(torch.searchsorted(sorted_p.detach().cumsum(0), torch.tensor(p, device=probs.device)).item()) + 1
    nucleus = probs[order[:keep]]
    return -(nucleus * torch.log(nucleus.clamp_min(1e-30))).sum()


def max_prob(logits: torch.Tensor) -> torch.Tensor:
    """log of the top-1 probability (Tab. 3, 'Maximum Probability'; ViCrop's pure-grad objective)."""
    return torch.log_softmax(logits.float(), dim=-1).max()


OBJECTIVES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "entropy": entropy,
    "entropy_top_p": entropy_top_p,
    "max_prob": max_prob,
}


@dataclass
class Grounding:
    """The saliency of one view.

    ``scores`` (n_tokens,) per visual token, in token order; ``layout`` places them;
    ``map`` (R, C) is the map on the layout's grid (global-view tokens folded in);
    ``first_token_max_prob`` is the model's confidence at the objective's step;
    ``features`` the view's projected visual embeddings (detached, the backbone's leaf
    format), kept so that the answer pass does not run the vision tower on it again;
    ``prefix`` the pass's KV cache where it was asked to keep it (``keep_prefix``), so that the
    answer pass, whose prompt starts with this view, does not run those tokens again.
    """

    scores: np.ndarray
    layout: TokenLayout
    map: np.ndarray
    objective_value: float
    first_token_max_prob: float
    features: list[torch.Tensor] | None = field(default=None, repr=False)
    prefix: Prefix | None = field(default=None, repr=False)


def token_saliency(
    backbone: Backbone,
    image: Image.Image,
    question: str,
    *,
    objective: str = "entropy",
    token_index: int = 1,
    layer: int | None = None,
    recompute_layers: bool = False,
    memory_budget: float | None = None,
    keep_prefix: bool = False,
    lean: bool | None = None,
) -> Grounding:
    """Ground one view: the gradient norm of ``objective`` at decoding step ``token_index``
    (1 = first answer token; t > 1 greedy-unrolls t - 1 tokens first) through the first
    ``layer`` decoder layers (None = all), with respect to each projected visual token.
    ``recompute_layers`` trades memory for time (same scores; True: all decoder layers but the
    last, execution.checkpoint_layers; an int: that many leading ones); where the pass's estimated activations
    (:meth:`Backbone.pass_activation_bytes`) exceed ``memory_budget`` bytes, the pass keeps
    lean activations and recomputes the fewest leading layers that bring it within
    (:meth:`Backbone.memory_plan`; ``lean`` True or False: every pass lean, or none).
    ``keep_prefix``: keep the pass's KV cache in ``Grounding.prefix`` (not where the logit
    lens stops early: the cache would not be the whole prompt's).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {sorted(OBJECTIVES)}")
    if token_index < 1:
        raise ValueError(f"token_index counts from 1, got {token_index}")
    t0 = time.perf_counter()
    enc = backbone.encode([image], question)
    if token_index > 1:
        enc = backbone.append_tokens(enc, backbone.greedy_tokens(enc, token_index - 1))
    out = _ground_encoded(backbone, enc, image, objective, layer, recompute_layers, memory_budget, keep_prefix, lean)
    backbone.counters.time_ground_s += time.perf_counter() - t0
    return out


def _plan(backbone: Backbone, n_tokens: int, layer, recompute_layers, memory_budget, lean) -> MemoryPlan | None:
    """The memory plan of a pass over ``n_tokens`` tokens, or ``None`` where it does not fit
    ``memory_budget``: ``recompute_layers`` True (the least memory) recomputes every layer but
    the last and is lean unless ``lean`` is False; otherwise :meth:`Backbone.memory_plan`,
    with at least ``recompute_layers`` layers recomputed. Without a budget: what was asked."""
    if recompute_layers is True:
        plan = MemoryPlan(lean=lean is not False, recompute=backbone.most_recomputed(layer))
        held = backbone.pass_activation_bytes(n_tokens, layer, plan.recompute, plan.lean)
        return plan if memory_budget is None or held <= memory_budget else None
    plan = backbone.memory_plan(n_tokens, layer, memory_budget, lean)
    return None if plan is None else replace(plan, recompute=max(plan.recompute, int(recompute_layers)))


def _ground_encoded(
    backbone: Backbone,
    enc,
    image,
    objective,
    layer,
    recompute_layers,
    memory_budget,
    keep_prefix=False,
    lean=None,
    leaves=None,
) -> Grounding:
    """The forward and backward of one encoded view, held to ``memory_budget`` by its plan
    (:func:`_plan`; where nothing fits, the least a pass can hold). ``leaves``: its visual
    embeddings where a caller already has them (else the vision tower runs here)."""
    n_tokens = enc["input_ids"].shape[-1]
    plan = _plan(backbone, n_tokens, layer, recompute_layers, memory_budget, lean) or _plan(
        backbone, n_tokens, layer, True, None, lean
    )
    if plan != _plan(backbone, n_tokens, layer, recompute_layers, None, lean):  # changed by the budget
        backbone.counters.memory_limited += 1
    leaves = backbone.visual_leaves(enc) if leaves is None else leaves
    cache = backbone.new_cache() if keep_prefix and backbone.runs_all_layers(layer) else None
    try:
        with torch.enable_grad():
            with phase("forward"):
                logits = backbone.next_token_logits(
                    enc, leaves, layer=layer, recompute_layers=plan.recompute, cache=cache, lean=plan.lean
                )
                value = OBJECTIVES[objective](logits)
            grads = _gradients(value, leaves)
        backbone.counters.n_backward += 1
        out = _grounding(backbone, enc, image, grads, value, logits, leaves)
    finally:  # kept for the answer, or the pass failed (out of memory, say): either way without its graph
        if cache is not None:
            detach_cache(cache)
    if cache is not None:
        ids = enc["input_ids"][0]
        out.prefix = Prefix(ids, cache, int(ids.shape[0]))
    return out


@in_phase("backward")
def _gradients(value: torch.Tensor, leaves: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``d value / d leaves``. Under ``deterministic=true`` (PyTorch's deterministic mode with
    ``warn_only``, :func:`egg_eval.cli.set_deterministic`) the backward runs in the strict mode
    (``warn_only=False``): only there do the fused attention backwards (flash,
    memory-efficient) take their deterministic variants, where otherwise they add into dQ
    with atomics and two identical passes differ in the last bits (measured in
    ``results/bench/h200_2026-12-04b``). Strict mode raises on an op with no deterministic
    variant, which fails that sample with the op's name; the forward passes keep ``warn_only``
    (layers recomputed in the backward run strict with it: on the GPU none raised)."""
    if not (torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()):
        return torch.autograd.grad(value, leaves)
    torch.use_deterministic_algorithms(True, warn_only=False)
    try:
        return torch.autograd.grad(value, leaves)
    finally:
        torch.use_deterministic_algorithms(True, warn_only=True)


@in_phase("map")
def _grounding(backbone: Backbone, enc, image: Image.Image, grads, value, logits, leaves) -> Grounding:
    """One view's :class:`Grounding` from its leaves' gradients (Eq. 4: a norm per token)."""
    backbone.counters.n_grounded += 1
    scores = torch.cat([g.float().reshape(-1, g.shape[-1]).norm(dim=-1) for g in grads]).cpu().numpy()
    layout = backbone.token_layout(enc, 0, image.size)
    if scores.shape[0] != layout.n_tokens:
        raise RuntimeError(f"{backbone.family}: {scores.shape[0]} visual tokens but layout has {layout.n_tokens}")
    return Grounding(
        scores=scores,
        layout=layout,
        map=layout.to_map(scores),
        objective_value=float(value.detach()),
        first_token_max_prob=float(torch.softmax(logits.detach(), -1).max()),
        features=[leaf.detach() for leaf in leaves],
    )


def token_saliency_batch(
    backbone: Backbone,
    images: list[Image.Image],
    question: str,
    *,
    objective: str = "entropy",
    token_index: int = 1,
    layer: int | None = None,
    recompute_layers: bool = False,
    memory_budget: float | None = None,
    lean: bool | None = None,
) -> list[Grounding]:
    """:func:`token_saliency` of several views in ONE forward and ONE backward pass.

    The views' prompts are stacked as a batch (right-padded where their token counts
    differ, :meth:`Backbone.stack_lm_inputs`); the objective is summed over the batch.
    Rows of a batch do not interact, so the gradient of the sum with respect to a view's
    leaves is exactly that view's own gradient. Falls back to one pass per view when the
    backbone cannot batch, ``token_index > 1``, or the batch's estimated activations exceed
    ``memory_budget`` bytes even lean (each view then is held to the budget on its own).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {sorted(OBJECTIVES)}")
    kw = dict(
        objective=objective, layer=layer, recompute_layers=recompute_layers, memory_budget=memory_budget, lean=lean
    )
    if len(images) < 2 or not backbone.batch_grounding or token_index != 1:
        return [token_saliency(backbone, im, question, token_index=token_index, **kw) for im in images]
    t0 = time.perf_counter()
    encs = [backbone.encode([im], question) for im in images]
    padded = len(encs) * max(e["input_ids"].shape[-1] for e in encs)
    # a batch only where it fits the budget without recomputing (more) layers, lean where it
    # needs to be: it holds its views' tokens at once, so recomputing layers to fit it always
    # costs more recomputation than its views one by one, and batching saves only launches
    plan = _plan(backbone, padded, layer, recompute_layers, memory_budget, lean)
    asked = _plan(backbone, padded, layer, recompute_layers, None, lean)
    if plan is not None and plan.recompute == asked.recompute:
        backbone.counters.memory_limited += plan != asked  # made lean by the budget
        out = _ground_stacked(backbone, encs, images, objective, layer, plan)
    else:  # one pass per view, their images still embedded by one tower call (no graph, small)
        backbone.counters.memory_limited += 1
        leaves = _batch_leaves(backbone, encs, len(images))
        out = [_ground_encoded(backbone, e, im, leaves=[x], **kw) for e, im, x in zip(encs, images, leaves)]
    backbone.counters.time_ground_s += time.perf_counter() - t0
    return out


def _batch_leaves(backbone: Backbone, encs, n_views: int) -> list[torch.Tensor]:
    """The visual leaves of several encoded views from ONE vision-tower call, one per view."""
    leaves = backbone.visual_leaves(backbone.image_inputs(encs))
    if len(leaves) != n_views:
        raise RuntimeError(f"{backbone.family}: {len(leaves)} feature tensors for {n_views} views")
    return leaves


def _ground_stacked(backbone: Backbone, encs, images, objective, layer, plan: MemoryPlan) -> list[Grounding]:
    """The forward and backward of several encoded views as one batch: their prompts stacked
    (right-padded where their lengths differ), their images embedded by one vision-tower call."""
    enc, positions = backbone.stack_lm_inputs(encs)
    if bool((positions == enc["input_ids"].shape[1] - 1).all()):
        positions = None  # equal lengths: read the last position as a one-view pass does, to the bit
    leaves = _batch_leaves(backbone, encs, len(images))
    with torch.enable_grad():
        with phase("forward"):
            logits = backbone.next_token_logits(
                enc, leaves, layer=layer, recompute_layers=plan.recompute, positions=positions, lean=plan.lean
            )
            values = [OBJECTIVES[objective](logits[i]) for i in range(len(images))]
        grads = _gradients(torch.stack(values).sum(), leaves)
    backbone.counters.n_backward += 1
    return [
        _grounding(backbone, encs[i], im, grads[i : i + 1], values[i], logits[i], leaves[i : i + 1])
        for i, im in enumerate(images)
    ]


def saved_bytes_per_token(backbone: Backbone, image: Image.Image, question: str) -> float:
    """Bytes autograd keeps for one view's grounding backward, per prompt token, weights
    excluded (saved by reference, not copied): what
    :meth:`Backbone.activation_bytes_per_token` estimates (``scripts/activation_check.py``)."""
    params = {p.data_ptr() for p in backbone.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
        return t

    enc = backbone.encode([image], question)
    leaves = backbone.visual_leaves(enc)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        backbone.next_token_logits(enc, leaves)
    return sum(seen.values()) / enc["input_ids"].shape[-1]
