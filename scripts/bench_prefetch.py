"""Time a run's samples with and without reading ahead (``prefetch``), on document pages.

    python scripts/bench_prefetch.py                       # the toy model, 48 pages of 1700x2200, CPU
    python scripts/bench_prefetch.py --n 200 --depths 0,2,4,8
    python scripts/bench_prefetch.py backbone=qwen25vl backbone.device=cuda   # any run's overrides after the options
    python scripts/bench_prefetch.py --real qwen25vl --device cuda --dtype bfloat16   # a published 7B, random weights

Writes ``--n`` DocVQA-schema rows (a ``--size`` PNG page, 1700x2200 by default, with scanner
noise and lines of dark boxes for text: about 3 MB, as DocVQA's pages are) to a temporary folder, then
runs ``python -m egg_eval dataset=docvqa dataset.path=<that folder>`` in this process, for each
method and each ``prefetch`` depth, in turn, ``--repeats`` times, each into a fresh folder. It
prints the wall time per sample of the runner's loop (stream, decode, model, records: the model
loaded once before) and the runner's own ``mean_time_s`` (the model's time, which excludes
reading and decoding). The answers mean nothing here: the pages hold no text. ``--real FAMILY``
times, instead of the configured backbone, that family's published configuration with random
weights (as ``scripts/bench.py --backbone real`` builds it; no download), for a GPU box.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def write_pages(out: Path, n: int, width: int = 1700, height: int = 2200, seed: int = 0) -> Path:
    import numpy as np
    from PIL import Image

    from egg_eval.data.toy import _write

    rng = np.random.default_rng(seed)
    pages = []
    for _ in range(n):
        a = (235 + rng.normal(0, 6, (height, width))).clip(0, 255).astype(np.uint8)
        for _ in range(600 * width * height // (1700 * 2200)):
            x, y = rng.integers(0, max(width - 200, 1)), rng.integers(0, max(height - 20, 1))
            a[y : y + 14, x : x + rng.integers(20, 200)] = rng.integers(0, 80)
        pages.append(Image.fromarray(a).convert("RGB"))
    rows = {
        "questionId": [str(7000 + i) for i in range(n)],
        "question": ["What is the date on the letter?"] * n,
        "image": pages,
        "docId": list(range(n)),
        "answers": [["1999"]] * n,
    }
    _write(rows, out / "validation.parquet")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=48, help="pages")
    ap.add_argument("--size", default="1700x2200", help="page width x height, px")
    ap.add_argument("--depths", default="0,4", help="prefetch depths to compare")
    ap.add_argument("--methods", default="vanilla,egg")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--real", default=None, metavar="FAMILY", help="a published 7B configuration, random weights")
    ap.add_argument("--device", default="cuda", help="--real: the device")
    ap.add_argument("--dtype", default="bfloat16", help="--real: the weights' dtype")
    ap.add_argument("--layers", type=int, default=None, help="--real: decoder layers (default: all)")
    args, overrides = ap.parse_known_args()

    from hydra import compose, initialize_config_dir

    from egg_eval.cli import CONFIG_DIR, build, method_of
    from egg_eval.data.benchmarks import iter_samples
    from egg_eval.data.specs import spec_from_config
    from egg_eval.runner import RunInfo, run

    tmp = Path(tempfile.mkdtemp(prefix="bench_prefetch_"))
    width, height = (int(v) for v in args.size.split("x"))
    data = write_pages(tmp / "pages", args.n, width, height)
    depths = [int(d) for d in args.depths.split(",")]
    mb = (data / "validation.parquet").stat().st_size / args.n / 1e6
    print(f"{args.n} pages of {width}x{height} PNG, {mb:.1f} MB each")
    print("| method | prefetch | loop s / sample (median of repeats) | model s / sample | all repeats |")
    print("|---|---|---|---|---|")
    real = None
    if args.real:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench import load

        real = load(
            argparse.Namespace(
                backbone="real", family=args.real, layers=args.layers, device=args.device, dtype=args.dtype
            )
        )
    for method in args.methods.split(","):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(
                "eval",
                overrides=[
                    f"output_root={tmp}",
                    "progress=false",
                    "pictures=0",
                    "dataset=docvqa",
                    f"dataset.path={data}",
                    f"method={method}",
                    *overrides,
                ],
            )
        if real is None:
            backbone, spec, _, chosen = build(cfg)  # the model loaded once per method
        else:
            backbone, spec, chosen = real, spec_from_config(cfg.dataset), method_of(cfg)
        method_fn = chosen.bind(backbone, spec.protocol)

        loops: dict[int, list[float]] = {d: [] for d in depths}
        model: dict[int, list[float]] = {d: [] for d in depths}
        for rep in range(args.repeats):
            for depth in depths:  # interleaved, so that the machine's drift falls on every depth alike
                samples = iter_samples(spec, split=spec.split, path=str(data), decode=False)
                info = RunInfo(
                    output_dir=tmp / "runs" / f"{method}-{depth}-{rep}",
                    spec=spec,
                    method=method,
                    backbone=backbone.name,
                    progress=False,
                    prefetch=depth,
                )
                t0 = time.perf_counter()
                summary = run(samples, method_fn, info)
                loops[depth].append((time.perf_counter() - t0) / summary["n_samples"])
                model[depth].append(summary["mean_time_s"])
        for depth in depths:
            print(
                f"| {method} | {depth} | {statistics.median(loops[depth]) * 1000:.1f} ms "
                f"| {statistics.median(model[depth]) * 1000:.1f} ms "
                f"| {', '.join(f'{x * 1000:.1f}' for x in loops[depth])} |",
                flush=True,
            )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
