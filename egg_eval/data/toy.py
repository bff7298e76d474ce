"""Procedural, seeded toy data written offline in each benchmark's own schema.

``detail_scene`` draws a cluttered scene with a few small coloured squares, each holding
a small digit, and returns the evidence boxes. ``write_toy_subset(name, dir)`` writes a
few rows of that scene in benchmark ``name``'s HF schema (same column names and types),
so CI and users run the same streaming code as on the real benchmark.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 20)}


def detail_scene(seed: int, size: tuple[int, int] = (320, 240), n_squares: int = 3, square: int = 22):
    """A scene and its squares: ``(image, [(colour, digit, [x0, y0, x1, y1]), ...])``."""
    rng = random.Random(seed)
    w, h = size
    img = Image.new("RGB", size, (235, 232, 225))
    draw = ImageDraw.Draw(img)
    for _ in range(40):  # clutter
        x, y = rng.randrange(w), rng.randrange(h)
        g = rng.randrange(90, 200)
        draw.line([x, y, x + rng.randrange(-40, 40), y + rng.randrange(-40, 40)], fill=(g, g, g), width=1)
    squares, taken = [], []
    for colour in rng.sample(sorted(COLOURS), n_squares):
        for _ in range(100):
            x0, y0 = rng.randrange(4, w - square - 4), rng.randrange(4, h - square - 4)
            box = [x0, y0, x0 + square, y0 + square]
            if all(box[2] + 6 < t[0] or t[2] + 6 < box[0] or box[3] + 6 < t[1] or t[3] + 6 < box[1] for t in taken):
                break
        taken.append(box)
        digit = rng.randrange(10)
        draw.rectangle(box, fill=COLOURS[colour])
        draw.text((box[0] + square // 2 - 3, box[1] + square // 2 - 6), str(digit), fill=(255, 255, 255))
        squares.append((colour, digit, box))
    return img, squares


def _rows(n: int, seed: int):
    for i in range(n):
        img, squares = detail_scene(seed * 1000 + i)
        colour, digit, box = squares[0]
        yield i, img, colour, digit, box, squares


def _write(rows: dict, path: Path) -> None:
    from datasets import Dataset, Features, Image, Sequence, Value

    features = {}
    for k, vals in rows.items():
        v = vals[0]
        if hasattr(v, "save"):
            features[k] = Image()
        elif isinstance(v, list) and v and isinstance(v[0], list):
            features[k] = Sequence(Sequence(Value("float32")))
        elif isinstance(v, list) and v and isinstance(v[0], float):
            features[k] = Sequence(Value("float32"))
        elif isinstance(v, list):
            features[k] = Sequence(Value("string"))
        elif isinstance(v, int):
            features[k] = Value("int64")
        else:
            features[k] = Value("string")
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(rows, features=Features(features)).to_parquet(str(path))


# Bumped when a generator's rows change, so that a cache written by an older version is not
# reused (detail v2: the two-region question asks for the larger digit, no longer the sum;
# v3: digits drawn 6x10 px instead of 9x15, for the toy's 96 px input instead of 64; vstar v2: V*'s own
# layout of images, annotation files and test_questions.jsonl).
VERSIONS = {
    "detail": 3,
    "rwqa": 2,
    "vstar": 2,
}  # bumped when a generator changes: caches of the old rows are not reused


def subset_dirname(name: str, n: int = 4) -> str:
    """The cache directory name of ``n`` toy rows of ``name`` (its generator version included)."""
    base = name if n == 4 else f"{name}_{n}"
    return f"{base}_v{VERSIONS[name]}" if name in VERSIONS else base


def write_toy_subset(name: str, out_dir: str | Path, n: int = 4, seed: int = 0) -> Path:
    """Write ``n`` toy rows of benchmark ``name`` in its own schema under ``out_dir``."""
    out = Path(out_dir)
    q = "What is the digit in the {} square?"
    rows = list(_rows(n, seed))
    if name == "textvqa":
        _write(
            {
                "question_id": [i for i, *_ in rows],
                "question": [q.format(c) for _, _, c, *_ in rows],
                "image_id": [f"img{i}" for i, *_ in rows],
                "image": [r[1] for r in rows],
                "answers": [[str(d)] * 10 for _, _, _, d, *_ in rows],
            },
            out / "validation.parquet",
        )
        # the side dataset of evidence boxes, as jrzhang/TextVQA_GT_bbox: dataset_id, bbox [x, y, w, h]
        _write(
            {
                "dataset_id": [i for i, *_ in rows],
                "bbox": [[float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])] for *_, b, _ in rows],
            },
            out / "gt_bbox" / "train.parquet",
        )
    elif name in ("docvqa", "infovqa"):
        for split in ("validation", "test"):
            _write(
                {
                    "questionId": [str(5000 + i) for i, *_ in rows],
                    "question": [q.format(c) for _, _, c, *_ in rows],
                    "image": [r[1] for r in rows],
                    "docId": [i for i, *_ in rows],
                    "answers": [[str(d), f"digit {d}"] if split == "validation" else [] for _, _, _, d, *_ in rows],
                },
                out / f"{split}.parquet",
            )
    elif name == "vstar":
        _write_vstar(rows, out, q)
    elif name == "pope":
        for k, split in enumerate(("adversarial", "popular", "random")):
            yes = [(i + k) % 2 == 0 for i, *_ in rows]
            _write(
                {
                    "question_id": [str(i) for i, *_ in rows],
                    "image": [r[1] for r in rows],
                    "question": [f"Is there a {'red' if y else 'purple'} square in the image?" for y in yes],
                    "answer": ["yes" if y else "no" for y in yes],
                    "category": [split] * n,
                },
                out / f"{split}.parquet",
            )
    elif name == "gqa":
        _write(
            {
                "id": [f"q{i}" for i, *_ in rows],
                "imageId": [f"n{i}" for i, *_ in rows],
                "question": [f"Which colour is the square holding {d}?" for _, _, _, d, *_ in rows],
                "answer": [c for _, _, c, *_ in rows],
            },
            out / "testdev_balanced_instructions.parquet",
        )
        _write(
            {"id": [f"n{i}" for i, *_ in rows], "image": [r[1] for r in rows]}, out / "testdev_balanced_images.parquet"
        )
    elif name == "rwqa":
        # like RealWorldQA: most questions list lettered options, some (every fourth here) are
        # free-form, each with its own answering instruction at the end
        texts, answers = [], []
        for i, (_, _, c, d, _, _) in enumerate(rows):
            if i % 4 == 3:
                texts.append(q.format(c) + "\nPlease answer directly with a single word or number.")
                answers.append(str(d))
                continue
            opts = [str(d), str((d + 3) % 10), str((d + 7) % 10)]
            random.Random(d).shuffle(opts)
            texts.append(
                q.format(c)
                + "\n"
                + "\n".join(f"{chr(65 + k)}. {o}" for k, o in enumerate(opts))
                + "\nPlease answer directly with only the letter of the correct option and nothing else."
            )
            answers.append(chr(65 + opts.index(str(d))))
        _write({"image": [r[1] for r in rows], "question": texts, "answer": answers}, out / "test.parquet")
    elif name == "detail":
        from egg_eval.data.detail import write_detail

        write_detail(out, n=n, seed=2000 + seed)  # held-out scenes: seeds above every training seed
    else:
        raise ValueError(f"no toy subset for {name!r}")
    return out


def _write_vstar(rows: list, out: Path, q: str) -> None:
    """V* Bench's own layout (craigwu/vstar_bench): ``test_questions.jsonl`` (image path, text with
    the lettered options, label, category, question_id) and, beside each image, its annotation
    ``<category>/<name>.json`` (target_object, bbox [x, y, w, h], the bare question, options with
    the correct one first). The lettered options are in another order than the annotation's."""
    import json

    lines = []
    for i, img, colour, digit, box, _ in rows:
        category = ("direct_attributes", "relative_position")[i % 2]
        name = f"{category}/sa_{i}"
        (out / category).mkdir(parents=True, exist_ok=True)
        img.save(out / f"{name}.jpg", quality=95)
        options = [str(digit), str((digit + 1) % 10), str((digit + 2) % 10), str((digit + 5) % 10)]  # correct first
        lettered = sorted(options)
        annotation = {
            "target_object": [f"{colour} square"],
            "bbox": [[box[0], box[1], box[2] - box[0], box[3] - box[1]]],
            "question": q.format(colour),
            "options": options,
        }
        (out / f"{name}.json").write_text(json.dumps(annotation))
        text = q.format(colour) + "\n" + "\n".join(f"({chr(65 + k)}) {o}" for k, o in enumerate(lettered))
        text += "\nAnswer with the option's letter from the given choices directly."
        label = chr(65 + lettered.index(str(digit)))
        lines.append({"image": f"{name}.jpg", "text": text, "category": category, "question_id": i, "label": label})
    (out / "test_questions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
