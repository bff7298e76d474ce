"""Leaner activations for the grounding backward, with the same gradients to the bit.

A grounding pass back-propagates to the visual tokens only, so autograd already keeps no
input of a linear layer. Of what it still keeps per token and decoder layer, two parts are
cheap to rebuild in the backward:

- each RMSNorm's float32 copy of its input (on a bf16 or fp16 model, twice the input's
  bytes): a lean norm keeps its input in the model's dtype and runs its forward again in the
  backward;
- a gated MLP's activation ``act(gate)``, kept beside ``gate`` and ``up`` for the product:
  a lean MLP keeps ``gate`` and ``up`` and computes ``act(gate) * up`` again in the backward.

Both run the very same operations again and differentiate them with the same autograd
formulas, so outputs and gradients are equal bit for bit (tested on all four families). They
cost elementwise work and a few launches per layer, far less than recomputing a layer
(:func:`egg_eval.backbones.base.recompute_in_backward`), and cut a layer's activations by
about a third at the published widths (:meth:`Backbone.activation_bytes_per_token`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator, Sequence

import torch

# a gated MLP's forward body, whitespace removed (Llama, Mistral, Qwen2, Qwen3 in transformers 5)
GATED_MLP_BODIES = (
    "down_proj=self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))returndown_proj",
    "returnself.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))",
)


class _Recomputed(torch.autograd.Function):
    """``fn(*xs)`` keeping only ``xs``; the backward runs ``fn`` again and differentiates it."""

    @staticmethod
    def forward(ctx, fn, *xs):
        ctx.fn = fn
        ctx.save_for_backward(*xs)
        return fn(*xs)

    @staticmethod
    def backward(ctx, grad):
        with torch.enable_grad():
            xs = [x.detach().requires_grad_() for x in ctx.saved_tensors]
            out = ctx.fn(*xs)
        return None, *torch.autograd.grad(out, xs, grad)


def _gated_product(act, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return act(gate) * up


def is_gated_mlp(module: torch.nn.Module) -> bool:
    """A Llama-style MLP whose forward is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``
    (:data:`GATED_MLP_BODIES`): another forward is left as it is."""
    return _gated_forward(type(module))


def lean_mlp(module: torch.nn.Module) -> bool:
    """Whether :func:`lean_activations` makes ``module`` a lean MLP: a gated one whose
    ``forward`` no hook has set (its lean form replaces the forward)."""
    return is_gated_mlp(module) and "forward" not in vars(module)


@functools.cache
def _gated_forward(cls: type) -> bool:
    try:
        lines = inspect.getsource(cls.forward).split("\n", 1)
    except (OSError, TypeError, AttributeError):
        return False
    body = "".join(lines[-1].split())
    return lines[0].strip() == "def forward(self, x):" and body in GATED_MLP_BODIES


def lean_modules(
    root: torch.nn.Module, skip: Sequence[torch.nn.Module] = ()
) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """The RMSNorms under ``root`` that keep a wider copy of their input (those whose weight is
    not float32) and its gated MLPs, outside the modules ``skip``. A norm's forward is run as
    it is (a hook's instance ``forward`` included); an MLP's is replaced by its lean form, so
    an MLP whose ``forward`` a hook has set is left alone."""
    skipped = {id(m) for s in skip for m in s.modules()}
    norms, mlps = [], []
    for module in root.modules():
        if id(module) in skipped:
            continue
        if type(module).__name__.endswith("RMSNorm") and getattr(module, "weight", None) is not None:
            if module.weight.dtype != torch.float32:
                norms.append(module)
        elif lean_mlp(module):
            mlps.append(module)
    return norms, mlps


@contextlib.contextmanager
def lean_activations(
    root: torch.nn.Module, enabled: bool = True, skip: Sequence[torch.nn.Module] = ()
) -> Iterator[None]:
    """Inside, the norms and gated MLPs under ``root`` (but not under ``skip``: the layers
    :func:`egg_eval.backbones.base.recompute_in_backward` recomputes, which make their own
    forward and its recomputation lean alike) keep the lean activations described in this
    module's docstring. Not where a parameter requires grad (the lean functions give no
    weight gradients). The modules' own ``forward`` is restored in ``finally``."""
    if not enabled or any(p.requires_grad for p in root.parameters()):
        yield
        return
    norms, mlps = lean_modules(root, skip)
    before = [(m, vars(m).get("forward")) for m in norms + mlps]  # an instance forward already set (a hook's)
    for norm in norms:
        norm.forward = functools.partial(_Recomputed.apply, norm.forward)
    for mlp in mlps:  # act(gate) * up keeping gate and up only, not act(gate) as well
        product = functools.partial(_gated_product, mlp.act_fn)
        mlp.forward = lambda x, _m=mlp, _p=product: _m.down_proj(_Recomputed.apply(_p, _m.gate_proj(x), _m.up_proj(x)))
    try:
        yield
    finally:
        restore_forward(before)


def restore_forward(before: Sequence[tuple[torch.nn.Module, object]]) -> None:
    """Put back each module's instance ``forward`` as it was (or none: the class's)."""
    for module, forward in before:
        if forward is None:
            del module.forward
        else:
            module.forward = forward
