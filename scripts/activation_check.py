"""Compare ``Backbone.activation_bytes_per_token`` with what autograd really keeps.

    python scripts/activation_check.py                    # all four families, bf16, CPU (about 10 min)
    python scripts/activation_check.py --families llava16

For each family it builds the published configuration with random weights and 1, then 2,
decoder layers (as ``scripts/bench.py --backbone real`` does), runs one grounding forward
on a detail scene, and sums the tensors autograd saves for the backward (weights
excluded), as it is and with lean activations (``egg_eval.backbones.lean``). The difference
between 2 and 1 layers is one layer's cost per token, printed next to the estimate (which
carries a 10% margin; divided out in the last column).

    python scripts/activation_check.py --peak lean --families llava16 --layers 4 --image-size 640

``--peak PLAN`` (``plain``, ``lean``, ``plain+R``, ``lean+R``: R leading layers recomputed)
instead runs one grounding pass of the first family with ``--layers`` decoder layers on a
scene resized to ``--image-size`` and prints its time and the peak resident memory above
what the process held before it (Linux: the peak is reset through /proc/self/clear_refs),
beside the estimate. One plan per process, so that each peak is its own.

    python scripts/activation_check.py --plans

``--plans`` prints, from the estimate alone (the published depths built on the meta device,
no memory, no time), what the default budget (``execution.activation_memory_gb=auto``: 0.4x the
weights' bytes) plans for one-view passes of :data:`PLAN_TOKENS` tokens: the activations as
they are and lean, and the layers recomputed without lean and with it (arithmetic, not a
measurement). A round's batch of views is grounded as one pass where it fits as it is or
lean, else one view at a time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# passes whose plans --plans prints: (what, tokens) per family
PLAN_TOKENS = {
    "llava15": [("any view (576 image tokens)", 598)],
    "llava16": [("the whole 320 px scene", 1216), ("a wide crop", 1752), ("a 1024x768 image", 2340)],
    "qwen25vl": [("a 1024 px image", 1300), ("a 1700x2200 DocVQA page", 4800)],
    "internvl35": [("one tile and the thumbnail", 512), ("a crop in 7 tiles", 1900)],
}


def published(family: str, layers: int | None, device: str, dtype: str):
    """The family's published configuration with random weights, ``layers`` decoder layers
    (None: all), as ``scripts/bench.py --backbone real`` builds it."""
    from bench import real_size

    from egg_eval.backbones import BACKBONES

    model, proc = real_size(family, layers, torch.device(device), getattr(torch, dtype))
    return BACKBONES[family](model, proc, name=family)


def main() -> None:
    from egg_eval.backbones.lean import lean_activations
    from egg_eval.data.detail import rows
    from egg_eval.grounding.saliency import saved_bytes_per_token

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="llava15,llava16,qwen25vl,internvl35")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peak", help="plain | lean | plain+R | lean+R: time one pass and its peak memory")
    ap.add_argument("--layers", type=int, default=4, help="--peak: decoder layers")
    ap.add_argument("--image-size", type=int, default=640, help="--peak: the scene resized to this side")
    ap.add_argument("--plans", action="store_true", help="the default budget's plans, from the estimate")
    args = ap.parse_args()
    if args.plans:
        return plans(args)
    torch.set_num_threads(args.threads)
    r = next(iter(rows(1, seed=2000)))
    if args.peak:
        return peak(args, r)
    print("| family | activations | saved per token and layer, B | estimate, B | estimate / 1.1 / saved |")
    print("|---|---|---|---|---|")
    for family in args.families.split(","):
        measured: dict[bool, list[float]] = {False: [], True: []}
        for layers in (1, 2):
            bb = published(family, layers, "cpu", args.dtype)
            for lean in (False, True):
                with lean_activations(bb.language_model, lean):
                    measured[lean].append(saved_bytes_per_token(bb, r["image"], r["question"]))
            per_layer = {lean: bb._saved_elements(lean)[0] * bb.dtype.itemsize for lean in (False, True)}
            del bb
        for lean, (one, two) in measured.items():
            saved = two - one
            estimate = int(1.1 * per_layer[lean])
            name = "lean" if lean else "as they are"
            print(f"| {family} | {name} | {saved:.0f} | {estimate} | {estimate / 1.1 / saved:.3f} |", flush=True)


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key + ":"))


def peak(args, r) -> None:
    import time

    from egg_eval.grounding.saliency import entropy

    mode, _, recompute = args.peak.partition("+")
    if mode not in ("plain", "lean"):
        raise SystemExit(f"--peak takes plain, lean, plain+R or lean+R, got {args.peak!r}")
    lean, recompute = mode == "lean", int(recompute or 0)
    family = args.families.split(",")[0]
    bb = published(family, args.layers, "cpu", args.dtype)
    enc = bb.encode([r["image"].resize((args.image_size, args.image_size))], r["question"])
    leaves = bb.visual_leaves(enc)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set size (VmHWM) to the current one
    start = _status_mb("VmRSS")
    t0 = time.perf_counter()
    with torch.enable_grad():
        value = entropy(bb.next_token_logits(enc, leaves, lean=lean, recompute_layers=recompute))
        torch.autograd.grad(value, leaves)
    seconds = time.perf_counter() - t0
    n = enc["input_ids"].shape[-1]
    estimate = bb.pass_activation_bytes(n, None, recompute, lean) / 2**20
    print(
        f"{family}, {args.layers} layers, {n} tokens, {args.peak}: {seconds:.1f} s, "
        f"peak {_status_mb('VmHWM') - start:.0f} MB above the start, estimate {estimate:.0f} MB"
    )


def plans(args) -> None:
    from egg_eval.grounding.engine import AUTO_ACTIVATION_FRACTION

    gib = 2**30
    print(
        "| family, one-view pass | tokens | budget, GiB | as they are, GiB | lean, GiB "
        "| layers recomputed: without lean -> with |"
    )
    print("|---|---|---|---|---|---|")
    for family in args.families.split(","):
        bb = published(family, None, "meta", args.dtype)
        budget = AUTO_ACTIVATION_FRACTION * bb.weight_bytes
        for what, n in PLAN_TOKENS[family]:
            # layers recomputed without lean (execution.lean_activations=false) and with it (auto)
            without, with_lean = (
                "-" if p is None else p.recompute
                for p in (bb.memory_plan(n, None, budget, lean) for lean in (False, None))
            )
            print(
                f"| {family}, {what} | {n} | {budget / gib:.2f} | {bb.pass_activation_bytes(n) / gib:.2f} "
                f"| {bb.pass_activation_bytes(n, lean=True) / gib:.2f} | {without} -> {with_lean} of {bb.num_layers} |"
            )


if __name__ == "__main__":
    main()
