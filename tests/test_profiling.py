"""The phase profile (``egg_eval.profiling``, ``scripts/bench.py --profile``): every phase of a
run is marked once per call, and kernel time goes to the phases open when it was launched."""

from __future__ import annotations

import pytest
from conftest import noise_image

from egg_eval.grounding.refine import EggConfig, run_egg, run_vanilla
from egg_eval.profiling import phase_totals, profile_phases


def test_phase_totals_attributes_kernels_by_launch_time():
    ranges = [
        (0, 100, "forward"),
        (10, 30, "tower"),  # nested in the forward
        (100, 200, "backward"),
        (300, 400, "answer"),
        (350, 380, "answer"),  # an answer range inside another: its kernels count once
    ]
    launches = [(20, 5), (150, 7), (250, 3), (360, 2), (390, 11)]
    out = phase_totals(ranges, launches)
    assert out["forward"] == {"calls": 1, "host_s": 100e-6, "device_s": 5e-6}
    assert out["tower"]["device_s"] == pytest.approx(5e-6)  # the kernel at 20 is in both
    # launched at 150 (autograd's own thread on a GPU): inside the backward's range in time
    assert out["backward"]["device_s"] == pytest.approx(7e-6)
    assert out["answer"] == {"calls": 2, "host_s": pytest.approx(130e-6), "device_s": pytest.approx(13e-6)}
    # the kernel at 250 was launched outside every phase
    assert sum(e["device_s"] for p, e in out.items() if p != "tower") == pytest.approx(25e-6)


def test_profile_marks_every_phase_once_per_call(tiny_backbones, family):
    bb = tiny_backbones[family]
    image = noise_image(150, 100, seed=3)
    result = {}
    phases = profile_phases(lambda: result.update(trace=run_egg(bb, image, "What is it?", EggConfig())[1]))
    c = result["trace"].counters
    grounded = {tuple(v.as_list()) for r in result["trace"].rounds for v in r.views}  # each grounded once
    assert phases["forward"]["calls"] == phases["backward"]["calls"] == c.n_backward >= 1
    assert phases["tower"]["calls"] == c.n_tower
    assert phases["map"]["calls"] == phases["regions"]["calls"] == len(grounded)
    # a prompt per view grounded, and the answer's (tokens only, where the embeddings are reused)
    assert phases["processor"]["calls"] == len(grounded) + 1
    assert phases["answer"]["calls"] == 1
    assert 0 < phases["forward"]["host_s"] + phases["backward"]["host_s"] < phases["all"]["host_s"]
    assert phases["all"]["calls"] > 0 and phases["all"]["device_s"] == 0  # no kernels on a CPU

    plain = profile_phases(lambda: run_vanilla(bb, image, "What is it?"))
    assert set(plain) == {"processor", "tower", "answer", "all"}
    assert plain["tower"]["calls"] == plain["answer"]["calls"] == 1


def test_count_flops_counts_products_and_attention_by_phase():
    import torch

    from egg_eval import phases
    from egg_eval.profiling import count_flops

    lin = torch.nn.Linear(4, 3, bias=False)
    x = torch.randn(2, 4, requires_grad=True)
    q = k = v = torch.randn(1, 1, 4, 8)

    def work():
        with phases.phase("forward"):
            y = lin(x)  # 2 x 4 x 3 multiply-adds: 48 FLOPs
            with phases.phase("tower"):  # the innermost phase takes it
                torch.nn.functional.scaled_dot_product_attention(q, k, v)  # QK^T and AV: 2 x 2 x 4 x 4 x 8
        with phases.phase("backward"):
            torch.autograd.grad(y.sum(), x)  # the input's gradient only: one 2 x 3 x 4 product
        lin(x)  # outside every phase

    counts = count_flops(work)
    assert counts == {"forward": 48, "tower": 512, "backward": 48, "other": 48, "all": 656}
    assert not phases.is_tracking()  # phases are tracked only while counting
    lin.requires_grad_(False)
    assert count_flops(lambda: torch.autograd.grad(lin(x).sum(), x))["all"] == 48 + 48


def test_count_flops_of_a_run_splits_egg_by_phase(tiny_backbones):
    from egg_eval.profiling import count_flops

    bb = tiny_backbones["qwen25vl"]
    image = noise_image(150, 100, seed=3)
    plain = count_flops(lambda: run_vanilla(bb, image, "What is it?"))
    egg = count_flops(lambda: run_egg(bb, image, "What is it?", EggConfig()))
    assert set(plain) == {"tower", "answer", "all"} and plain["all"] == plain["tower"] + plain["answer"]
    assert {"tower", "forward", "backward", "answer"} <= set(egg) and egg["all"] > plain["all"]
    # the backward to the visual tokens costs more than its forward (attention's backward), but
    # without weight gradients less than twice as much
    assert egg["forward"] < egg["backward"] < 2 * egg["forward"]
