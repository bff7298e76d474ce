"""Where EGG's time goes: a run under ``torch.profiler``, totalled by the phases the library
marks (:data:`egg_eval.phases.PHASES`: processor, vision tower, the grounding passes'
forward and backward, the map, the regions, the answer).

    from egg_eval.profiling import profile_phases
    phases = profile_phases(lambda: run_egg(backbone, image, question), cuda=True)

``scripts/bench.py --profile N`` prints it per method. On a GPU it separates host time from
kernel time: a phase whose kernels take a small part of its host time is launch-bound
(the GPU waits for Python), one whose kernels fill it is compute-bound.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable

from egg_eval import phases
from egg_eval.phases import PHASES


def phase_totals(
    ranges: Iterable[tuple[float, float, str]], launches: Iterable[tuple[float, float]]
) -> dict[str, dict[str, float]]:
    """Per phase: ``calls``, ``host_s`` (the ranges' summed duration) and ``device_s`` (the
    summed duration of the kernels launched while one of its ranges was open, on any
    thread: autograd runs a GPU backward's ops on its own thread, not inside the caller's
    range). ``ranges``: (start_us, end_us, phase); ``launches``: (launch time_us, kernel
    duration_us). Phases nest (the tower inside an answer), so a kernel counts in each open
    phase, but once per phase even where ranges of one phase overlap."""
    out: dict[str, dict[str, float]] = {}
    spans: dict[str, list[tuple[float, float]]] = {}
    for start, end, phase in ranges:
        e = out.setdefault(phase, {"calls": 0, "host_s": 0.0, "device_s": 0.0})
        e["calls"] += 1
        e["host_s"] += (end - start) / 1e6
        spans.setdefault(phase, []).append((start, end))
    merged = {}
    for phase, ss in spans.items():  # a phase's ranges as disjoint intervals, sorted
        ss.sort()
        m = [list(ss[0])]
        for s, e in ss[1:]:
            if s <= m[-1][1]:
                m[-1][1] = max(m[-1][1], e)
            else:
                m.append([s, e])
        merged[phase] = ([s for s, _ in m], [e for _, e in m])
    for t, dur in launches:
        for phase, (starts, ends) in merged.items():
            i = bisect.bisect_right(starts, t) - 1
            if i >= 0 and t <= ends[i]:
                out[phase]["device_s"] += dur / 1e6
    return out


def profile_phases(fn: Callable[[], object], cuda: bool = False) -> dict[str, dict[str, float]]:
    """Run ``fn`` under torch.profiler; :func:`phase_totals` of its phases, plus ``all``:
    ``host_s`` the wall time of ``fn`` (the profiler's own overhead included, so it exceeds
    an unprofiled run), ``device_s`` the time of every kernel it launched, ``calls`` its
    aten ops (nested ones included)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()  # inside: the profiler's start and its processing at exit are not fn's
        fn()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    names = {name: phase for phase, name in PHASES.items()}
    events = prof.events()
    # host ranges only: on a GPU the profiler also records each range's span on the device
    host = DeviceType.CPU
    ranges = [
        (e.time_range.start, e.time_range.end, names[e.name])
        for e in events
        if e.name in names and e.device_type == host
    ]
    launches = [(e.time_range.start, sum(k.duration for k in e.kernels)) for e in events if e.kernels]
    out = phase_totals(ranges, launches)
    out["all"] = {
        "calls": sum(1 for e in events if e.name.startswith("aten::")),
        "host_s": wall,
        "device_s": sum(d for _, d in launches) / 1e6,
    }
    return out


def count_flops(fn: Callable[[], object]) -> dict[str, int]:
    """Floating-point operations of ``fn()`` by the phase they ran in (the innermost open one;
    ``other`` outside every phase) and ``all``: matrix products, convolutions and attention, as
    ``torch.utils.flop_counter`` counts them (two per multiply-add), forward and backward, on
    any device (CPU's fused SDPA kernels included, which its registry lacks). The rest
    (norms, activations, softmax outside fused attention) is a few percent and not counted.
    A hardware-independent cost: EGG's FLOPs over the plain model's is the ratio its time
    approaches where the device is compute-bound."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    extra = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):

        def cpu_sdpa(query, key, value, *args, out_val=None, **kwargs):
            return sdpa_flop_count(query.shape, key.shape, value.shape)

        def cpu_sdpa_backward(grad_out, query, key, value, *args, out_val=None, **kwargs):
            return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)

        extra[aten._scaled_dot_product_flash_attention_for_cpu] = cpu_sdpa
        extra[aten._scaled_dot_product_flash_attention_for_cpu_backward] = cpu_sdpa_backward
    counts: dict[str, int] = {}

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            packet = func._overloadpacket
            formula = flop_registry.get(packet) or extra.get(packet)
            if formula is not None:
                n = int(formula(*args, **kwargs, out_val=out))
                where = phases.current() or "other"
                counts[where] = counts.get(where, 0) + n
                counts["all"] = counts.get("all", 0) + n
            return out

    with phases.tracking(), Counter():
        fn()
    return counts
