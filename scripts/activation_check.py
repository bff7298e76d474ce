"""Compare ``Backbone.activation_bytes_per_token`` with what autograd really keeps.

    python scripts/activation_check.py                    # all four families, bf16, CPU (about 10 min)
    python scripts/activation_check.py --families llava16

For each family it builds the published configuration with random weights and 1, then 2,
decoder layers (as ``scripts/bench.py --backbone real`` does), runs one grounding forward
on a detail scene, and sums the tensors autograd saves for the backward (weights
excluded), as it is and with lean activations (``egg_eval.backbones.lean``). The difference
between 2 and 1 layers is one layer's cost per token, printed next to the estimate (which
carries a 10% margin; divided out in the last column).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from bench import real_size

    from egg_eval.backbones import BACKBONES
    from egg_eval.backbones.lean import lean_activations
    from egg_eval.data.detail import rows
    from egg_eval.grounding.saliency import saved_bytes_per_token

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="llava15,llava16,qwen25vl,internvl35")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    r = next(iter(rows(1, seed=2000)))
    print("| family | activations | saved per token and layer, B | estimate, B | estimate / 1.1 / saved |")
    print("|---|---|---|---|---|")
    for family in args.families.split(","):
        measured: dict[bool, list[float]] = {False: [], True: []}
        for layers in (1, 2):
            model, proc = real_size(family, layers, torch.device("cpu"), getattr(torch, args.dtype))
            bb = BACKBONES[family](model, proc, name=family)
            for lean in (False, True):
                with lean_activations(bb.language_model, lean):
                    measured[lean].append(saved_bytes_per_token(bb, r["image"], r["question"]))
            per_layer = {lean: bb._saved_elements(lean)[0] * bb.dtype.itemsize for lean in (False, True)}
            del model, bb
        for lean, (one, two) in measured.items():
            saved = two - one
            estimate = int(1.1 * per_layer[lean])
            name = "lean" if lean else "as they are"
            print(f"| {family} | {name} | {saved:.0f} | {estimate} | {estimate / 1.1 / saved:.3f} |", flush=True)


if __name__ == "__main__":
    main()
