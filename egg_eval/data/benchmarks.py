"""Benchmarks as data: where to stream them from, which columns mean what, and how to score.
Rows are streamed (``datasets``, ``streaming=True``); each image is decoded when its sample
runs (:meth:`Sample.load`), so a corrupt image becomes a per-sample error instead of stopping
the stream.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from egg_eval.data.annotations import RepoFiles, annotate
from egg_eval.data.images import decode_oriented, orient_box
from egg_eval.data.local import no_decode, open_stream
from egg_eval.errors import MissingColumn

log = logging.getLogger("egg_eval")


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark. ``columns`` maps our names (id, image, question, answers, options,
    bbox, category) to the dataset's; ``metric`` is one of vqa_accuracy, anls,
    multiple_choice, pope, exact_match; ``splits`` lists sub-splits scored separately and
    averaged (POPE's adversarial / popular / random)."""

    name: str
    hf_id: str
    split: str
    metric: str
    kind: str = "open"
    config_name: str | None = None
    revision: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    splits: tuple[str, ...] = ()
    images_id: str | None = None  # GQA: questions and images are two configs joined on imageId
    images_config: str | None = None
    images_split: str | None = None
    submission: str | None = None  # evalai | rrc | gqa
    protocol: str = "generate"  # or "likelihood": the answer is the option with the lowest loss
    bbox_format: str = "xyxy"  # or "xywh"
    # ground-truth boxes kept in a separate dataset, joined by sample id (TextVQA:
    # jrzhang/TextVQA_GT_bbox, key dataset_id = question_id, bbox [x, y, w, h])
    boxes_id: str | None = None
    boxes_split: str = "train"
    boxes_key: str = "dataset_id"
    boxes_column: str = "bbox"
    boxes_format: str = "xywh"
    # the pixel frame the side dataset's boxes were drawn in: "upright" (as the model sees the
    # image) or "stored" (the image file's pixels before its EXIF orientation; turned with it)
    boxes_frame: str = "upright"
    boxes_path: str | None = None
    # per-row annotation files beside the images (V*: ".json"; egg_eval.data.annotations)
    annotations: str | None = None
    max_pixels: int | None = None  # decompression-bomb limit; None = PIL's Image.MAX_IMAGE_PIXELS


@dataclass
class Sample:
    id: str
    question: str
    image: Image.Image | None
    answers: list[str]
    options: list[str] | None = None
    bbox: list[list[float]] | None = None  # ground-truth evidence boxes, [x0, y0, x1, y1] px
    subset: str | None = None
    error: str | None = None
    # the pixel frame of ``bbox``: "upright" (the image as the model sees it, EXIF orientation
    # applied) or "stored" (the image's pixels as stored, before it); "stored" boxes are turned
    # upright with the image when it is decoded
    bbox_frame: str = "upright"
    orientation: int | None = None  # the EXIF orientation the decoded image was turned by (1: none)
    # the image column's value before decoding, and decode_image's other arguments: a sample
    # the run skips (already in records.jsonl, another shard's) is never decoded (:meth:`load`)
    raw: Any = field(default=None, repr=False, compare=False)
    decode_args: tuple[int | None, Path | None] = field(default=(None, None), repr=False, compare=False)

    def load(self) -> Sample:
        """Decode the image (once); a failure becomes the sample's ``error``, as any bad input."""
        if self.image is None and self.error is None and self.raw is not None:
            try:
                self.image, self.orientation, stored = decode_oriented(self.raw, *self.decode_args)
            except Exception as e:  # recorded per sample; the stream goes on
                self.error = f"{type(e).__name__}: {e}"
            else:
                if self.bbox and self.bbox_frame == "stored" and self.orientation != 1:
                    self.bbox = [orient_box(b, self.orientation, stored) for b in self.bbox]
                    self.bbox_frame = "upright"
            self.raw = None
        return self


def _col(row: dict, spec: BenchmarkSpec, key: str, required: bool = True):
    name = spec.columns.get(key, key)
    if name not in row:
        if required:
            raise MissingColumn(f"{spec.name}: column {name!r} (for {key}) missing; the rows have {sorted(row)}")
        return None
    return row[name]


def _as_list(v) -> list[str]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [str(x) for x in v]
    return [str(v)]


def iter_samples(
    spec: BenchmarkSpec,
    *,
    split: str | None = None,
    path: str | None = None,
    limit: int | None = None,
    decode: bool = True,
) -> Iterator[Sample]:
    """Stream ``Sample``s; POPE-style specs chain their sub-splits, each sample tagged with it.
    ``decode=False`` leaves each image to :meth:`Sample.load` (the runner loads only the
    samples it runs)."""
    split = split or spec.split
    subsets = spec.splits or (None,)
    answers = spec.columns.get("answers", "answers")
    base = None if path is None else (Path(path) if Path(path).is_dir() else Path(path).parent)  # for relative paths
    files = RepoFiles(spec.hf_id, spec.revision, base) if spec.annotations else None
    for subset in subsets:
        ds = no_decode(
            open_stream(spec.hf_id, spec.config_name, subset or split, spec.revision, path),
            spec.columns.get("image", "image"),
        )
        images = _gqa_images(spec, split, path) if spec.images_id or spec.images_split else None
        boxes = gt_boxes(spec) if spec.boxes_id or spec.boxes_path else None
        for count, row in enumerate(ds, start=1):
            if limit is not None and count > limit:
                break
            if count == 1 and answers not in row:  # a test split's withheld answers, or a misnamed column
                log.warning(
                    "%s: no column %r (dataset.columns.answers) in the rows %s: predictions only, nothing scored",
                    spec.name,
                    answers,
                    sorted(row),
                )
            if spec.columns.get("id") == "__index__":
                row = {**row, "__index__": count - 1}
            sample = _to_sample(row, spec, subset, images, base)
            if files is not None and sample.error is None:
                annotate(sample, files, spec)
            if boxes is not None and sample.bbox is None and sample.id in boxes:
                sample.bbox, sample.bbox_frame = boxes[sample.id], spec.boxes_frame
            yield sample.load() if decode else sample


def gt_boxes(spec: BenchmarkSpec) -> dict[str, list[list[float]]]:
    """The side dataset of evidence boxes as {sample id: [[x0, y0, x1, y1], ...]}.

    A value of four numbers is one box; a list of such is several. Rows whose key or box
    is missing are skipped (those samples simply get no IoU). Only the key and box columns
    are read: the side dataset's images (jrzhang/TextVQA_GT_bbox has them) are never decoded."""
    columns = [spec.boxes_key, spec.boxes_column]
    ds = open_stream(spec.boxes_id or "", None, spec.boxes_split, None, spec.boxes_path, columns=columns)
    out: dict[str, list[list[float]]] = {}
    for row in ds:
        key, value = row.get(spec.boxes_key), row.get(spec.boxes_column)
        if key is None or not value:
            continue
        many = value if isinstance(value[0], (list, tuple)) else [value]
        try:
            boxes = [_xyxy(b, spec.boxes_format) for b in many if b is not None and len(b) == 4]
        except (TypeError, ValueError):
            continue
        if boxes:
            out.setdefault(str(key), []).extend(boxes)
    return out


def _gqa_images(spec: BenchmarkSpec, split: str, path: str | None) -> dict[str, Any]:
    images_split = spec.images_split or split
    ds = open_stream(spec.images_id or spec.hf_id, spec.images_config, images_split, spec.revision, path)
    ds = no_decode(ds, "image")
    return {str(r["id"]): r["image"] for r in ds}


def _xyxy(b, fmt: str) -> list[float]:
    x0, y0, a, b_ = (float(v) for v in b)
    return [x0, y0, x0 + a, y0 + b_] if fmt == "xywh" else [x0, y0, a, b_]


def _to_sample(
    row: dict, spec: BenchmarkSpec, subset: str | None, images: dict | None, base: Path | None = None
) -> Sample:
    sid = str(_col(row, spec, "id"))
    question = _col(row, spec, "question")
    answers = _as_list(_col(row, spec, "answers", required=False))
    options = _col(row, spec, "options", required=False)
    bbox = _col(row, spec, "bbox", required=False)
    sample = Sample(
        id=sid if subset is None else f"{subset}/{sid}",
        question=str(question or ""),
        image=None,
        answers=answers,
        options=list(options) if options else None,
        bbox=[_xyxy(b, spec.bbox_format) for b in bbox] if bbox else None,
        subset=subset,
    )
    if not sample.question.strip():
        sample.error = "ValueError: empty question"
    elif images is not None:  # GQA: an image id the images split lacks fails its sample
        image_id = str(_col(row, spec, "image_id"))
        if image_id in images:
            sample.raw = images[image_id]
        else:
            sample.error = f"KeyError: image {image_id!r} is not in the images split"
    else:  # a missing image column stops the run (as any missing column), a missing value fails its sample
        sample.raw = _col(row, spec, "image")
        if sample.raw is None:
            sample.error = "ValueError: no image in this row"
    sample.decode_args = (spec.max_pixels, base)
    return sample
