"""The offline demo: the trained toy LLaVA on held-out "detail" scenes, plain vs EGG vs bounds.

Methods, all on the same samples and model:

- ``vanilla``: the whole image alone;
- ``egg_k1`` / ``egg_k2``: Alg. 1 with the paper's defaults (entropy, spatial-entropy
  stopping), keeping K = 1 or 2 regions per round; smoothing ``sigma`` 0.5 cells on the
  toy's 12x12 grid (chosen on validation scenes over 0.75, the paper's 1.5 cells on a
  24x24 grid at the same width in pixels; configs/backbone/toy.yaml);
- ``oracle``: whole image + a crop 1.5x each ground-truth evidence square (an upper bound
  on what cropping can give this model);
- ``random``: whole image + as many crops of the oracle's sizes at random places (what
  cropping gives without grounding).

Scores are exact match on the single answer token, split by question kind (``single``:
one evidence square; ``pair``: the larger of two). IoU is the top region's (the first crop
the answer saw) with the best-matching evidence box; 0 when no crop was made.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable
from pathlib import Path

from omegaconf import OmegaConf

from egg_eval import metrics as M
from egg_eval.backbones.base import Backbone
from egg_eval.cli import CONFIG_DIR
from egg_eval.data.prompts import OPEN_SUFFIX
from egg_eval.grounding.refine import EggConfig, answer_with_views, run_egg, run_vanilla
from egg_eval.grounding.regions import RegionParams
from egg_eval.types import Box

METHODS = ("vanilla", "egg_k1", "egg_k2", "oracle", "random")
# the toy's smoothing, read from its backbone config so that the demo and `python -m egg_eval` agree
TOY_SIGMA = float(OmegaConf.load(Path(CONFIG_DIR) / "backbone" / "toy.yaml").sigma)
HELD_OUT_SEED = 2000  # scene seeds 2000 * 1_000_003 + i lie above every training seed (< 2**30)


def _expand(box, factor: float, size) -> Box:
    x0, y0, x1, y1 = box
    cx, cy, s = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * factor / 2
    return Box(max(0, cx - s), max(0, cy - s), min(size[0], cx + s), min(size[1], cy + s)).to_int()


def _random_like(rng: random.Random, box: Box, size) -> Box:
    w, h = int(box.width), int(box.height)
    x0, y0 = rng.randint(0, size[0] - w), rng.randint(0, size[1] - h)
    return Box(x0, y0, x0 + w, y0 + h)


def run_method(backbone: Backbone, name: str, row: dict, rng: random.Random, sigma: float = TOY_SIGMA):
    """(prediction, trace or None, final views) of method ``name`` on one detail ``row``."""
    image, text = row["image"], f"{row['question']}\n{OPEN_SUFFIX}"
    whole = Box.of_image(*image.size)
    if name == "vanilla":
        pred, trace = run_vanilla(backbone, image, text)
        return pred, trace, trace.final_views
    if name.startswith("egg_k"):
        cfg = EggConfig(regions=RegionParams(top_k=int(name[5:]), sigma=sigma))
        pred, trace = run_egg(backbone, image, text, cfg)
        return pred, trace, trace.final_views
    oracle = [_expand(b, 1.5, image.size) for b in row["bbox"]]
    if name == "oracle":
        views = [whole, *oracle]
    elif name == "random":
        views = [whole] + [_random_like(rng, b, image.size) for b in oracle]
    else:
        raise ValueError(f"unknown method {name!r}; choose from {METHODS}")
    return answer_with_views(backbone, image, text, views), None, views


def evaluate(
    backbone: Backbone,
    rows: Iterable[dict],
    methods: Iterable[str] = METHODS,
    pictures_dir: str | Path | None = None,
    n_pictures: int = 0,
    picture_method: str = "egg_k2",
    seed: int = 0,
    sigma: float = TOY_SIGMA,
) -> dict:
    """Per method and question kind: accuracy, mean IoU / hit of the top region, seconds per sample."""
    from egg_eval.viz import sample_figure

    methods = list(methods)
    rows = list(rows)
    # per sample, boxes of whole token cells of the whole image: the best IoU any reaches, and
    # the IoU of the box around every cell the evidence touches / holding its centre
    grid_iou, touched_iou, centred_iou = [], [], []
    for row in rows:
        cells = backbone.token_layout(backbone.encode([row["image"]], row["question"]), 0, row["image"].size)
        g = cells.grid_boxes.reshape(-1, 4)
        xs, ys = [*g[:, 0], *g[:, 2]], [*g[:, 1], *g[:, 3]]
        grid_iou.append(max(M.best_grid_iou(xs, ys, b) for b in row["bbox"]))
        cover = [M.grid_cover_ious(xs, ys, b) for b in row["bbox"]]
        touched_iou.append(max(c["touched"] for c in cover))
        centred_iou.append(max(c["centred"] for c in cover))
    stats: dict = {m: {"right": [], "iou": [], "hit": [], "time": []} for m in methods}  # per row, in order
    for m in methods:
        rng = random.Random(seed)
        for i, row in enumerate(rows):
            t0 = time.perf_counter()
            pred, trace, views = run_method(backbone, m, row, rng, sigma)
            stats[m]["time"].append(time.perf_counter() - t0)
            stats[m]["right"].append(M.exact_match(pred, row["answers"][0]))
            loc = M.region_localisation(views[1].as_list(), row["bbox"]) if len(views) > 1 else {"iou": 0.0, "hit": 0.0}
            stats[m]["iou"].append(loc["iou"])
            stats[m]["hit"].append(loc["hit"])
            if pictures_dir and m == picture_method and i < n_pictures and trace is not None:
                out = Path(pictures_dir)
                out.mkdir(parents=True, exist_ok=True)
                sample_figure(row["image"], trace, evidence=row["bbox"]).save(out / f"{row['id']}.png")

    def mean(v):
        return round(sum(v) / len(v), 4) if v else None

    kinds = {k: [i for i, row in enumerate(rows) if row["kind"] == k] for k in ("single", "pair")}
    right = {m: {k: [s["right"][i] for i in idx] for k, idx in kinds.items()} for m, s in stats.items()}
    table = {}
    for m, s in stats.items():
        table[m] = {
            "single_acc": mean(right[m]["single"]),
            "pair_acc": mean(right[m]["pair"]),
            "acc": mean(s["right"]),
            "iou": mean(s["iou"]),
            "hit": mean(s["hit"]),
            "time_s": mean(s["time"]),
            "n_single": len(kinds["single"]),
            "n_pair": len(kinds["pair"]),
        }
    table["grid_bound"] = {"iou": mean(grid_iou), "touched": mean(touched_iou), "centred": mean(centred_iou)}
    if "egg_k1" in right and "egg_k2" in right:
        table["k2_vs_k1_pairs"] = paired_sign_test(right["egg_k1"]["pair"], right["egg_k2"]["pair"])
    return table


def paired_sign_test(a: list, b: list) -> dict:
    """Exact two-sided sign test (McNemar's exact test) of two methods on the same questions.

    Counts the questions only ``a`` answered right and only ``b`` answered right; under the
    null that neither is better, each discordant question is a fair coin."""
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return {"n": len(a), "only_first": only_a, "only_second": only_b, "p": p}


def markdown(table: dict) -> str:
    cols = ["single_acc", "pair_acc", "acc", "iou", "hit", "time_s"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m, r in table.items():
        if m in ("grid_bound", "k2_vs_k1_pairs"):
            continue
        cells = [
            "-" if r[c] is None else (f"{100 * r[c]:.1f}" if c != "time_s" and c != "iou" else f"{r[c]:.3f}")
            for c in cols
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if "grid_bound" in table:
        gb = table["grid_bound"]
        lines.append(
            f"\nIoU ceiling of a first-round region (best box of whole token cells, mean over these samples): "
            f"{gb['iou']:.3f}; the box of every cell the evidence touches: {gb['touched']:.3f}; "
            f"of the cells whose centre it holds: {gb['centred']:.3f}"
        )
    if "k2_vs_k1_pairs" in table:
        t = table["k2_vs_k1_pairs"]
        lines.append(
            f"K=2 vs K=1 on the {t['n']} two-region questions: only K=2 right {t['only_second']}, "
            f"only K=1 right {t['only_first']} (exact two-sided sign test p = {t['p']:.3g})"
        )
    return "\n".join(lines)
