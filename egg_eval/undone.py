"""EGG's speed-ups undone, one at a time, so that ``scripts/bench.py`` shows what each saves.

Each is a context manager around a :func:`~egg_eval.grounding.refine.run_egg` call; none
changes what the method computes (the maps, regions and answers stay those of the default,
up to float rounding; tested), only how:

* :func:`parameter_gradients` -- the reference code's gradients: every parameter requires
  grad, the vision tower runs inside the graph, and the backward fills every parameter's
  ``.grad`` besides the visual tokens' (freed after each pass). The library instead runs the
  tower without a graph and asks ``torch.autograd.grad`` for the detached visual tokens only,
  so autograd neither keeps the inputs of every weight's matmul nor computes weight gradients.
* :func:`no_map_cache` -- every view of a round grounded again, as Alg. 1 reads literally (the
  whole image is in every round's view set); the library grounds a view once and keeps its map.
* :func:`eager_attention` -- the eager attention kernel (every layer's full L x L weights)
  instead of SDPA, in the language model and the vision tower.
* :func:`full_precision` -- float32 weights instead of the loaded (bf16 on a GPU) ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from egg_eval.grounding.engine import ViewGrounder


@contextmanager
def parameter_gradients(backbone) -> Iterator[None]:
    model = backbone.model
    stock_grad = torch.autograd.grad

    def leaves(enc):
        with torch.enable_grad():  # the tower's graph is kept, down to its weights
            feats = list(backbone.image_features(enc))
        for f in feats:
            f.retain_grad()
        return feats

    def grad(outputs, inputs, *args, **kwargs):
        if args or kwargs:
            return stock_grad(outputs, inputs, *args, **kwargs)
        outputs.backward()  # every parameter's .grad, then the visual tokens' from the graph
        grads = tuple(x.grad for x in inputs)
        model.zero_grad(set_to_none=True)
        return grads

    model.requires_grad_(True)
    backbone.visual_leaves = leaves  # an instance attribute over the method
    torch.autograd.grad = grad
    try:
        yield
    finally:
        torch.autograd.grad = stock_grad
        del backbone.visual_leaves
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)


@contextmanager
def no_map_cache() -> Iterator[None]:
    """Every round grounds each of its views again (:attr:`ViewGrounder.reground`); the whole
    image grounded again keeps its first pass's KV cache for the answer, so that this row undoes
    the map cache only."""
    ViewGrounder.reground = True
    try:
        yield
    finally:
        ViewGrounder.reground = False


@contextmanager
def eager_attention(backbone) -> Iterator[None]:
    from egg_eval.backbones.qwen2_5_vl import group_vision_windows

    model = backbone.model
    previous = model.config._attn_implementation
    grouped = group_vision_windows(model, False)  # Qwen2.5-VL's tower: back to the stock module first
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        if grouped:
            group_vision_windows(model, True)


@contextmanager
def full_precision(backbone) -> Iterator[None]:
    """float32 weights and buffers for the call; afterwards each gets its own dtype back
    (bf16 -> float32 -> bf16 is exact, and float32 buffers such as rotary frequencies stay)."""
    dtypes = {}
    for module in backbone.model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is not None and t.is_floating_point() and t.dtype != torch.float32:
                    dtypes[(id(module), store is module._buffers, name)] = t.dtype
                    t.data = t.data.float()
    try:
        yield
    finally:
        for module in backbone.model.modules():
            for store in (module._parameters, module._buffers):
                for name, t in store.items():
                    dtype = dtypes.get((id(module), store is module._buffers, name))
                    if dtype is not None:
                        t.data = t.data.to(dtype)


UNDONE = {  # bench row -> the context manager it runs EGG in (``backbone`` its argument, where it takes one)
    "egg_param_grads": parameter_gradients,
    "egg_no_map_cache": lambda backbone: no_map_cache(),
    "egg_eager": eager_attention,
    "egg_fp32": full_precision,
}
