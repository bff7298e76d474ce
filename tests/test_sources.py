"""Where a benchmark's rows, boxes and annotations come from: V*'s own files, TextVQA's side
boxes in their pixel frame, EXIF orientation."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_harness import cfg_for

from egg_eval.cli import main
from egg_eval.data.benchmarks import BenchmarkSpec, gt_boxes, iter_samples
from egg_eval.data.images import decode_oriented, orient_box
from egg_eval.data.toy import write_toy_subset
from egg_eval.scoring import score_sample

VSTAR = BenchmarkSpec(
    name="vstar",
    hf_id="craigwu/vstar_bench",
    split="test",
    metric="multiple_choice",
    kind="mc",
    columns={"id": "question_id", "image": "image", "question": "text", "answers": "label", "category": "category"},
    annotations=".json",
)


def _exif_png(size, box, orientation) -> bytes:
    img = Image.new("RGB", size, (0, 0, 0))
    img.paste((255, 0, 0), tuple(box))
    exif = img.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="PNG", exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_box_in_the_stored_frame_lands_where_the_upright_image_has_it(orientation):
    box = [10, 5, 25, 12]  # a red patch, drawn in the stored pixels of a 60 x 40 image
    upright, got, stored = decode_oriented({"bytes": _exif_png((60, 40), box, orientation), "path": None})
    red = np.argwhere(np.asarray(upright)[:, :, 0] > 128)
    where = [red[:, 1].min(), red[:, 0].min(), red[:, 1].max() + 1, red[:, 0].max() + 1]
    assert got == orientation and stored == (60, 40)
    assert orient_box(box, orientation, stored) == where


def test_textvqa_boxes_in_the_stored_frame_turn_with_their_exif_rotated_image(tmp_path):
    from datasets import Dataset, Features, Sequence, Value
    from datasets import Image as ImageFeature

    box = [30, 10, 50, 20]  # x0, y0, x1, y1 in the stored 80 x 40 pixels; the upright image is 40 x 80
    rows = {"question_id": [1], "question": ["what?"], "answers": [["a"] * 10]}
    rows["image"] = [{"bytes": _exif_png((80, 40), box, 6), "path": None}]
    feats = {"question_id": Value("int64"), "question": Value("string"), "answers": Sequence(Value("string"))}
    Dataset.from_dict(rows, features=Features({**feats, "image": ImageFeature()})).to_parquet(
        str(tmp_path / "validation.parquet")
    )
    # the side dataset of boxes carries an image column, as jrzhang/TextVQA_GT_bbox does: never decoded
    (tmp_path / "gt").mkdir()
    Dataset.from_dict({"dataset_id": ["1"], "bbox": [[30.0, 10.0, 20.0, 10.0]], "image": [b"not an image"]}).to_parquet(
        str(tmp_path / "gt" / "train.parquet")
    )
    common = dict(name="t", hf_id="x", split="validation", metric="vqa_accuracy", boxes_path=str(tmp_path / "gt"))
    common["columns"] = {"id": "question_id"}
    for frame, want in (("stored", orient_box(box, 6, (80, 40))), ("upright", box)):
        spec = BenchmarkSpec(**common, boxes_frame=frame)
        (sample,) = iter_samples(spec, path=str(tmp_path))
        assert sample.image.size == (40, 80) and sample.orientation == 6
        assert sample.bbox == [want]
    red = np.argwhere(np.asarray(sample.image)[:, :, 0] > 128)
    assert orient_box(box, 6, (80, 40)) == [red[:, 1].min(), red[:, 0].min(), red[:, 1].max() + 1, red[:, 0].max() + 1]


def test_the_box_dataset_is_read_without_its_image_column(tmp_path):
    from datasets import Dataset, Features, Sequence, Value
    from datasets import Image as ImageFeature

    bad = {"bytes": b"\x89PNG not really", "path": None}  # would raise if it were decoded
    Dataset.from_dict(
        {"dataset_id": [3], "bbox": [[1.0, 2.0, 3.0, 4.0]], "image": [bad]},
        features=Features({"dataset_id": Value("int64"), "bbox": Sequence(Value("float32")), "image": ImageFeature()}),
    ).to_parquet(str(tmp_path / "train.parquet"))
    spec = BenchmarkSpec(name="t", hf_id="x", split="validation", metric="vqa_accuracy", boxes_path=str(tmp_path))
    assert gt_boxes(spec) == {"3": [[1.0, 2.0, 4.0, 6.0]]}


def test_vstar_rows_take_boxes_and_likelihood_options_from_the_annotation_files(tmp_path):
    write_toy_subset("vstar", tmp_path, n=4)
    generated = list(iter_samples(VSTAR, path=str(tmp_path)))
    likely = list(iter_samples(VSTAR.__class__(**{**VSTAR.__dict__, "protocol": "likelihood"}), path=str(tmp_path)))
    for g, lk in zip(generated, likely):
        assert g.error is None and g.bbox and g.bbox == lk.bbox
        assert "(A)" in g.question and g.answers[0] in "ABCD"  # the lettered text and its label
        assert "(A)" not in lk.question and lk.answers == ["A"] and len(lk.options) == 4  # the bare question
    first = json.loads((tmp_path / "direct_attributes" / "sa_0.json").read_text())
    assert likely[0].question == first["question"] and likely[0].options == first["options"]
    x, y, w, h = first["bbox"][0]
    assert generated[0].bbox == [[x, y, x + w, y + h]]


def test_vstar_from_a_relative_dataset_path(tmp_path, monkeypatch):
    write_toy_subset("vstar", tmp_path / "copy", n=2)
    monkeypatch.chdir(tmp_path)
    assert [s.error for s in iter_samples(VSTAR, path="copy")] == [None, None]


def test_a_missing_vstar_annotation_fails_its_sample_only(tmp_path):
    write_toy_subset("vstar", tmp_path, n=4)
    (tmp_path / "relative_position" / "sa_1.json").unlink()
    samples = list(iter_samples(VSTAR, path=str(tmp_path)))
    assert [s.error is None for s in samples] == [True, False, True, True]
    assert "annotation relative_position/sa_1.json" in samples[1].error


def test_vstar_from_the_hub_fetches_each_file_it_needs(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    write_toy_subset("vstar", tmp_path, n=2)
    fetched = []

    def download(repo, filename, repo_type=None, revision=None):
        fetched.append((repo, filename, repo_type, revision))
        return str(tmp_path / filename)

    rows = [json.loads(x) for x in (tmp_path / "test_questions.jsonl").read_text().splitlines()]
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter(rows))
    samples = list(iter_samples(VSTAR.__class__(**{**VSTAR.__dict__, "revision": "abc"})))
    assert [s.error for s in samples] == [None, None] and samples[0].image.size == (320, 240)
    assert ("craigwu/vstar_bench", "direct_attributes/sa_0.json", "dataset", "abc") in fetched
    assert ("craigwu/vstar_bench", "direct_attributes/sa_0.jpg", "dataset", "abc") in fetched


def test_vstar_generated_letters_and_named_options_are_scored(tmp_path):
    write_toy_subset("vstar", tmp_path, n=2)
    sample = next(iter_samples(VSTAR, path=str(tmp_path), decode=False))
    gold = sample.answers[0]
    text = dict(line.split(") ", 1) for line in sample.question.splitlines() if line.startswith("("))[f"({gold}"]
    spec = VSTAR
    assert score_sample(spec, sample, gold)["multiple_choice"] == 1.0
    assert score_sample(spec, sample, f"The digit is {text}.")["multiple_choice"] == 1.0  # the option named by text
    other = next(x for x in "ABCD" if x != gold)
    assert score_sample(spec, sample, other)["multiple_choice"] == 0.0


def test_vstar_likelihood_runs_on_the_annotation_options_and_reports_iou(tmp_path):
    base = ("backbone=tiny", "dataset=vstar_toy", "method.max_rounds=2", "pictures=0")
    s = main(cfg_for(tmp_path, *base, "dataset.protocol=likelihood"))
    recs = [json.loads(x) for x in Path(s["output_dir"], "records.jsonl").read_text().splitlines()]
    assert all(r["answers"] == ["A"] and "(A)" not in r["question"] for r in recs)
    assert "mean_iou" in s and s["hit_rate"] is not None  # V*'s target boxes, from the annotation files
