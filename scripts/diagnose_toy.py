"""Where does a toy checkpoint look on the whole image? (the numbers behind the README's demo notes)

    python scripts/diagnose_toy.py                         # the shipped toy, 80 single-region scenes
    python scripts/diagnose_toy.py --checkpoint /tmp/toy --n 200

For held-out single-region detail scenes, on the whole image alone, it prints how often the
peak of each saliency map falls on a token of the evidence square, and the share of the map
on those tokens:

- the EGG map (gradient norm of the objective w.r.t. each visual token), for the entropy and
  max-prob objectives and the logit lens at layer 1;
- the attention from the position that predicts the answer, per decoder layer (mean over
  heads): what the model itself attends to.

Evidence tokens are those whose cell centre lies in the evidence square (about 4% of the grid).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from egg_eval.backbones import load_backbone
from egg_eval.data.detail import rows
from egg_eval.data.prompts import OPEN_SUFFIX
from egg_eval.demo import HELD_OUT_SEED
from egg_eval.grounding.saliency import token_saliency
from egg_eval.toy_vlm import CHECKPOINT, evidence_tokens

MAPS = {"entropy": {}, "entropy_layer1": {"layer": 1}, "max_prob": {"objective": "max_prob"}}


def diagnose(backbone, samples) -> dict:
    """Per map: mean ``peak_on_evidence`` and ``share_on_evidence`` over ``samples``."""
    stats: dict[str, dict[str, list]] = {}

    def add(name, scores, ev):
        s = stats.setdefault(name, {"peak_on_evidence": [], "share_on_evidence": []})
        s["peak_on_evidence"].append(float(ev[int(np.argmax(scores))]))
        s["share_on_evidence"].append(float(scores[ev].sum() / max(scores.sum(), 1e-12)))

    model = backbone.model
    for r in samples:
        text = f"{r['question']}\n{OPEN_SUFFIX}"
        w, h = r["image"].size
        ev = evidence_tokens((0, 0, w, h), r["bbox"])
        for name, kw in MAPS.items():
            add(name, token_saliency(backbone, r["image"], text, **kw).scores, ev)
        enc = backbone.encode([r["image"]], text)
        previous = model.config._attn_implementation
        model.set_attn_implementation("eager")  # only the eager kernel returns attention weights
        try:
            with torch.no_grad():
                out = model(**enc, output_attentions=True, use_cache=False)
        finally:
            model.set_attn_implementation(previous)
        image = (enc["input_ids"][0] == model.config.image_token_id).cpu().numpy()
        for layer, att in enumerate(out.attentions, 1):
            add(f"attention_layer{layer}", att[0, :, -1, :].mean(0).float().cpu().numpy()[image], ev)
    return {m: {k: round(float(np.mean(v)), 3) for k, v in s.items()} for m, s in stats.items()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(CHECKPOINT))
    ap.add_argument("--n", type=int, default=80, help="single-region held-out scenes")
    ap.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    args = ap.parse_args()
    torch.set_num_threads(2)
    bb = load_backbone("llava15", args.checkpoint, dtype="float32", device="cpu", max_new_tokens=4)
    samples = [r for r in rows(4 * args.n, seed=args.seed) if r["kind"] == "single"][: args.n]
    result = diagnose(bb, samples)
    print(f"{len(samples)} single-region scenes, whole image, {args.checkpoint}\n")
    print("| map | peak on evidence | share on evidence |\n|---|---|---|")
    for m, v in result.items():
        print(f"| {m} | {100 * v['peak_on_evidence']:.1f}% | {100 * v['share_on_evidence']:.1f}% |")
    print(json.dumps(result))
