"""Check that grounding runs correctly on a GPU, for each family, before timing it.

    python scripts/gpu_check.py                       # all four families, 2 decoder layers, cuda bf16
    python scripts/gpu_check.py --families qwen25vl --layers 4 --dtype float32
    python scripts/gpu_check.py --backbone tiny --device cpu --dtype float32 --tolerance 1e-4   # CPU dry run (a test)

For each family it builds the published 7B/8B architecture with random weights (as
``scripts/bench.py --backbone real`` does, decoder cut to ``--layers``), and on the device:

* grounds three views of different sizes in one batched pass and one pass per view, and
  prints the largest relative difference of the maps (the batched path pads rows and reads
  each row at its own last position; it must give each view its own map);
* grounds the whole image three times, and the three views in one batch three times, by
  default and with ``deterministic=true``, and prints how far the maps are apart (0 =
  bit-equal runs; ``--deterministic`` runs the checks below with ``deterministic=true`` too);
* prefills an answer prompt (the whole image, a crop, the question) on the KV cache that the
  whole image's grounding pass kept, and prints how far its last logits are from the full
  prompt's (``execution.reuse_prefix``);
* grounds the whole image with lean activations, then lean with half its layers recomputed
  (the activation budget's plans), prints how far its map and the answer on its kept cache
  are from the plain pass's, and on a GPU each pass's peak memory per token above the model
  beside the estimate that the budget plans with (:meth:`Backbone.pass_activation_bytes`);
* runs the plain model and full iterative EGG on one sample;
* with ``--whole-runs N``: full iterative EGG (grounding rounds and answer) on N samples, twice
  in a row, by default and with ``deterministic=true``, and prints on how many samples the
  answers and the crops differ and how far the maps are apart (``--layers 0``: the family's
  full depth). Under ``deterministic=true`` any difference fails the family.

A family that fails prints its traceback and the script goes on with the next one; the
exit status is the number of families that failed. The CPU tests cover the same paths on
the tiny models; this script exists because CI has no GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def rel_gap(a, ref) -> float:
    """max |a - ref| / max |ref|: how far ``a`` (a map or logits, numpy or torch) is from ``ref``."""
    import numpy as np
    import torch

    a, ref = (x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in (a, ref))
    return float(np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-30))


class MemoryPeak:
    """Measure a call's peak above what the process held before it (CUDA: bytes allocated
    and reserved), optionally with the process allowed to reserve only ``above`` bytes more
    than it held."""

    def __init__(self, device, above: float | None = None):
        import torch

        self.cuda = device.type == "cuda"
        self.device, self.above = device, above
        self.torch = torch

    def __enter__(self):
        t = self.torch
        if self.cuda:
            t.cuda.synchronize()
            t.cuda.empty_cache()  # a cap binds new segments only: nothing cached may stand in for them
            self.base = t.cuda.memory_allocated(self.device)
            if self.above is not None:
                total = t.cuda.get_device_properties(self.device).total_memory
                t.cuda.set_per_process_memory_fraction(min((self.base + self.above) / total, 1.0), self.device)
            t.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        t = self.torch
        self.allocated = self.reserved = 0
        if self.cuda:
            t.cuda.synchronize()
            self.allocated = t.cuda.max_memory_allocated(self.device) - self.base
            self.reserved = t.cuda.max_memory_reserved(self.device) - self.base
            if self.above is not None:
                t.cuda.set_per_process_memory_fraction(1.0, self.device)
        return False


def crops(trace):
    """What a run chose: each round's kept boxes, and the views the answer read."""
    return [[s.box for s in r.selected] for r in trace.rounds], trace.final_views


@contextlib.contextmanager
def answers_as_ids(bb):
    """Answers as their token ids: a ``--backbone real`` model has the published vocabulary but
    the offline tiny tokenizer, so nearly every id it generates decodes to '' and any two
    answers would compare equal."""
    tok = bb.processor.tokenizer
    own = vars(tok).get("decode")
    tok.decode = lambda ids, **kw: " ".join(str(int(i)) for i in ids)
    try:
        yield
    finally:
        if own is None:
            del tok.decode
        else:
            tok.decode = own


def repeat_runs(bb, n: int, deterministic: bool) -> tuple[int, int, float]:
    """Full EGG on ``n`` detail samples twice in a row under ``deterministic``: on how many
    samples the answers differ, on how many the crops (any round's kept boxes, or the final
    views), and the largest gap between the maps of the samples whose crops agree."""
    from egg_eval.cli import set_deterministic
    from egg_eval.data.detail import rows
    from egg_eval.data.prompts import OPEN_SUFFIX
    from egg_eval.grounding.refine import EggConfig, run_egg

    set_deterministic(deterministic)
    samples = [(r["image"], f"{r['question']}\n{OPEN_SUFFIX}") for r in rows(n, seed=2001)]
    with answers_as_ids(bb):
        first, second = ([run_egg(bb, img, q, EggConfig()) for img, q in samples] for _ in range(2))

    answers = sum(a != b for (a, _), (b, _) in zip(first, second))
    paths = sum(crops(t) != crops(u) for (_, t), (_, u) in zip(first, second))
    gap = max(
        (
            rel_gap(m, ref)
            for (_, t), (_, u) in zip(first, second)
            if crops(t) == crops(u)
            for r, s in zip(t.rounds, u.rounds)
            for (m, _), (ref, _) in zip(s.maps, r.maps)
        ),
        default=0.0,
    )
    return answers, paths, gap


def check(
    family: str,
    layers: int,
    device: str,
    dtype: str,
    backbone: str = "real",
    tolerance=None,
    deterministic=False,
    whole_runs: int = 0,
) -> float:
    import numpy as np
    import torch
    from bench import load

    from egg_eval.cli import set_deterministic
    from egg_eval.data.detail import rows
    from egg_eval.data.prompts import OPEN_SUFFIX
    from egg_eval.grounding.refine import EggConfig, run_egg, run_vanilla
    from egg_eval.grounding.saliency import token_saliency, token_saliency_batch

    t0 = time.perf_counter()
    bb = load(argparse.Namespace(backbone=backbone, family=family, layers=layers, device=device, dtype=dtype))
    gaps = {}  # what should be float rounding only, checked against --tolerance where it is given
    print(f"  built in {time.perf_counter() - t0:.1f} s on {bb.device} {bb.dtype}")
    r = next(iter(rows(1, seed=2000)))
    q = f"{r['question']}\n{OPEN_SUFFIX}"
    img = r["image"]
    views = [img, img.crop((0, 0, 160, 120)), img.crop((100, 60, 300, 260))]
    batched = token_saliency_batch(bb, views, q)
    worst = 0.0
    for v, g in zip(views, batched):
        one = token_saliency(bb, v, q)
        assert g.scores.shape == one.scores.shape, (g.scores.shape, one.scores.shape)
        assert np.isfinite(g.scores).all()
        worst = max(worst, rel_gap(g.scores, one.scores))
    print(f"  views {[g.scores.shape[0] for g in batched]} tokens: batched vs one pass, max |diff| / max = {worst:.2e}")
    gaps["batched vs one pass"] = worst
    for det in (False, True):  # run to run: are identical grounding passes bit-equal (deterministic=...)?
        set_deterministic(det)
        runs = [token_saliency(bb, img, q).scores for _ in range(3)]
        runs_b = [np.concatenate([g.scores for g in token_saliency_batch(bb, views, q)]) for _ in range(3)]
        gap = max(rel_gap(a, runs[0]) for a in runs[1:])
        gap_b = max(rel_gap(a, runs_b[0]) for a in runs_b[1:])
        print(
            f"  the same grounding pass 3 times, deterministic={det}: max |diff| / max = {gap:.2e}, "
            f"batched views: {gap_b:.2e}"
        )
        if det:
            gaps["deterministic runs"] = max(gap, gap_b)
    set_deterministic(deterministic)  # the rest: maps that should be bit-equal are, under deterministic=true
    g = token_saliency(bb, img, q, keep_prefix=True)
    feats = [g.features, batched[1].features]
    enc = bb.encode_text(views[:2], q)
    p = bb.prefix_length(enc, feats, g.prefix)
    assert p > 0, "the answer prompt does not start with the grounding prompt through the whole image"
    with torch.no_grad():
        full = bb.model(**bb.inputs_with_features(enc, feats), use_cache=False, logits_to_keep=1).logits[0, -1]
        kw = bb._forward_on_prefix(enc, feats, g.prefix, p)
        cont = bb.model(**kw, use_cache=True, logits_to_keep=1).logits[0, -1]
    gap = rel_gap(cont, full)
    print(
        f"  answer on the grounding cache: {p} of {enc['input_ids'].shape[1]} tokens cached, "
        f"last logits |diff| / max = {gap:.2e}"
    )
    gaps["answer on the grounding cache"] = gap
    # the activation budget's plans: lean activations, then some leading layers recomputed too,
    # the cache still kept
    r_half = max(bb.most_recomputed(None) // 2, 1)
    n_tokens = g.prefix.input_ids.shape[0]  # the whole image's grounding prompt
    plans = {"as it is": (False, 0), "lean": (True, 0), f"lean, {r_half} layers recomputed": (True, r_half)}
    held = {}
    for name, (lean, r) in plans.items():
        # a budget just large enough for the plan makes the pass choose it
        budget = bb.pass_activation_bytes(n_tokens, None, r, lean) if lean else None
        with MemoryPeak(bb.device) as m:
            h = token_saliency(bb, img, q, keep_prefix=True, memory_budget=budget)
        if bb.device.type == "cuda":
            held[name] = m.allocated / n_tokens
        if not lean:
            continue
        map_gap = rel_gap(h.scores, g.scores)
        with torch.no_grad():
            kw = bb._forward_on_prefix(enc, feats, h.prefix, p)
            cont = bb.model(**kw, use_cache=True, logits_to_keep=1).logits
        gap_r = rel_gap(cont[0, -1], full)
        print(
            f"  {name}: map max |diff| / max = {map_gap:.2e}, "
            f"answer on its cache: last logits |diff| / max = {gap_r:.2e}"
        )
        gaps[f"map, {name}"], gaps[f"answer on the cache, {name}"] = map_gap, gap_r
    for name, b in held.items():
        lean, r = plans[name]
        est = bb.pass_activation_bytes(n_tokens, None, r, lean) / n_tokens
        print(f"  {name}: peak {b:.0f} B per token above the model, estimate {est:.0f}")
    ans, _ = run_vanilla(bb, img, q)
    out, trace = run_egg(bb, img, q, EggConfig())
    c = trace.counters
    print(f"  vanilla -> {ans!r}; egg -> {out!r}: {c.n_forward} forward, {c.n_backward} backward")
    unequal = None  # what differed between two whole runs under deterministic=true
    for det in (False, True) if whole_runs else ():
        t1 = time.perf_counter()
        answers, paths, gap = repeat_runs(bb, whole_runs, det)
        print(
            f"  whole EGG runs twice on {whole_runs} samples, deterministic={det}: answers differ on {answers}, "
            f"crops on {paths}, maps max |diff| / max = {gap:.2e} ({time.perf_counter() - t1:.0f} s)"
        )
        if det and (answers or paths or gap):
            unequal = f"{answers} answers, {paths} crops, maps {gap:.2e}"
    set_deterministic(False)
    if bb.device.type == "cuda":
        print(f"  peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    over = {k: v for k, v in gaps.items() if tolerance is not None and not v <= tolerance}
    if over:
        raise AssertionError(f"above --tolerance {tolerance}: {over}")
    if unequal:
        raise AssertionError(f"two whole runs under deterministic=true differ: {unequal}")
    return worst


def device_args(ap: argparse.ArgumentParser, families: str = "llava15,llava16,qwen25vl,internvl35", layers: int = 2):
    """The options every GPU-lease script takes: which families, how deep, where, in what dtype."""
    ap.add_argument("--families", default=families)
    ap.add_argument("--layers", type=int, default=layers, help="decoder layers; 0: the family's full depth")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument(
        "--backbone", choices=("real", "tiny"), default="real", help="tiny: the test models, for a CPU dry run"
    )


def each_family(args: argparse.Namespace, check_one, *options: str) -> int:
    """``check_one(family, layers, device, dtype, backbone=..., <options>=...)`` from ``args``
    for each of ``args.families`` in turn: a failure prints its traceback and the next family
    runs; each family's model is let go before the next loads. Returns how many failed (the
    exit status)."""
    import gc

    import torch

    from egg_eval.cli import fix_cublas_workspace

    fix_cublas_workspace()  # checks switch deterministic=true on after GPU work has begun
    failed = 0
    kw = {"backbone": args.backbone, **{k: getattr(args, k) for k in options}}
    for family in args.families.split(","):
        print(f"{family}:", flush=True)
        t0 = time.perf_counter()
        try:
            check_one(family, args.layers, args.device, args.dtype, **kw)
            print(f"  OK ({time.perf_counter() - t0:.0f} s)", flush=True)
        except Exception:
            failed += 1
            traceback.print_exc()
            print("  FAILED", flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    device_args(ap)
    ap.add_argument(
        "--deterministic",
        action="store_true",
        help="run the checks after the run-to-run one with deterministic=true (bit-equal maps where they should be; "
        "the peaks per token then include the deterministic attention backward's buffers)",
    )
    ap.add_argument(
        "--whole-runs",
        type=int,
        default=0,
        metavar="N",
        help="also run full EGG on N samples twice, with and without deterministic=true, and compare",
    )
    ap.add_argument(
        "--tolerance", type=float, default=None, help="fail a family whose exact-by-construction gaps exceed this"
    )
    args = ap.parse_args()
    return each_family(args, check, "tolerance", "deterministic", "whole_runs")


if __name__ == "__main__":
    raise SystemExit(main())
