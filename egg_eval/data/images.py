"""Images as the harness reads them: from datasets values, bytes or files, EXIF-upright RGB, with
a decompression-bomb guard, and the EXIF orientation that boxes in the stored pixel frame need."""

from __future__ import annotations

import io
import re
import threading
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

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
    return decode_oriented(value, max_pixels, base)[0]


def decode_oriented(
    value: Any, max_pixels: int | None = None, base: Path | None = None
) -> tuple[Image.Image, int, tuple[int, int]]:
    """:func:`decode_image`, with the EXIF orientation it applied (1: none) and the image's size
    as stored, before it was turned upright (what :func:`orient_box` needs)."""
    with _PIL_LIMIT:  # opening reads only the header; decoding (below) runs unlocked
        img, limit = _open_image(value, max_pixels, base)
    w, h = img.size
    if limit and w * h > limit:
        raise ValueError(
            f"decompression-bomb guard: image is {w}x{h} = {w * h} pixels, above the limit of {limit} "
            "(raise dataset.max_pixels to allow it)"
        )
    img.load()  # raises here on truncated or corrupt data
    orientation = int(img.getexif().get(ORIENTATION, 1) or 1)
    img = ImageOps.exif_transpose(img)
    if img.mode == "I;16" or img.mode == "I":
        img = img.point(lambda v: v / 256).convert("L")
    img = img.convert("RGB")
    if min(img.size) < 1:
        raise ValueError(f"empty image {img.size}")
    return img, orientation if orientation in _MOVES else 1, (w, h)


ORIENTATION = 0x0112  # the EXIF tag ImageOps.exif_transpose reads


def _moves(orientation: int, w: float, h: float):
    """Where ``ImageOps.exif_transpose`` sends the stored point (x, y) of a w x h image, for
    each EXIF orientation (the transposes PIL applies: 2 mirror, 3 rotate 180, 4 flip, 5
    transpose, 6 rotate 270, 7 transverse, 8 rotate 90)."""
    return {
        1: lambda x, y: (x, y),
        2: lambda x, y: (w - x, y),
        3: lambda x, y: (w - x, h - y),
        4: lambda x, y: (x, h - y),
        5: lambda x, y: (y, x),
        6: lambda x, y: (h - y, x),
        7: lambda x, y: (h - y, w - x),
        8: lambda x, y: (y, w - x),
    }[orientation]


_MOVES = range(1, 9)


def orient_box(box: list[float], orientation: int, stored_size: tuple[int, int]) -> list[float]:
    """A box ``[x0, y0, x1, y1]`` in an image's stored pixel frame, in the frame of that image
    turned upright by its EXIF ``orientation`` (the image the model sees)."""
    move = _moves(orientation, *stored_size)
    xs, ys = zip(*(move(x, y) for x in (box[0], box[2]) for y in (box[1], box[3])))
    return [min(xs), min(ys), max(xs), max(ys)]


def _resolve(path: str, base: Path | None) -> Path:
    if re.match(r"^[a-z][a-z0-9+.-]*://", path, re.I):
        raise ValueError(f"image {path!r} is a URL: images are read from files or bytes, not fetched")
    p = Path(path).expanduser()
    return base / p if base is not None and not p.is_absolute() else p
