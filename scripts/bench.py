"""Benchmark EGG against the plain model on one backbone, machine and sample set (`make bench`).

    python scripts/bench.py                          # the shipped toy LLaVA on CPU, 40 detail scenes
    python scripts/bench.py --backbone tiny --family qwen25vl
    python scripts/bench.py --backbone real --family llava15 --device cuda --dtype bfloat16   # GPU
    python scripts/bench.py --backbone real --family llava15 --layers 2     # real widths, 2 layers (CPU check)
    python scripts/bench.py --backbone real --family qwen25vl --image-size 1024 --device cuda --dtype bfloat16

    python scripts/bench.py --backbone real --family internvl35 --layers 1 --n 2 --methods vanilla,egg --flops-only

Prints, per method, the median seconds per sample, split into the answer pass and the rest
(grounding, regions, crops; each a median over samples, so the two need not add up),
forward and backward passes and vision-tower calls per sample and the peak memory, and,
for one view, one grounding pass (forward + backward to the visual tokens) against one
plain forward. Each method first runs on one extra sample (not counted). ``--flops N`` also
counts the FLOPs of N samples per method by phase; ``--flops-only`` counts them (and the
passes) without timing, scaled to the family's full depth where ``--layers`` cut the decoder.

With ``--paired`` (the default) the plain model is also timed right before each EGG run, on
the same sample in the same process, and "x vanilla" is taken from those timings: a shared
machine's speed drifts between methods (on this project's 2-core box the plain model's
median moved by up to 2x between runs), and pairing cancels that drift.

Peak memory is on GPU ``torch.cuda.max_memory_allocated`` (reset before each method, so all
methods share one process and one model load), on CPU the peak resident set size
(``ru_maxrss``, which cannot be reset, so each method gets its own process); both whole
(weights included: what decides whether a job fits) and above the loaded model (what the
method itself adds). ``--processes`` overrides the choice. With ``--paired`` a method's peak
is the larger of its own and the plain model's (the plain model's is the smaller). On GPU a
line under the table also gives each method's peak *reserved* by PyTorch's caching allocator
(``torch.cuda.max_memory_reserved``: what the device shows as taken, allocated memory plus
the cached blocks that varying shapes leave between them). ``--alloc-conf`` sets
``PYTORCH_CUDA_ALLOC_CONF`` for the measuring process, e.g. ``expandable_segments:True``, to
compare the allocator's settings.

``--backbone real`` builds the published 7B configuration of the family with RANDOM
weights (no download): only timings and memory mean anything there, not answers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

METHODS = {  # each speed-up switched on in turn; "egg" is the default configuration
    "vanilla": {},
    "egg_one_view_per_pass": {"batch_views": False, "reuse_features": False, "activation_memory_gb": None},
    "egg_batched_views": {"batch_views": True, "reuse_features": False, "activation_memory_gb": None},
    "egg_reused_features": {"reuse_features": True, "reuse_prefix": False, "activation_memory_gb": None},
    "egg_reused_prefix": {"reuse_features": True, "reuse_prefix": True, "activation_memory_gb": None},
    # the fastest, with every grounding pass lean (execution.lean_activations=true): what lean costs
    "egg_lean": {"activation_memory_gb": None, "lean_activations": True},
    "egg": {},  # + passes planned to the activation budget (execution.activation_memory_gb=auto)
    # the budget met by recomputing layers only (execution.lean_activations=false): what lean saves
    "egg_no_lean": {"lean_activations": False},
    "egg_recompute_layers": {"checkpoint_layers": True},
}
# the fastest configuration (egg_reused_prefix) with one speed-up undone (egg_eval.undone): what it saves
UNDONE = {
    "egg_param_grads": "parameter gradients and the vision tower's graph, as the reference code",
    "egg_no_map_cache": "every view of a round grounded again, the whole image in every round",
    "egg_eager": "eager attention instead of SDPA",
    "egg_fp32": "float32 weights (on a model loaded in bf16 or fp16)",
}
METHODS.update({m: {"activation_memory_gb": None} for m in UNDONE})
BUDGETED = ("egg", "egg_no_lean", "egg_recompute_layers")  # the rows --activation-memory-gb sets the budget of


CLIP_L336 = dict(  # openai/clip-vit-large-patch14-336, the tower of LLaVA-1.5 and LLaVA-1.6
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14, projection_dim=768,
)  # fmt: skip
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6-mistral-7b-hf


DEPTH = {"llava15": 32, "llava16": 32, "qwen25vl": 28, "internvl35": 36}  # decoder layers of the published models
# result key -> the per-sample counter (egg_eval.types.Counters) whose mean over samples it reports
COUNTERS = {
    "forward": "n_forward",
    "backward": "n_backward",
    "grounded": "n_grounded",
    "tower": "n_tower",
    "memory_limited": "memory_limited",
    "recomputed_layers": "recomputed_layers",
    "lean_passes": "lean_passes",
    "prefix_tokens": "prefix_tokens",
}
PASSES = ("forward", "backward", "grounded", "tower")  # the --flops-only table's columns


def counter_means(counters: list) -> dict[str, float]:
    """The mean over samples of each of :data:`COUNTERS`."""
    return {k: statistics.mean(getattr(c, a) for c in counters) for k, a in COUNTERS.items()}


def real_size(family: str, layers: int | None, device, dtype):
    """A random-weight model of the family's published 7B/8B configuration and a processor
    with its published image settings (llava-hf/llava-1.5-7b-hf, llava-hf/llava-v1.6-mistral-7b-hf,
    Qwen/Qwen2.5-VL-7B-Instruct, OpenGVLab/InternVL3_5-8B-HF). ``layers`` cuts the decoder
    (the vision tower stays whole). The tokenizer is the offline tiny one, so prompts are
    shorter than the real ones by a few dozen tokens; image tokens are exact."""
    import torch
    from transformers import Qwen3Config

    from egg_eval.backbones.tiny import FAMILIES, build, build_tokenizer

    if family not in FAMILIES:
        raise SystemExit(f"--backbone real knows {', '.join(FAMILIES)}, not {family!r}")
    tok = build_tokenizer()
    depth = layers or DEPTH[family]
    sizes = {
        "llava15": dict(
            vision=CLIP_L336,
            text=dict(  # vicuna-7b-v1.5
                vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=depth,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
            ),
            image={"side": 336},
        ),
        "llava16": dict(
            vision=CLIP_L336,
            text=dict(  # Mistral-7B-Instruct-v0.2
                vocab_size=32064, hidden_size=4096, intermediate_size=14336, num_hidden_layers=depth,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                rope_theta=1e6, sliding_window=None,
            ),
            image={"side": 336, "pinpoints": PINPOINTS},
        ),
        "qwen25vl": dict(
            vision=dict(
                depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                fullatt_block_indexes=[7, 15, 23, 31],
            ),
            text=dict(
                vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=depth,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
            ),
            image={"min_pixels": 3136, "max_pixels": 12845056},
        ),
        "internvl35": dict(
            vision=dict(  # InternViT-300M-448px-V2.5
                hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            ),
            text=dict(  # Qwen3-8B
                vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=depth,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rope_theta=1e6,
            ),
            text_class=Qwen3Config,
            image={"tile": 448, "max_patches": 12, "seq_length": 256},
        ),
    }  # fmt: skip
    cfg, model_class, proc = build(family, tok, **sizes[family])
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:  # built directly on the target device in the target dtype (7B in fp32 on CPU would need 28 GB)
        with torch.device(device):
            model = model_class(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.eval(), proc


def load(args):

    from egg_eval.backbones import BACKBONES, load_backbone
    from egg_eval.backbones.loading import resolve_device_dtype, use_cudnn_attention
    from egg_eval.toy_vlm import CHECKPOINT

    if getattr(args, "deterministic", False):  # before the model: cuBLAS reads its workspace setting when it starts
        from egg_eval.cli import set_deterministic

        set_deterministic(True)
    kw = dict(dtype=args.dtype, device=args.device, max_new_tokens=4, sdpa_cudnn=getattr(args, "sdpa_cudnn", False))
    if args.backbone == "toy":
        return load_backbone("llava15", str(CHECKPOINT), **kw)
    if args.backbone == "tiny":
        import tempfile

        from egg_eval.backbones.tiny import save_tiny

        return load_backbone(args.family, str(save_tiny(args.family, tempfile.mkdtemp())), **kw)
    if args.backbone == "real":  # built here, not loaded: the switch load_backbone sets, set here
        use_cudnn_attention(kw["sdpa_cudnn"])
        device, dtype = resolve_device_dtype(args.device, args.dtype)
        model, proc = real_size(args.family, args.layers, device, dtype)
        return BACKBONES[args.family](model, proc, name=f"{args.family}_random7b", max_new_tokens=4)
    return load_backbone(args.family, args.backbone, **kw)


def child(args):
    """Load the model once and measure each method of ``args.child`` (comma-separated) in
    turn; each method's numbers go to stdout as one JSON line as soon as they are taken."""
    import torch
    from PIL import Image

    from egg_eval.data.detail import rows
    from egg_eval.data.prompts import OPEN_SUFFIX
    from egg_eval.grounding.refine import EggConfig, ExecutionConfig, run_egg, run_vanilla
    from egg_eval.grounding.saliency import token_saliency
    from egg_eval.profiling import count_flops, profile_phases
    from egg_eval.undone import UNDONE as UNDONE_CM

    torch.set_num_threads(args.threads)
    t_load = time.perf_counter()
    backbone = load(args)
    if args.stock_windows:
        from egg_eval.backbones.qwen2_5_vl import group_vision_windows

        group_vision_windows(backbone.model, False)
    if args.max_tiles is not None:
        backbone.set_max_tiles(args.max_tiles)  # internvl35
    if args.max_pixels is not None:
        backbone.set_pixel_range(None, args.max_pixels)  # qwen25vl
    load_s = time.perf_counter() - t_load
    cuda = backbone.device.type == "cuda"
    samples = list(rows(args.n + 1, seed=2000))
    if args.image_size:  # dynamic-resolution models (Qwen2.5-VL, InternVL, LLaVA-1.6) see more tokens
        samples = [{**r, "image": r["image"].resize((args.image_size,) * 2, Image.BICUBIC)} for r in samples]
    text = lambda r: f"{r['question']}\n{OPEN_SUFFIX}"  # noqa: E731
    warm = samples.pop()  # an extra sample each method first runs on (allocator, kernels), not counted

    def timed(fn):
        """(seconds, result) of ``fn()``, the device synchronised."""
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    def plain_forward(enc):
        with torch.no_grad():
            return backbone.model(**backbone.model_inputs(enc), use_cache=False, logits_to_keep=1)

    def memory() -> int:
        return torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def reserved() -> dict:
        return {"reserved_peak_mb": torch.cuda.max_memory_reserved() / 2**20} if cuda else {}

    def measure(method: str) -> dict:
        # per sample the fastest of ``repeats`` timings (as timeit does), then the median
        if method == "passes":
            plain, ground = [float("inf")] * len(samples), [float("inf")] * len(samples)
            token_saliency(backbone, warm["image"], text(warm))
            for _ in range(args.repeats):
                for i, r in enumerate(samples):
                    enc = backbone.encode([r["image"]], text(r))
                    plain[i] = min(plain[i], timed(lambda: plain_forward(enc))[0])  # noqa: B023
                    ground[i] = min(ground[i], timed(lambda: token_saliency(backbone, r["image"], text(r)))[0])  # noqa: B023
            return {"forward_s": statistics.median(plain), "grounding_s": statistics.median(ground), "load_s": load_s}
        settings = dict(METHODS[method])
        if method in BUDGETED and args.activation_memory_gb is not None:  # another budget for the budgeted rows
            settings["activation_memory_gb"] = (
                None if args.activation_memory_gb == "none" else float(args.activation_memory_gb)
            )
        cfg = EggConfig() if method != "vanilla" else None
        execution = ExecutionConfig(**settings)
        undo = (lambda: UNDONE_CM[method](backbone)) if method in UNDONE else contextlib.nullcontext
        if method == "egg_fp32" and backbone.dtype == torch.float32:
            print(f"{method}: skipped, the model is float32 already (--dtype)", file=sys.stderr, flush=True)
            return None

        def run(r):
            return (
                run_vanilla(backbone, r["image"], text(r))
                if cfg is None
                else run_egg(backbone, r["image"], text(r), cfg, execution=execution)
            )

        paired = cfg is not None and args.paired
        if args.flops_only:  # no timing: the FLOPs and passes of the first --flops samples
            traces = []
            with undo():
                counted = count_flops(lambda: traces.extend(run(r)[1] for r in samples[: args.flops]))
            return {
                "flops": {k: v / len(traces) for k, v in counted.items()},
                **counter_means([t.counters for t in traces]),
                "rounds": statistics.mean(len(t.rounds) for t in traces),
            }

        base_mem = memory()  # CPU: the peak RSS so far, i.e. the loaded model (a process per method)
        with undo():
            run(warm)
        if cuda:  # the peak from here on is this method's; what is allocated now is the model
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base_mem = memory()
        times, counters, fallbacks = [float("inf")] * len(samples), [], 0
        answer_s = [0.0] * len(samples)  # of each sample's fastest run: the answer pass (the rest is grounding)
        plain = [float("inf")] * len(samples)  # --paired: the plain model, timed right before each run
        for rep in range(args.repeats):
            for i, r in enumerate(samples):
                if paired:
                    plain[i] = min(plain[i], timed(lambda: run_vanilla(backbone, r["image"], text(r)))[0])  # noqa: B023
                with undo():  # entered and left outside the timing (a dtype cast, a switch of kernels)
                    t, (_, trace) = timed(lambda: run(r))  # noqa: B023
                if t < times[i]:
                    times[i], answer_s[i] = t, trace.counters.time_answer_s
                if rep == 0:
                    counters.append(trace.counters)
                fallbacks += trace.counters.memory_fallbacks
        peak, peak_reserved = memory(), reserved()  # before the profile and the FLOP count
        phases = None
        if args.profile:  # after the timings, which it would slow; a profiler that fails costs only this
            try:
                with undo():
                    phases = profile_phases(lambda: [run(r) for r in samples[: args.profile]], cuda)
            except Exception as e:  # e.g. no CUPTI on a GPU host
                print(f"{method}: profile failed: {e!r}", file=sys.stderr, flush=True)
        flops = None
        if args.flops:  # FLOPs per sample by phase (hardware-independent; after the timings, which it would slow)
            with undo():
                counted = count_flops(lambda: [run(r) for r in samples[: args.flops]])
            flops = {k: v / min(args.flops, len(samples)) for k, v in counted.items()}
        return {
            **({"phases": phases} if phases else {}),
            **({"flops": flops} if flops else {}),
            "median_s": statistics.median(times),
            "times_s": times,  # per sample (the fastest of --repeats), for spreads and later analysis
            **({"paired_vanilla_s": statistics.median(plain), "paired_times_s": plain} if paired else {}),
            "median_answer_s": statistics.median(answer_s),
            "median_rest_s": statistics.median(t - a for t, a in zip(times, answer_s)),
            **counter_means(counters),
            "memory_fallbacks": fallbacks,
            "peak_mb": peak / 2**20,
            "extra_mb": (peak - base_mem) / 2**20,
            **peak_reserved,
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "device": str(backbone.device),
            "dtype": str(backbone.dtype),
            "sdpa_cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "load_s": load_s,
        }

    for method in args.child.split(","):
        result = measure(method)
        if result is not None:
            print(json.dumps({method: result}), flush=True)


def phase_table(profiled: dict, n: int, cuda: bool) -> str:
    """Markdown: per method and phase, calls / host ms / device ms per sample."""
    from egg_eval.phases import PHASES

    cols = [p for p in PHASES if any(p in ph for ph in profiled.values())] + ["all"]
    unit = "host ms / kernel ms" if cuda else "host ms"
    lines = [
        f"\nby phase ({n} samples per method under torch.profiler; per sample: calls, {unit}; phases nest, "
        "'all' is the whole sample: its wall time"
        + (", the kernel time of everything, device busy %" if cuda else "")
        + ", and its aten ops):",
        "| method | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for m, ph in profiled.items():
        cells = []
        for c in cols:
            e = ph.get(c)
            if e is None:
                cells.append("-")
                continue
            t = f"{e['host_s'] * 1000 / n:.1f}" + (f" / {e['device_s'] * 1000 / n:.1f}" if cuda else "")
            if c == "all" and cuda and e["host_s"] > 0:
                t += f" ({100 * e['device_s'] / e['host_s']:.0f}%)"
            cells.append(f"{e['calls'] / n:.0f}x {t}" if c != "all" else f"{t}, {e['calls'] / n:.0f} ops")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def flops_table(counted: dict, n: int) -> str:
    """Markdown: per method, GFLOPs per sample by phase, all, and all against the plain model's."""
    from egg_eval.phases import PHASES

    cols = [p for p in [*PHASES, "other"] if any(p in c for c in counted.values())]
    van = counted.get("vanilla", {}).get("all")
    lines = [
        f"\nGFLOPs per sample ({n} samples per method; matmuls, convolutions and attention, forward and "
        "backward, by the innermost phase; 'other': the projector of grounded views, outside the tower):",
        "| method | " + " | ".join(cols) + " | all | x vanilla |",
        "|---|" + "---|" * (len(cols) + 2),
    ]
    for m, c in counted.items():
        cells = [f"{c[p] / 1e9:.3g}" if p in c else "-" for p in cols]
        ratio = f"{c['all'] / van:.2f}" if van else "-"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {c['all'] / 1e9:.3g} | {ratio} |")
    return "\n".join(lines)


def ratio_spread(result: dict) -> tuple[float, float, float] | None:
    """First quartile, median and third quartile of a paired method's per-sample time ratios
    (its run over the plain model's on the same sample); None under 2 samples."""
    ratios = [t / p for t, p in zip(result["times_s"], result["paired_times_s"]) if p > 0]
    if len(ratios) < 2:
        return None
    q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, q2, q3


def header(args) -> str:
    """The run's settings, the first line of its output."""
    return (
        f"backbone={args.backbone} family={args.family} n={args.n} image={args.image_size or 320}px "
        f"repeats={args.repeats} device={args.device} dtype={args.dtype} layers={args.layers or 'all'}"
        + (" vision-windows=stock" if args.stock_windows else "")
        + (" sdpa=cudnn-allowed" if getattr(args, "sdpa_cudnn", False) else "")
        + (" deterministic" if getattr(args, "deterministic", False) else "")
        + (f" max-tiles={args.max_tiles}" if args.max_tiles is not None else "")
        + (f" max-pixels={args.max_pixels}" if args.max_pixels is not None else "")
        + (f" alloc-conf={args.alloc_conf}" if getattr(args, "alloc_conf", None) is not None else "")
    )


def flops_only_report(args, results: dict) -> str:
    """--flops-only: passes and GFLOPs per sample; with ``--backbone real --layers l``, also
    scaled to the family's full depth: the grounding passes' and the answer's FLOPs are the
    decoder's (plus a one-token lm_head), so they scale by depth / l; the tower's and the
    projector's do not."""
    depth = DEPTH.get(args.family) if args.backbone == "real" and args.layers else None
    lines = [
        f"{header(args)}: FLOPs of {args.flops} samples\n",
        "| method | rounds | forward | backward | views grounded | tower calls | GFLOPs | x vanilla"
        + (f" | GFLOPs at {depth} layers | x vanilla at {depth} layers" if depth else "")
        + " |",
        "|---|" + "---|" * (9 if depth else 7),
    ]

    def full(c: dict) -> float:
        decoder = sum(c.get(p, 0) for p in ("forward", "backward", "answer"))
        return c["all"] + decoder * (depth / args.layers - 1)

    van = results.get("vanilla", {}).get("flops")
    for m, r in results.items():
        c = r["flops"]
        cells = [f"{r['rounds']:.1f}"] + [f"{r[k]:.1f}" for k in PASSES] + [f"{c['all'] / 1e9:.1f}"]
        cells.append(f"{c['all'] / van['all']:.2f}" if van else "-")
        if depth:
            cells += [f"{full(c) / 1e9:.0f}", f"{full(c) / full(van):.2f}" if van else "-"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append(flops_table({m: r["flops"] for m, r in results.items()}, args.flops))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="toy", help="toy | tiny | real | a hub id or local path")
    ap.add_argument("--family", default="llava15")
    ap.add_argument("--layers", type=int, default=None, help="real: decoder layers (default: all of the family's)")
    ap.add_argument("--n", type=int, default=40, help="samples (held-out detail scenes)")
    ap.add_argument("--image-size", type=int, default=None, help="resize the 320 px scenes to this side")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="time each sample this many times, keep the fastest")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument(
        "--paired",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the plain model right before each EGG run, on the same sample in the same process, and "
        "take each method's 'x vanilla' from those (immune to the machine's drift between methods)",
    )
    ap.add_argument(
        "--activation-memory-gb",
        default=None,
        help="egg, egg_no_lean, egg_recompute_layers: this activation budget (GiB, or none) instead of auto",
    )
    ap.add_argument(
        "--processes",
        choices=("auto", "one", "each"),
        default="auto",
        help="each: a process per method (CPU peak RSS cannot be reset); one: load the model once for all "
        "methods (GPU peaks are reset per method); auto: one on cuda, each elsewhere",
    )
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also run N samples per method under torch.profiler and print their time by EGG's phases",
    )
    ap.add_argument(
        "--flops",
        type=int,
        default=0,
        metavar="N",
        help="also count the FLOPs of N samples per method, by phase (matmuls, convolutions, attention)",
    )
    ap.add_argument(
        "--flops-only",
        action="store_true",
        help="count FLOPs (of --flops N samples, default --n) and passes only, no timing: for real widths on a CPU",
    )
    ap.add_argument(
        "--stock-windows",
        action="store_true",
        help="qwen25vl: the stock SDPA vision attention, one call per window (default: one per window length)",
    )
    ap.add_argument(
        "--sdpa-cudnn",
        action="store_true",
        help="let SDPA use cuDNN attention (PyTorch's own choice on Hopper; backbone.sdpa_cudnn=true); "
        "default: flash / memory-efficient, as the library runs",
    )
    ap.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic=true: deterministic kernels, the grounding backward in PyTorch's strict mode",
    )
    ap.add_argument(
        "--alloc-conf",
        default=None,
        metavar="SETTINGS",
        help="PYTORCH_CUDA_ALLOC_CONF for the measuring process (e.g. expandable_segments:True); default: as the "
        "environment has it",
    )
    ap.add_argument("--max-tiles", type=int, default=None, help="internvl35: backbone.max_tiles (tiles per view)")
    ap.add_argument("--max-pixels", type=int, default=None, help="qwen25vl: backbone.max_pixels (area per view)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    for flag, family in (("max_tiles", "internvl35"), ("max_pixels", "qwen25vl")):
        if getattr(args, flag) is not None and args.family != family:
            ap.error(f"--{flag.replace('_', '-')} applies to --family {family} only")
    if args.flops_only:
        args.flops = args.flops or args.n
    if args.child:
        child(args)
        return
    base = [sys.executable, __file__] + [a for a in sys.argv[1:]]
    methods = [*args.methods.split(","), *([] if args.flops_only else ["passes"])]
    one = args.processes == "one" or (args.processes == "auto" and args.device.startswith("cuda"))
    results = {}
    for group in [methods] if one else [[m] for m in methods]:
        t0 = time.perf_counter()
        env = os.environ if args.alloc_conf is None else {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": args.alloc_conf}
        proc = subprocess.Popen([*base, "--child", ",".join(group)], stdout=subprocess.PIPE, text=True, env=env)
        for line in proc.stdout:  # one JSON line per method as it is measured
            if line.startswith("{"):
                (m, r), *_ = json.loads(line).items()
                results[m] = r
                # progress on stderr, so that a run cut short still shows what it had measured
                print(f"{m}: {r} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        if proc.wait():
            raise SystemExit(f"{','.join(group)} failed (its error is above)")
    van = results.get("vanilla")
    if args.flops_only:
        print(flops_only_report(args, results))
        print(json.dumps(results))
        return
    print(header(args) + "\n")
    print(
        "| method | median s/sample | x vanilla | answer s | rest s | forward/sample | backward/sample "
        "| views grounded/sample | tower/sample "
        "| limited/sample | lean/sample | recomputed layers/sample | prefix tokens/sample "
        "| peak MB | x vanilla | above model MB |"
    )
    print("|---|" + "---|" * 15)
    for m, r in results.items():
        if m == "passes":
            continue
        base = r.get("paired_vanilla_s") or (van["median_s"] if van else None)
        tx = f"{r['median_s'] / base:.2f}" if base else "-"
        mx = f"{r['peak_mb'] / van['peak_mb']:.2f}" if van and van["peak_mb"] > 0 else "-"
        cells = [
            f"{r['median_s']:.4f}",
            tx,
            f"{r['median_answer_s']:.4f}",
            f"{r['median_rest_s']:.4f}",
            f"{r['forward']:.1f}",
            f"{r['backward']:.1f}",
            f"{r.get('grounded', 0):.1f}",
            f"{r['tower']:.1f}",
            f"{r['memory_limited']:.1f}",
            f"{r.get('lean_passes', 0):.1f}",
            f"{r.get('recomputed_layers', 0):.1f}",
            f"{r.get('prefix_tokens', 0):.0f}",
            f"{r['peak_mb']:.0f}",
            mx,
            f"{r['extra_mb']:.0f}",
        ]
        print(f"| {m} | " + " | ".join(cells) + " |")
    held = {m: r["reserved_peak_mb"] for m, r in results.items() if "reserved_peak_mb" in r}
    if held:
        v = held.get("vanilla")
        print(
            "\nreserved by the caching allocator at its peak (MB; allocated plus cached blocks, what the device "
            "shows as taken): "
            + ", ".join(
                f"{m} {mb:.0f}" + (f" ({mb / v:.2f}x vanilla)" if v and m != "vanilla" else "")
                for m, mb in held.items()
            )
        )
    undone = [m for m in results if m in UNDONE]
    if undone:
        print(
            "\neach a speed-up undone from the fastest configuration (compare with egg_reused_prefix): "
            + "; ".join(f"{m}: {UNDONE[m]}" for m in undone)
        )
    if args.paired:
        print(
            "\nx vanilla: against the plain model timed right before each run, on the same sample and in the same "
            "process (its median per method: "
            + ", ".join(f"{m} {r['paired_vanilla_s']:.4f} s" for m, r in results.items() if "paired_vanilla_s" in r)
            + "); the vanilla row is its own run"
        )
        spread = {m: ratio_spread(r) for m, r in results.items() if "paired_times_s" in r}
        if any(v is not None for v in spread.values()):
            print(
                "per sample, EGG / its paired plain run: "
                + "; ".join(f"{m} median {v[1]:.2f}x, quartiles {v[0]:.2f}-{v[2]:.2f}x" for m, v in spread.items() if v)
                + " (a ratio of medians above and a median of ratios here differ where samples differ)"
            )
    for m, r in results.items():
        if r.get("memory_fallbacks"):
            print(
                f"\nNOTE {m}: {r['memory_fallbacks']} grounding passes ran out of memory and were redone with less "
                "(views one by one, then layers recomputed): its time and memory are those of the fallback"
            )
    profiled = {m: r["phases"] for m, r in results.items() if r.get("phases")}
    if profiled:
        print(phase_table(profiled, args.profile, args.device.startswith("cuda")))
    counted = {m: r["flops"] for m, r in results.items() if r.get("flops")}
    if counted:
        print(flops_table(counted, args.flops))
    p = results["passes"]
    print(
        f"\none view: plain forward {p['forward_s'] * 1000:.1f} ms, grounding pass (forward + backward to the "
        f"visual tokens) {p['grounding_s'] * 1000:.1f} ms = {p['grounding_s'] / p['forward_s']:.2f}x"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
