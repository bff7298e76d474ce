"""Benchmark protocols beyond plain generation: V*'s lowest-loss option, TextVQA's side boxes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import noise_image
from test_harness import cfg_for

from egg_eval.cli import main
from egg_eval.data.prompts import split_options
from egg_eval.grounding.refine import answer_by_likelihood
from egg_eval.types import Box


@pytest.mark.parametrize(
    "text, stem, letters, options",
    [
        (
            "What colour?\n(A) red\n(B) blue\nAnswer with the option's letter.",
            "What colour?",
            ["A", "B"],
            ["red", "blue"],
        ),
        (
            "Where is it?\nA. left\nB. right\nC. up\nPlease answer directly.",
            "Where is it?",
            ["A", "B", "C"],
            ["left", "right", "up"],
        ),
        ("Two lines\nof stem\n(A) x\n(C) skipped letter", "Two lines\nof stem", ["A"], ["x"]),
        ("No options here", "No options here", [], []),
    ],
)
def test_split_options(text, stem, letters, options):
    assert split_options(text) == (stem, letters, options)


@pytest.mark.filterwarnings("error:.*past_key_values.*:FutureWarning")  # the cache keyword (see test_refine)
def test_option_losses_equal_a_hand_computed_teacher_forced_loss(tiny_backbones, family):
    bb = tiny_backbones[family]
    img = noise_image(90, 70)
    bb.counters.__init__()
    options = ["red square", "blue", "square red blue"]  # the prompt's KV cache is cut back after each
    losses = bb.option_losses([img], "What is it?", options)
    assert bb.counters.n_tower == 1  # the image is embedded once for all options
    tok = bb.processor.tokenizer
    n_tokens = [len(tok(" " + o, add_special_tokens=False).input_ids) for o in options]
    assert max(n_tokens) >= 3
    # the prompt once, then a short forward for each option of several tokens
    assert bb.counters.n_forward == 1 + sum(n > 1 for n in n_tokens)
    for opt, got in zip(options, losses, strict=True):
        enc = bb.processor(images=[img], text=bb.prompt(1, "What is it?") + " " + opt, return_tensors="pt")
        ids = tok(" " + opt, add_special_tokens=False).input_ids
        n = len(ids)
        assert enc.input_ids[0, -n:].tolist() == ids  # the option tokens are the prompt's tail
        with torch.no_grad():
            logits = bb.model(**enc).logits[0, -n - 1 : -1]
        want = torch.nn.functional.cross_entropy(logits, torch.tensor(ids)).item()
        assert got == pytest.approx(want, rel=1e-5)


def test_answer_by_likelihood_picks_the_lowest_loss_letter(tiny_backbones, monkeypatch):
    bb = tiny_backbones["llava15"]
    img = noise_image(64, 64)
    monkeypatch.setattr(
        bb, "option_losses", lambda images, stem, options, features=None, prefix=None: [2.0, 0.5, 1.0][: len(options)]
    )
    q = "Which?\n(A) one\n(B) two\n(C) three\nAnswer with the option's letter from the given choices directly."
    assert answer_by_likelihood(bb, img, q, [Box.of_image(64, 64)]) == "B"
    with pytest.raises(ValueError, match="no '\\(A\\)"):
        answer_by_likelihood(bb, img, "no options", [Box.of_image(64, 64)])


def test_vstar_likelihood_protocol_runs_and_is_named_in_results(tmp_path):
    summary = main(
        cfg_for(tmp_path, "backbone=tiny", "dataset=vstar_toy", "dataset.protocol=likelihood", "method.max_rounds=2")
    )
    run_dir = next((tmp_path / "runs").glob("vstar_toy/*/*/*"))
    assert run_dir.name.endswith("_likelihood")
    recs = [json.loads(x) for x in (run_dir / "records.jsonl").read_text().splitlines()]
    assert all(r["prediction"] in {"A", "B", "C", "D"} and r["error"] is None for r in recs)
    # on top of the grounding passes (a forward and a backward each): the prompt's forward, then
    # one short forward per option of more than one token, on the prompt's KV cache
    assert all(1 <= r["n_forward"] - r["n_backward"] <= 1 + 4 for r in recs)
    assert summary["config"]["dataset"]["protocol"] == "likelihood"


def test_textvqa_boxes_are_joined_by_question_id_and_give_iou(tmp_path):
    main(cfg_for(tmp_path, "backbone=tiny", "dataset=textvqa_toy", "method.max_rounds=2"))
    run_dir = next((tmp_path / "runs").glob("textvqa_toy/*/*/*"))
    recs = [json.loads(x) for x in (run_dir / "records.jsonl").read_text().splitlines()]
    with_crop = [r for r in recs if len(r["final_views"]) > 1]
    assert with_crop, "EGG made no crop on any toy sample"
    for r in with_crop:
        assert 0.0 <= r["localisation"]["iou"] <= 1.0 and r["localisation"]["hit"] in (0.0, 1.0)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "mean_iou" in summary


def test_gt_boxes_side_dataset_converts_xywh_and_skips_bad_rows(tmp_path):
    from datasets import Dataset

    from egg_eval.data.benchmarks import BenchmarkSpec, gt_boxes

    Dataset.from_dict(
        {"dataset_id": [1, 2, 3, 4], "bbox": [[10.0, 20.0, 5.0, 5.0], None, [1.0, 2.0], [0.0, 0.0, 2.0, 3.0]]}
    ).to_parquet(str(tmp_path / "train.parquet"))
    spec = BenchmarkSpec(name="t", hf_id="x", split="validation", metric="vqa_accuracy", boxes_path=str(tmp_path))
    assert gt_boxes(spec) == {"1": [[10.0, 20.0, 15.0, 25.0]], "4": [[0.0, 0.0, 2.0, 3.0]]}


def test_a_local_copy_of_a_hub_dataset_is_read_from_its_config_folder(tmp_path):
    """``dataset.path`` at an ``hf download --repo-type dataset`` folder: the config's own
    folder (DocVQA/, not InfographicVQA/ beside it) and the split's own files (test-*, not
    testdev-*), as the hub names them."""
    import shutil

    from egg_eval.data.benchmarks import iter_samples
    from egg_eval.data.specs import spec_from_config
    from egg_eval.data.toy import write_toy_subset

    hub = tmp_path / "hub"
    flat_docvqa = None
    for config, name, n in (("DocVQA", "docvqa", 4), ("InfographicVQA", "infovqa", 2)):
        flat = write_toy_subset(name, tmp_path / name, n=n) or tmp_path / name
        flat_docvqa = flat if name == "docvqa" else flat_docvqa
        (hub / config).mkdir(parents=True)
        for split in ("validation", "test"):
            shutil.copy(flat / f"{split}.parquet", hub / config / f"{split}-00000-of-00001.parquet")
    shutil.copy(hub / "DocVQA" / "validation-00000-of-00001.parquet", hub / "DocVQA" / "testdev-00000-of-00001.parquet")
    spec = spec_from_config(cfg_for(tmp_path, "dataset=docvqa").dataset)
    assert spec.config_name == "DocVQA"
    assert len(list(iter_samples(spec, split="validation", path=str(hub)))) == 4
    test = list(iter_samples(spec, split="test", path=str(hub)))
    assert len(test) == 4 and all(not s.answers for s in test)  # test-*, not testdev-* (which has answers)
    with pytest.raises(
        FileNotFoundError,
        match=r"no train\.parquet or train-\*\.parquet in .*DocVQA.*splits there: test, testdev, validation",
    ):
        next(iter_samples(spec, split="train", path=str(hub)))
    # a folder that has testdev but no test: `test` is refused, not read from testdev (which
    # the prefix fallback for other layouts used to take); `test_*.parquet` is still a test file
    (hub / "DocVQA" / "test-00000-of-00001.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"splits there: testdev, validation"):
        next(iter_samples(spec, split="test", path=str(hub)))
    shutil.copy(flat_docvqa / "test.parquet", hub / "DocVQA" / "test_part1.parquet")
    assert [s.answers for s in iter_samples(spec, split="test", path=str(hub))] == [[]] * 4


def test_answers_take_the_checkpoints_repetition_penalty_unless_the_setting_overrides_it(tiny_paths):
    """Answers are greedy, but a plain ``generate`` also applies what the checkpoint's
    generation config sets besides sampling (Qwen2.5-VL's Instruct checkpoints: a repetition
    penalty); ``backbone.repetition_penalty`` overrides it, and the summary says which held."""
    from egg_eval.backbones import load_backbone

    bb = load_backbone("qwen25vl", tiny_paths["qwen25vl"], device="cpu", max_new_tokens=6)
    img = noise_image(56, 56)
    questions = [f"What is written on sign {i}?" for i in range(4)]
    plain = [bb.answer([img], q) for q in questions]
    assert bb.effective_decoding()["repetition_penalty"] == 1.0
    # as if the checkpoint had published one; below 1 it favours the prompt's tokens, which the
    # random model's greedy answers (no repeats, no prompt tokens) show, where above 1 does not
    bb.model.generation_config.repetition_penalty = 0.02
    assert bb.effective_decoding()["repetition_penalty"] == 0.02
    penalised = [bb.answer([img], q) for q in questions]
    assert penalised != plain  # the checkpoint's setting reaches the answers
    bb.repetition_penalty = 1.0  # backbone.repetition_penalty=1.0
    assert [bb.answer([img], q) for q in questions] == plain
    assert bb.effective_decoding() == {"greedy": True, "repetition_penalty": 1.0, "max_new_tokens": 6}


def test_the_setting_reaches_the_backbone_and_the_summary(tmp_path):
    summary = main(cfg_for(tmp_path, "backbone=tiny", "dataset=detail_toy", "backbone.repetition_penalty=1.3"))
    assert summary["decoding"] == {"greedy": True, "repetition_penalty": 1.3, "max_new_tokens": 8}
    with pytest.raises(ValueError, match=r"backbone\.repetition_penalty must be > 0"):
        main(cfg_for(tmp_path, "backbone=tiny", "dataset=detail_toy", "backbone.repetition_penalty=0"))


def test_qwen_pixel_bounds_set_each_views_token_count_and_the_answer_path_follows(tiny_paths):
    """``backbone.min_pixels`` / ``max_pixels`` bound every view's area, hence its tokens, in
    the processor and in the answer's processor-free prompt (the same grid both ways)."""
    from egg_eval.backbones import load_backbone

    big, small = noise_image(560, 420), noise_image(60, 40)
    default = load_backbone("qwen25vl", tiny_paths["qwen25vl"], device="cpu")
    bb = load_backbone("qwen25vl", tiny_paths["qwen25vl"], device="cpu", min_pixels=28 * 28, max_pixels=28 * 28 * 9)

    def grids(b, images):
        return b.encode(images, "q")["image_grid_thw"].tolist()

    assert grids(default, [big, small]) == [[1, 12, 18], [1, 4, 6]]  # the tiny checkpoint's bounds: 4 to 64 tokens
    bounded = grids(bb, [big, small])
    assert [g[1] * g[2] // 4 for g in bounded] == [6, 2]  # at most 9 tokens; the small crop no longer raised to 6
    assert bb._image_stub([big.size, small.size])["image_grid_thw"].tolist() == bounded
    assert bb.encode_text([big, small], "q")["input_ids"].tolist() == bb.encode([big, small], "q")["input_ids"].tolist()
    from egg_eval.grounding.saliency import token_saliency

    g = token_saliency(bb, big, "What is here?")
    assert g.scores.shape == (6,) and g.map.shape == (2, 3)
    assert g.layout.token_boxes().reshape(-1, 4)[-1].tolist() == pytest.approx([373.3, 210.0, 560.0, 420.0], abs=0.1)
    with pytest.raises(ValueError, match="min_pixels 7056 is above max_pixels 784"):
        bb.set_pixel_range(28 * 28 * 9, 28 * 28)


def test_internvl_max_tiles_bounds_every_views_tiles_and_the_answer_path_follows(tiny_paths):
    from egg_eval.backbones import load_backbone
    from egg_eval.grounding.saliency import token_saliency

    wide = noise_image(600, 200)
    default = load_backbone("internvl35", tiny_paths["internvl35"], device="cpu")
    bb = load_backbone("internvl35", tiny_paths["internvl35"], device="cpu", max_tiles=2)
    assert default._image_stub([wide.size]) == {"num_patches": [4]}  # 3 tiles (of at most 6) + a thumbnail
    assert bb._image_stub([wide.size]) == {"num_patches": [3]}  # 2 tiles side by side + the thumbnail
    enc = bb.encode([wide], "q")
    assert enc["pixel_values"].shape[0] == 3
    assert bb.encode_text([wide], "q")["input_ids"].tolist() == enc["input_ids"].tolist()
    g = token_saliency(bb, wide, "What is here?")
    boxes = g.layout.token_boxes().reshape(-1, 4)
    assert g.map.shape == (4, 8) and boxes[:, 2].max() == pytest.approx(600) and boxes[:, 3].max() == pytest.approx(200)
    with pytest.raises(ValueError, match="max_tiles must be at least 1"):
        bb.set_max_tiles(0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["backbone.max_pixels=100000"], r"backbone\.max_pixels applies to qwen25vl only"),
        (["backbone.max_tiles=4"], r"backbone\.max_tiles applies to internvl35 only"),
        (["backbone.family=internvl35", "backbone.max_tiles=0"], r"backbone\.max_tiles must be >= 1"),
        (["backbone.family=qwen25vl", "backbone.max_pixels=100"], r"backbone\.max_pixels must be >= 784"),
        (
            ["backbone.family=qwen25vl", "backbone.min_pixels=9000", "backbone.max_pixels=8000"],
            r"backbone\.min_pixels 9000 is above",
        ),
    ],
)
def test_qwen_pixel_bounds_are_checked_before_the_run(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        main(cfg_for(tmp_path, "backbone=tiny", "dataset=detail_toy", *overrides))


@pytest.mark.parametrize("family, key, value", [("qwen25vl", "max_pixels", 7056), ("internvl35", "max_tiles", 2)])
def test_a_run_with_a_family_setting(tmp_path, family, key, value):
    cfg = cfg_for(
        tmp_path, "backbone=tiny", f"backbone.family={family}", "dataset=detail_toy", f"backbone.{key}={value}"
    )
    summary = main(cfg)
    assert summary["n_failures"] == 0 and summary["config"]["backbone"][key] == value
