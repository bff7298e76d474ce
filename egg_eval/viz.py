"""Pictures of what EGG did: saliency overlays with the chosen boxes, per round, and an HTML gallery.

``sample_figure(image, trace)`` draws one PNG-able image per sample: for each round a
panel of the whole image with the whole view's saliency as a heat overlay, every crop
view's map painted inside its box, the views of the round outlined thin and the selected
regions thick (best first: red, orange, ...), plus a last row with the final crops as
the model sees them. Only PIL and numpy.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from egg_eval.files import safe_name, write_atomic
from egg_eval.records import RECORDS, read_records
from egg_eval.types import Trace

SELECTED = [(230, 30, 30), (255, 140, 0), (200, 0, 200), (0, 160, 255)]
EVIDENCE = (0, 200, 0)


def heat_colours(v: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8, black-red-yellow-white ("hot")."""
    v = np.clip(v, 0.0, 1.0)
    r = np.clip(3 * v, 0, 1)
    g = np.clip(3 * v - 1, 0, 1)
    b = np.clip(3 * v - 2, 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def paint_map(size: tuple[int, int], values: np.ndarray, cell_boxes: np.ndarray) -> np.ndarray:
    """A (H, W) float canvas of ``size`` (w, h) with each cell's value over its box (max where cells overlap)."""
    w, h = size
    canvas = np.zeros((h, w), dtype=np.float64)
    vals = np.asarray(values, dtype=np.float64).ravel()
    boxes = np.asarray(cell_boxes, dtype=np.float64).reshape(-1, 4)
    for v, (x0, y0, x1, y1) in zip(vals, boxes):
        if not np.isfinite(v) or not np.isfinite([x0, y0, x1, y1]).all():
            continue
        xa, ya = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
        xb, yb = min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1)))
        if xb > xa and yb > ya:
            canvas[ya:yb, xa:xb] = np.maximum(canvas[ya:yb, xa:xb], v)
    return canvas


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """``image`` blended with ``heat`` (H, W), normalised to its own max."""
    peak = float(np.nanmax(heat)) if heat.size and np.isfinite(heat).any() else 0.0
    norm = np.nan_to_num(heat / peak) if peak > 0 else np.zeros_like(heat)
    coloured = Image.fromarray(heat_colours(norm))
    mask = Image.fromarray((np.clip(norm, 0, 1) * alpha * 255).astype(np.uint8))
    out = image.convert("RGB").copy()
    out.paste(coloured, (0, 0), mask)
    return out


def _round_panel(image: Image.Image, rnd, evidence, scale: tuple[float, float] = (1.0, 1.0)) -> Image.Image:
    """A round drawn on ``image``, which is the sample's image resized by ``scale`` (x, y):
    every box, cell and view is in original-image pixels and is scaled here."""
    w, h = image.size
    box_scale = np.array([scale[0], scale[1]] * 2)
    heat = np.zeros((h, w))
    for view, (values, cells) in zip(rnd.views, rnd.maps):
        vw, vh = round(view.width * scale[0]), round(view.height * scale[1])
        if vw < 1 or vh < 1:
            continue
        local = paint_map((vw, vh), values, np.asarray(cells, dtype=np.float64).reshape(-1, 4) * box_scale)
        peak = local.max()
        if peak > 0:
            local = local / peak
        x0, y0 = round(view.x0 * scale[0]), round(view.y0 * scale[1])
        region = heat[y0 : y0 + vh, x0 : x0 + vw]
        heat[y0 : y0 + vh, x0 : x0 + vw] = np.maximum(region, local[: region.shape[0], : region.shape[1]])
    panel = overlay(image, heat)
    draw = ImageDraw.Draw(panel)
    lw = max(1, round(max(w, h) / 200))

    def scaled(box) -> list[float]:
        return (np.asarray(box, dtype=np.float64) * box_scale).tolist()

    for box in evidence or []:
        draw.rectangle(scaled(box), outline=EVIDENCE, width=lw)
    for view in rnd.views[1:]:
        draw.rectangle(scaled(view.as_list()), outline=(255, 255, 255), width=lw)
    for k, region in enumerate(rnd.selected):
        draw.rectangle(scaled(region.box.as_list()), outline=SELECTED[k % len(SELECTED)], width=2 * lw)
    return panel


def sample_figure(image: Image.Image, trace: Trace, evidence=None, panel: int = 320) -> Image.Image:
    """One picture per sample: a panel per round, then the final crops (see module doc). The
    panels are drawn at their own size (the longer side ``panel`` px), never at the image's,
    so a large image costs no more than a small one."""
    scale = panel / max(image.size)
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    small = image.convert("RGB").resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    xy = (size[0] / image.size[0], size[1] / image.size[1])
    panels = [_round_panel(small, r, evidence, xy) for r in trace.rounds if r.maps] or [small]
    crops = []
    for v in trace.final_views[1:]:
        c = image.crop(tuple(int(x) for x in v.as_list()))
        s = (panel // 2) / max(c.size)
        crops.append(c.resize((max(1, round(c.size[0] * s)), max(1, round(c.size[1] * s)))))
    width = max(len(panels) * size[0], sum(c.size[0] for c in crops) + 4 * len(crops))
    height = size[1] + (panel // 2 + 4 if crops else 0)
    fig = Image.new("RGB", (width, height), (255, 255, 255))
    for i, p in enumerate(panels):
        fig.paste(p, (i * size[0], 0))
    x = 0
    for c in crops:
        fig.paste(c, (x, size[1] + 4))
        x += c.size[0] + 4
    return fig


def write_gallery(out_dir: str | Path, records_path: str | Path | None = None, title: str = "egg_eval run") -> Path:
    """``out_dir/gallery.html``: every ``pictures/*.png`` of a run beside its record."""
    out = Path(out_dir)
    rp = Path(records_path) if records_path else out / RECORDS
    records = {safe_name(r.get("id")): r for r in read_records(rp)}  # the pictures' names are safe_name's
    rows = []
    for png in sorted((out / "pictures").glob("*.png")):
        r = records.get(png.stem, {})
        keys = ("question", "prediction", "answers", "metrics", "localisation", "stop_reason", "error")
        meta = {k: r.get(k) for k in keys if k in r}
        cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in meta.items())
        rows.append(
            f'<div class="s"><h3>{html.escape(png.stem)}</h3><img src="pictures/{html.escape(png.name)}">'
            f"<table>{cells}</table></div>"
        )
    page = (
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif} .s{margin:1em 0;border-bottom:1px solid #ccc}"
        " img{max-width:100%} th{text-align:left;padding-right:1em}</style>"
        f"<h1>{html.escape(title)}</h1><p>Heat: saliency of each view (its own max = white). Thin white: views "
        "of the round. Thick red / orange: the selected regions, best first. Green: ground-truth evidence.</p>"
        + "".join(rows)
    )
    return write_atomic(out / "gallery.html", page)
