"""Benchmarks as data: where to stream them from, which columns mean what, how to prompt
and how to score. Rows are streamed (``datasets``, ``streaming=True``); images are
decoded here, one at a time, so a corrupt image becomes a per-sample error instead of
stopping the stream.
"""

from __future__ import annotations

import glob
import io
import logging
import re
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

OPEN_SUFFIX = "Answer the question using a single word or phrase."
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
KINDS = ("open", "mc", "pope")
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
    bbox_format: str = "xyxy"  # or "xywh"
    # ground-truth boxes kept in a separate dataset, joined by sample id (TextVQA:
    # jrzhang/TextVQA_GT_bbox, key dataset_id = question_id, bbox [x, y, w, h])
    boxes_id: str | None = None
    boxes_split: str = "train"
    boxes_key: str = "dataset_id"
    boxes_column: str = "bbox"
    boxes_format: str = "xywh"
    boxes_path: str | None = None
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
    # the image column's value before decoding, and decode_image's other arguments: a sample
    # the run skips (already in records.jsonl, another shard's) is never decoded (:meth:`load`)
    raw: Any = field(default=None, repr=False, compare=False)
    decode_args: tuple[int | None, Path | None] = field(default=(None, None), repr=False, compare=False)

    def load(self) -> Sample:
        """Decode the image (once); a failure becomes the sample's ``error``, as any bad input."""
        if self.image is None and self.error is None and self.raw is not None:
            try:
                self.image = decode_image(self.raw, *self.decode_args)
            except Exception as e:  # recorded per sample; the stream goes on
                self.error = f"{type(e).__name__}: {e}"
            self.raw = None
        return self


# decode_image raises PIL's global decompression-bomb limit while it opens an image that
# dataset.max_pixels allows above it: one thread at a time (the runner decodes ahead in one)
_PIL_LIMIT = threading.Lock()


def _open_image(value: Any, max_pixels: int | None, base: Path | None) -> tuple[Image.Image, int | None]:
    """The image of ``value``, opened (its header read, not decoded), and the pixel limit."""
    limit = max_pixels or Image.MAX_IMAGE_PIXELS
    pil_limit = Image.MAX_IMAGE_PIXELS
    if max_pixels and pil_limit and max_pixels > pil_limit:  # a larger limit asked for: PIL must not refuse first
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(value, Image.Image):
                return value, limit
            if isinstance(value, dict) and value.get("bytes") is not None:
                return Image.open(io.BytesIO(value["bytes"])), limit
            if isinstance(value, dict) and value.get("path"):
                return Image.open(_resolve(value["path"], base)), limit
            if isinstance(value, str) and value.strip():
                return Image.open(_resolve(value.strip(), base)), limit
            if isinstance(value, (bytes, bytearray)):
                return Image.open(io.BytesIO(value)), limit
            raise ValueError(f"no image in value of type {type(value).__name__}")
    except Image.DecompressionBombError as e:
        raise ValueError(f"decompression-bomb guard: {e}") from None
    except UnidentifiedImageError:  # PIL's message names only a BytesIO object
        data = value.get("bytes") if isinstance(value, dict) else value
        raw = isinstance(data, (bytes, bytearray))
        what = f"{len(data)} bytes starting {bytes(data[:8])!r}" if raw else repr(value)
        raise ValueError(f"not an image PIL can read: {what}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit


def decode_image(value: Any, max_pixels: int | None = None, base: Path | None = None) -> Image.Image:
    """PIL image from a datasets Image value (decoded or ``{'bytes', 'path'}``) or a file path
    (a string column; a relative path is taken from ``base``, the local dataset's folder),
    RGB, EXIF-upright.

    Grayscale, palette, RGBA, CMYK and 16-bit images are converted to RGB (16-bit scaled
    to 8). An image above ``max_pixels`` (default: PIL's decompression-bomb limit,
    ``Image.MAX_IMAGE_PIXELS``) is refused from its header, before it is decoded."""
    with _PIL_LIMIT:  # opening reads only the header; decoding (below) runs unlocked
        img, limit = _open_image(value, max_pixels, base)
    w, h = img.size
    if limit and w * h > limit:
        raise ValueError(
            f"decompression-bomb guard: image is {w}x{h} = {w * h} pixels, above the limit of {limit} "
            "(raise dataset.max_pixels to allow it)"
        )
    img.load()  # raises here on truncated or corrupt data
    img = ImageOps.exif_transpose(img)
    if img.mode == "I;16" or img.mode == "I":
        img = img.point(lambda v: v / 256).convert("L")
    img = img.convert("RGB")
    if min(img.size) < 1:
        raise ValueError(f"empty image {img.size}")
    return img


# a dataset's own answering instruction at the end of its question text (RealWorldQA's:
# "Please answer directly with only the letter of the correct option and nothing else." and
# "Please answer directly with a single word or number."); the paper's prompt replaces it
_OWN_INSTRUCTION = re.compile(r"\s*Please answer directly\b[^\n]*$", re.IGNORECASE)


def option_letters(question: str) -> list[str]:
    """The option letters listed in a question's text: one option per line ("A. ...",
    "(B) ...", "C) ..."), else in a run ("... (A) red (B) blue")."""
    per_line = re.findall(r"(?m)^\s*\(?([A-J])[).]\s", question)
    if per_line:
        return per_line
    inline = re.findall(r"\(([A-J])\)\s", question)
    return inline if inline[:2] == ["A", "B"] else []


def is_free_form(sample: Sample) -> bool:
    """A multiple-choice benchmark's question without options (RealWorldQA has some): no
    options column and none listed in its text. For scoring, :func:`scored_as_text` also
    looks at the answer."""
    return not sample.options and not option_letters(sample.question)


def scored_as_text(sample: Sample) -> bool:
    """A free-form question (:func:`is_free_form`) whose answer is not a lone letter: scored by
    its text. A lone-letter answer keeps letter scoring (options in a layout not recognised)."""
    gold = sample.answers[0].strip().strip("()") if sample.answers else ""
    return is_free_form(sample) and not (len(gold) == 1 and gold.isalpha())


def prompt_for(sample: Sample, kind: str) -> str:
    """The paper's Appendix G prompts (the chat template is applied by the backbone): the
    question, for multiple choice its options, then the paper's instruction in place of the
    dataset's own. A multiple-choice benchmark's question without options gets the open-ended
    instruction."""
    q = _OWN_INSTRUCTION.sub("", sample.question.strip())
    if kind == "mc" and not is_free_form(sample):
        if sample.options and not re.search(r"\(A\)", q):
            q += "\n" + "\n".join(f"({chr(65 + i)}) {o}" for i, o in enumerate(sample.options))
        return f"{q}\n{MC_SUFFIX}" if MC_SUFFIX.lower() not in q.lower() else q
    return f"{q}\n{OPEN_SUFFIX}"


def _resolve(path: str, base: Path | None) -> Path:
    if re.match(r"^[a-z][a-z0-9+.-]*://", path, re.I):
        raise ValueError(f"image {path!r} is a URL: images are read from files or bytes, not fetched")
    p = Path(path).expanduser()
    return base / p if base is not None and not p.is_absolute() else p


def _split_dirs(root: Path, config: str | None) -> list[Path]:
    """Where a local copy of a hub dataset keeps a split's parquet files, most specific first:
    ``<config>/`` (``hf download <id> --repo-type dataset --local-dir <root>`` of a dataset with
    configs: lmms-lab's DocVQA/, Full/ of POPE, testdev_balanced_instructions/ of GQA), the
    folder itself, ``data/`` (a dataset without configs)."""
    return [d for d in ([root / config] if config else []) + [root, root / "data"] if d.is_dir()]


def split_files(root: Path, config: str | None, split: str) -> list[Path]:
    """The parquet files of ``split`` in the first of :func:`_split_dirs` that has any: named
    ``<split>.parquet`` or ``<split>-NNNNN-of-NNNNN.parquet`` as the hub names them (so that
    split ``test`` never takes ``testdev-*``), else, for other layouts, ``<split>_*.parquet``
    or ``<split>.*.parquet`` (never a longer split's name: ``test`` is not ``testdev``)."""
    for d in _split_dirs(root, config):
        files = sorted({*d.glob(f"{glob.escape(split)}.parquet"), *d.glob(f"{glob.escape(split)}-*.parquet")})
        if files:
            return files
    for d in _split_dirs(root, config):
        files = sorted({*d.glob(f"{glob.escape(split)}_*.parquet"), *d.glob(f"{glob.escape(split)}.*.parquet")})
        if files:
            return files
    return []


def _open_stream(source: str, config: str | None, split: str, revision: str | None, path: str | None):
    from datasets import Image as ImageFeature  # noqa: F401  (imported for side effects of features)
    from datasets import load_dataset, load_from_disk

    if path:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"dataset.path {path} does not exist")
        if p.is_dir() and (p / split).is_dir() and any((p / split).glob("*.arrow")):
            return load_from_disk(str(p / split)).to_iterable_dataset()
        if p.is_dir() and (p / "dataset_info.json").exists():
            return load_from_disk(str(p)).to_iterable_dataset()
        files = split_files(p, config, split) if p.is_dir() else [p]
        if not files:
            dirs = _split_dirs(p, config)
            there = sorted({re.sub(r"-\d+-of-\d+$", "", f.stem) for d in dirs for f in d.glob("*.parquet")})
            raise FileNotFoundError(
                f"no {split}.parquet or {split}-*.parquet in {', '.join(str(d) for d in dirs)}"
                + (
                    f"; the splits there: {', '.join(there)} (dataset.split=...)"
                    if there
                    else "; no parquet files there"
                )
            )
        return load_dataset("parquet", data_files=[str(f) for f in files], split="train", streaming=True)
    return load_dataset(source, config, split=split, revision=revision, streaming=True)


def _no_decode(ds, column: str):
    from datasets import Image as ImageFeature

    features = getattr(ds, "features", None)
    if features is not None and column in features and isinstance(features[column], ImageFeature):
        return ds.cast_column(column, ImageFeature(decode=False))
    return ds


def _col(row: dict, spec: BenchmarkSpec, key: str, required: bool = True):
    name = spec.columns.get(key, key)
    if name not in row:
        if required:
            raise KeyError(f"{spec.name}: column {name!r} (for {key}) missing; the rows have {sorted(row)}")
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
    for subset in subsets:
        ds = _no_decode(
            _open_stream(spec.hf_id, spec.config_name, subset or split, spec.revision, path),
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
            if boxes is not None and sample.bbox is None:
                sample.bbox = boxes.get(sample.id)
            yield sample.load() if decode else sample


def gt_boxes(spec: BenchmarkSpec) -> dict[str, list[list[float]]]:
    """The side dataset of evidence boxes as {sample id: [[x0, y0, x1, y1], ...]}.

    A value of four numbers is one box; a list of such is several. Rows whose key or box
    is missing are skipped (those samples simply get no IoU)."""
    ds = _open_stream(spec.boxes_id or "", None, spec.boxes_split, None, spec.boxes_path)
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
    ds = _open_stream(spec.images_id or spec.hf_id, spec.images_config, images_split, spec.revision, path)
    ds = _no_decode(ds, "image")
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
