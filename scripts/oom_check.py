"""Real out-of-memory on a GPU: the grounding's fallback and the runner's per-sample record.

    python scripts/oom_check.py                        # Qwen2.5-VL and LLaVA-1.6, published 7B architectures, cuda bf16
    python scripts/oom_check.py --families llava16 --large 1024
    python scripts/oom_check.py --backbone tiny --device cpu --dtype float32   # CPU dry run (a test): no cap

The CPU tests raise ``torch.OutOfMemoryError`` by hand. Here CUDA's caching allocator raises
it: the process's memory is capped (``torch.cuda.set_per_process_memory_fraction``) between
peaks this script first measures without a cap, on a small detail scene (320 px) and the same
scene enlarged (``--large`` px, more visual tokens on the dynamic-resolution families) with
``--context`` words of text before its question (more text tokens on every family), with
``execution.activation_memory_gb=null`` so that nothing plans around the cap, under
``deterministic=true`` so that results compare bit for bit:

1. **Fallback.** Capped between the large sample's peak with every layer recomputed and its
   peak as it is: its grounding runs out of memory, is redone with its layers recomputed, and
   the sample must come out with the uncapped run's crops and answer, ``memory_fallbacks`` > 0.
2. **Recorded, and the run goes on.** Capped between the small sample's peak (recomputed) and
   the large one's (recomputed): ``egg_eval.runner.run`` on small, large, small must record
   the large sample as ``OutOfMemoryError``, the two small ones as the uncapped run's, and hand
   the failed sample's memory back. A rerun without the cap then computes the failed sample
   again (``retry_failed``) and gets the uncapped run's result.

A family that fails prints its traceback and the script goes on; the exit status is the
number of families that failed. On CPU there is no cap to set: the dry run checks the plumbing
(the same runs, uncapped, must all succeed and agree).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def check(
    family: str, layers: int, device: str, dtype: str, backbone: str = "real", large: int = 1024, context: int = 1500
) -> None:
    from bench import load
    from gpu_check import answers_as_ids

    from egg_eval.cli import set_deterministic

    bb = load(argparse.Namespace(backbone=backbone, family=family, layers=layers, device=device, dtype=dtype))
    set_deterministic(True)
    with answers_as_ids(bb):  # the random weights' answers compare by their ids
        _check(bb, family, large, context)


def _check(bb, family: str, large: int, context: int) -> None:
    import torch
    from gpu_check import MemoryPeak, crops
    from PIL import Image

    from egg_eval.data.benchmarks import BenchmarkSpec, Sample
    from egg_eval.data.detail import rows
    from egg_eval.data.prompts import OPEN_SUFFIX
    from egg_eval.grounding.refine import EggConfig, ExecutionConfig, run_egg
    from egg_eval.runner import RunInfo, read_records, run

    r = next(iter(rows(1, seed=2002)))
    images = {"small": r["image"], "large": r["image"].resize((large, large), Image.BICUBIC)}
    # the large sample: more visual tokens on the dynamic-resolution families, and on every
    # family (LLaVA-1.5 sees 576 at any size) more text tokens before its question
    words = (_FILLER.split() * (context // len(_FILLER.split()) + 1))[:context]
    questions = {"small": r["question"], "large": "\n".join([" ".join(words), r["question"]]).strip()}
    # one pass per view: as is and recomputed, a view's map is the same to the bit under
    # deterministic=true, while a batch and its views one by one differ by float rounding
    # (the batch's own fallback, one view at a time, is tested on CPU)
    as_is = ExecutionConfig(activation_memory_gb=None, batch_views=False)
    recomputed = ExecutionConfig(activation_memory_gb=None, batch_views=False, checkpoint_layers=True)
    model = torch.cuda.memory_allocated(bb.device) if bb.device.type == "cuda" else 0
    print(f"  model and what it holds {gib(model)} on {bb.device} {bb.dtype}")

    ref, peak = {}, {}
    for name, image in images.items():
        for how, cfg in (("as is", as_is), ("recomputed", recomputed)):
            with MemoryPeak(bb.device) as m:
                answer, trace = run_egg(bb, image, f"{questions[name]}\n{OPEN_SUFFIX}", EggConfig(), execution=cfg)
            peak[name, how] = m
            print(
                f"  {name} ({image.size[0]} px, {len(questions[name].split())} words), {how}: peak above the model "
                f"{gib(m.allocated)} allocated, {gib(m.reserved)} reserved; {trace.counters.n_backward} backward"
            )
            if how == "as is":
                ref[name] = (answer, crops(trace), trace)
            else:  # recomputed layers: the same maps, so the same crops and answer
                assert (answer, crops(trace)) == ref[name][:2], f"{name}: recomputed run differs from as is"

    def between(low, high) -> float | None:
        if bb.device.type != "cuda":
            return None
        lo, hi = peak[low].reserved, peak[high].allocated
        if not lo < 0.9 * hi:
            return None
        return (lo + hi) / 2

    # 1. the fallback inside the grounding: out of memory as is, redone with layers recomputed
    cap = between(("large", "recomputed"), ("large", "as is"))
    if cap is None and bb.device.type == "cuda":
        raise AssertionError("recomputing the layers saved too little memory to set a cap between the two")
    with MemoryPeak(bb.device, cap) as m:
        answer, trace = run_egg(
            bb, images["large"], f"{questions['large']}\n{OPEN_SUFFIX}", EggConfig(), execution=as_is
        )
    fallbacks = trace.counters.memory_fallbacks
    same = (answer, crops(trace)) == ref["large"][:2]
    print(
        f"  fallback, capped at {gib(cap) + ' above what it held' if cap else 'none'}: {fallbacks} memory "
        f"fallbacks, peak above what it held {gib(m.allocated)}; crops and answer as uncapped: {same}"
    )
    assert same, "the fallback changed the result"
    assert cap is None or fallbacks > 0, "the cap did not make the grounding run out of memory"

    # 2. the runner: the large sample recorded as out of memory, the run going on
    cap = between(("small", "recomputed"), ("large", "recomputed"))
    if cap is None and bb.device.type == "cuda":  # a family whose views all have about as many tokens
        print("  runner: not checked, the small and large samples need about as much memory recomputed")
        return
    spec = BenchmarkSpec(name="oom_check", hf_id="-", split="test", metric="exact_match")
    samples = [Sample(id=i, question=questions[n], image=images[n], answers=["a"]) for i, n in _ORDER]
    out = Path(tempfile.mkdtemp()) / "run"
    info = RunInfo(output_dir=out, spec=spec, method="egg", backbone=family, progress=False)

    def method(image, text):
        return run_egg(bb, image, text, EggConfig(), execution=as_is)

    with MemoryPeak(bb.device, cap):
        summary = run(samples, method, info)
    left = (torch.cuda.memory_allocated(bb.device) - model) if bb.device.type == "cuda" else 0
    recs = {x["id"]: x for x in read_records(out / "records.jsonl")}
    print(
        f"  runner, capped at {gib(cap) + ' above what it held' if cap else 'none'}: "
        + ", ".join(f"{i} {(recs[i]['error'] or 'ok')[:60]!r}" for i, _ in _ORDER)
        + f"; {summary['n_failures']} failure(s); held after the run above the model {gib(left)}"
    )
    for i, name in _ORDER:
        expected_error = cap is not None and name == "large"
        assert (recs[i]["error"] or "").startswith("OutOfMemoryError") == expected_error, (i, recs[i]["error"])
        if not expected_error:
            assert recs[i]["prediction"] == ref[name][0], (i, recs[i]["prediction"], ref[name][0])
            assert recs[i]["final_views"] == ref[name][2].to_dict()["final_views"], i
    failed = summary["n_failures"]
    summary = run(samples, method, info)  # a larger GPU: the failed sample is computed again
    recs = {x["id"]: x for x in read_records(out / "records.jsonl")}
    assert summary["n_failures"] == 0 and len(recs) == len(_ORDER)
    assert recs["large"]["final_views"] == ref["large"][2].to_dict()["final_views"]
    print(f"  rerun without the cap: {failed} failed sample(s) computed again, as uncapped; no failures")


_ORDER = (("small", "small"), ("large", "large"), ("small again", "small"))
_FILLER = (
    "The survey counted the boats in the harbour at dawn and again at dusk, and the two tallies "
    "were written in the ledger beside the tide tables and the names of the harbour masters."
)


def main() -> int:
    from gpu_check import device_args, each_family

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    device_args(ap, families="qwen25vl,llava16", layers=0)
    ap.add_argument("--large", type=int, default=1024, help="side of the large sample, px (the small one: 320)")
    ap.add_argument(
        "--context", type=int, default=1500, help="words of text before the large sample's question (0: none)"
    )
    args = ap.parse_args()
    return each_family(args, check, "large", "context")


if __name__ == "__main__":
    raise SystemExit(main())
