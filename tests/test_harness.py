"""The harness end to end on the toy subsets with a tiny model: configs, outputs, resume, bad data."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from egg_eval.cli import CONFIG_DIR, main

GROUPS = ["backbone", "dataset", "method", "stopping", "logger", "execution"]
TOYS = ["textvqa_toy", "vstar_toy", "docvqa_toy", "infovqa_toy", "pope_toy", "gqa_toy", "rwqa_toy", "detail_toy"]
RECORD_FIELDS = {
    "id",
    "subset",
    "question",
    "prediction",
    "answers",
    "metrics",
    "localisation",
    "rounds",
    "final_views",
    "stop_reason",
    "n_forward",
    "n_backward",
    "n_tower",
    "n_grounded",
    "prefix_tokens",
    "memory_fallbacks",
    "memory_limited",
    "recomputed_layers",
    "lean_passes",
    "time_ground_s",
    "time_answer_s",
    "time_s",
    "error",
}


def cfg_for(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("eval", overrides=[f"output_root={tmp_path}", "progress=false", *overrides])


@pytest.mark.parametrize("group", GROUPS)
def test_every_config_file_composes(tmp_path, group):
    names = sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))
    assert names
    for name in names:
        cfg = cfg_for(tmp_path, f"{group}={name}")
        assert cfg[group] and (group == "execution" or cfg[group].name)


def test_the_tiny_backbone_is_named_after_its_family(tmp_path):
    assert cfg_for(tmp_path, "backbone=tiny").backbone.name == "tiny_llava15"
    assert cfg_for(tmp_path, "backbone=tiny", "backbone.family=qwen25vl").backbone.name == "tiny_qwen25vl"


def test_experiment_files_compose(tmp_path):
    for p in sorted((Path(CONFIG_DIR) / "experiment").glob("*.yaml")):
        cfg = cfg_for(tmp_path, f"+experiment={p.stem}")
        assert cfg.method.name == "egg"


def test_unknown_choice_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigCompositionException, match="docvqa"):
        cfg_for(tmp_path, "dataset=docvq")


@pytest.mark.parametrize("dataset", TOYS)
def test_run_on_each_toy_subset_writes_all_outputs(tmp_path, dataset):
    summary = main(cfg_for(tmp_path, f"dataset={dataset}", "method.max_rounds=2"))
    run_dir = next((tmp_path / "runs").glob(f"{dataset}/*/*/*"))
    recs = [json.loads(x) for x in (run_dir / "records.jsonl").read_text().splitlines()]
    n = 12 if dataset == "pope_toy" else 4
    assert len(recs) == n == summary["n_samples"] and summary["n_failures"] == 0
    for r in recs:
        assert set(r) == RECORD_FIELDS and r["error"] is None and isinstance(r["prediction"], str)
        for rnd in r["rounds"]:
            assert all(len(v) == 4 for v in rnd["views"])
    s = json.loads((run_dir / "summary.json").read_text())
    for key in (
        "score",
        "n_samples",
        "n_failures",
        "mean_time_s",
        "seed",
        "versions",
        "git_revision",
        "config",
        "model_revision",
        "dataset_revision",
    ):
        assert key in s
    rows = list(csv.DictReader((tmp_path / "tables" / f"{dataset}.csv").read_text().splitlines()))
    assert len(rows) == 1 and rows[0]["dataset"] == dataset
    if dataset in ("textvqa_toy", "docvqa_toy", "infovqa_toy", "gqa_toy"):
        sub = json.loads(next(run_dir.glob("submission_*.json")).read_text())
        assert len(sub) == n
        key = {"textvqa_toy": "question_id", "gqa_toy": "questionId"}.get(dataset, "questionId")
        assert all(key in row for row in sub)
    if dataset == "pope_toy":
        assert set(s["pope_splits"]) == {"adversarial", "popular", "random"}
        assert 0 <= s["pope_yes_ratio"] <= 1
    if dataset == "detail_toy":
        assert "mean_iou" in s and "hit_rate" in s


def test_submission_written_for_split_without_answers(tmp_path):
    summary = main(cfg_for(tmp_path, "dataset=docvqa_toy", "dataset.split=test", "method=vanilla"))
    assert summary["score"] is None and summary["n_samples"] == 4
    run_dir = next((tmp_path / "runs").glob("docvqa_toy/*/*/*"))
    assert [r["questionId"] for r in json.loads((run_dir / "submission_rrc.json").read_text())] == [
        5000,
        5001,
        5002,
        5003,
    ]


def test_resume_continues_without_loss_or_double_scoring(tmp_path):
    full = main(cfg_for(tmp_path / "a", "dataset=detail_toy", "method.max_rounds=2"))
    main(cfg_for(tmp_path / "b", "dataset=detail_toy", "method.max_rounds=2"))
    run_dir = next((tmp_path / "b" / "runs").glob("*/*/*/*"))
    lines = (run_dir / "records.jsonl").read_text().splitlines(keepends=True)
    # as a run killed after two samples, in the middle of writing the third
    (run_dir / "records.jsonl").write_text("".join(lines[:2]) + '{"id": "d9", "question": "torn')
    resumed = main(cfg_for(tmp_path / "b", "dataset=detail_toy", "method.max_rounds=2"))
    ids = [json.loads(x)["id"] for x in (run_dir / "records.jsonl").read_text().splitlines()]
    assert ids == [f"detail-2000-{i}" for i in range(4)]
    assert resumed["score"] == full["score"] and resumed["n_samples"] == full["n_samples"] == 4
    a = [json.loads(x)["prediction"] for x in next((tmp_path / "a" / "runs").glob("*/*/*/*/records.jsonl")).open()]
    b = [json.loads(x)["prediction"] for x in (run_dir / "records.jsonl").open()]
    assert a == b


def test_resume_refuses_records_of_other_data(tmp_path):
    """A run folder written for other data under the same ids (e.g. a regenerated toy set)
    is not silently mixed in: the rerun stops with a clear error and the file is untouched."""
    main(cfg_for(tmp_path, "dataset=detail_toy", "method.max_rounds=2", "dataset.limit=2"))
    rec = next((tmp_path / "runs").glob("*/*/*/*/records.jsonl"))
    lines = rec.read_text().splitlines()
    first = json.loads(lines[0])
    first["question"] = "What is the sum of the digits in the red and blue squares?"
    stale = "\n".join([json.dumps(first), *lines[1:]]) + "\n"
    rec.write_text(stale)
    with pytest.raises(ValueError, match="the data changed"):
        main(cfg_for(tmp_path, "dataset=detail_toy", "method.max_rounds=2", "dataset.limit=2"))
    assert rec.read_text() == stale


def test_corrupt_image_and_empty_question_are_recorded_and_the_run_completes(tmp_path, capsys):
    from datasets import Dataset, Features, Image, Sequence, Value
    from PIL import Image as PILImage

    good = io.BytesIO()
    PILImage.new("RGB", (64, 48), (200, 10, 10)).save(good, format="PNG")
    rows = {
        "id": ["ok", "corrupt", "empty"],
        "image": [
            {"bytes": good.getvalue(), "path": None},
            {"bytes": good.getvalue()[:40], "path": None},
            {"bytes": good.getvalue(), "path": None},
        ],
        "question": ["What colour?", "What colour?", "  "],
        "answers": [["red"], ["red"], ["red"]],
        "bbox": [[[0.0, 0.0, 10.0, 10.0]]] * 3,
    }
    feats = Features(
        {
            "id": Value("string"),
            "image": Image(),
            "question": Value("string"),
            "answers": Sequence(Value("string")),
            "bbox": Sequence(Sequence(Value("float32"))),
        }
    )
    data = tmp_path / "data"
    data.mkdir()
    Dataset.from_dict(rows, features=feats).to_parquet(str(data / "test.parquet"))
    summary = main(
        cfg_for(tmp_path, "dataset=detail_toy", "~dataset.toy", f"dataset.path={data}", "method.max_rounds=2")
    )
    recs = {json.loads(x)["id"]: json.loads(x) for x in next((tmp_path / "runs").glob("*/*/*/*/records.jsonl")).open()}
    assert recs["ok"]["error"] is None
    assert "corrupt" in recs and recs["corrupt"]["error"] and recs["corrupt"]["prediction"] is None
    assert "empty question" in recs["empty"]["error"]
    assert summary["n_samples"] == 3 and summary["n_failures"] == 2
    # what failed, by kind, in the summary and on the printed line
    kinds = {"ValueError: empty question": 1, "ValueError: not an image PIL can read": 1}
    assert summary["failures_by_kind"] == kinds
    assert f"| failures 2 ({', '.join(f'1 {k}' for k in kinds)}) |" in capsys.readouterr().out


def test_missing_column_is_a_clear_error(tmp_path):
    with pytest.raises(KeyError, match="missing"):
        main(cfg_for(tmp_path, "dataset=textvqa_toy", "dataset.columns.question=query"))


def test_a_missing_answers_column_is_said_once_and_nothing_is_scored(tmp_path, caplog, capsys):
    """No answers column may be a test split's withheld answers, so the run goes on to its
    predictions (and submission file), but a misnamed column must not pass unnoticed."""
    with caplog.at_level("WARNING", logger="egg_eval"):
        summary = main(cfg_for(tmp_path, "backbone=tiny", "dataset=textvqa_toy", "dataset.columns.answers=gold"))
    said = [r.getMessage() for r in caplog.records if "dataset.columns.answers" in r.getMessage()]
    assert len(said) == 1 and "'gold'" in said[0] and "'answers'" in said[0]  # names the rows' columns
    assert summary["score"] is None and summary["n_samples"] > 0 and summary["n_failures"] == 0
    assert "| vqa_accuracy = - (no public answers in this split) |" in capsys.readouterr().out


def test_the_printed_line_gives_the_score_in_percent(tmp_path, capsys):
    summary = main(cfg_for(tmp_path, "dataset=detail_toy", "method=vanilla"))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"| exact_match = {100 * summary['score']:.2f}% | samples 4 | failures 0 |" in line


def test_make_tables_prints_the_papers_table_from_real_runs(tmp_path):
    import subprocess
    import sys

    main(cfg_for(tmp_path, "dataset=pope_toy", "method=vanilla"))
    for k in (1, 2):
        main(cfg_for(tmp_path, "dataset=pope_toy", f"method.top_k={k}", "method.max_rounds=2"))
    script = Path(__file__).resolve().parent.parent / "scripts" / "make_tables.py"
    out = subprocess.run(
        [sys.executable, str(script), "--results", str(tmp_path), "--suffix", "_toy", "--tables", "table4"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("Table 4: regions added (K) (toy_llava)")
    rows = (tmp_path / "tables" / "paper" / "table4.csv").read_text().splitlines()
    assert rows[0] == "Method,POPE,V*,DocVQA,RWQA" and rows[-1] == "n,12,-,-,-"
    # max_rounds=2 is not the paper's default (15): those runs are in no row, only the plain model is
    assert rows[1].startswith("Base,") and rows[1] != "Base,-,-,-,-" and rows[2] == "1 added,-,-,-,-"


def test_attention_implementation_is_a_backbone_setting(tmp_path):
    """``backbone.attn_implementation`` reaches the loaded model (sdpa by default), and the
    same run under eager attention gives the same predictions; a resume may switch it."""
    from egg_eval.cli import build

    cfg = cfg_for(tmp_path, "backbone=tiny", "dataset=detail_toy", "method.max_rounds=2")
    assert build(cfg)[0].model.config._attn_implementation == "sdpa"
    eager = cfg_for(
        tmp_path, "backbone=tiny", "dataset=detail_toy", "method.max_rounds=2", "backbone.attn_implementation=eager"
    )
    assert build(eager)[0].model.config._attn_implementation == "eager"
    first = main(cfg)
    run_dir = next((tmp_path / "runs").glob("*/*/*/*"))
    preds = [json.loads(x)["prediction"] for x in (run_dir / "records.jsonl").open()]
    (run_dir / "records.jsonl").unlink()
    again = main(eager)  # into the same folder: the attention kernel is not part of the result's identity
    assert [json.loads(x)["prediction"] for x in (run_dir / "records.jsonl").open()] == preds
    assert again["score"] == first["score"]


def test_cudnn_attention_is_off_unless_asked_for(tmp_path):
    """``backbone.sdpa_cudnn`` sets PyTorch's process-wide switch for cuDNN attention when the
    backbone loads: off by default (on an H200 its per-shape graph builds made EGG 1.7-2.5x
    slower), on when asked; it is not part of a result's identity, like the kernel choice."""
    import torch

    from egg_eval.cli import build
    from egg_eval.runs import NOT_IN_RESULT

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)  # PyTorch's own default
        build(cfg_for(tmp_path, "backbone=tiny", "dataset=detail_toy", "method.max_rounds=2"))
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        build(cfg_for(tmp_path, "backbone=tiny", "dataset=detail_toy", "backbone.sdpa_cudnn=true"))
        assert torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
    assert "backbone.sdpa_cudnn" in NOT_IN_RESULT


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.top_k=two", r"method\.top_k: Value 'two' .* Integer"),
        ("execution.batch_views=maybe", r"execution\.batch_views: Value 'maybe' is not a valid bool"),
        ("method.sigma=wide", r"method\.sigma: .* Float"),
        ("method.objective=entropyy", r"method\.objective must be one of \['entropy'"),
        ("execution.lean_activations=maybe", r"execution\.lean_activations must be auto, true or false"),
        ("backbone.sdpa_cudnn=sometimes", r"backbone\.sdpa_cudnn: Value 'sometimes' is not a valid bool"),
        ("method.top_k=0", r"method\.top_k must be >= 1"),
        ("stopping=fixed stopping.n=0", r"stopping\.n must be >= 1"),
        ("method.max_aspect=0.5", r"method\.max_aspect must be >= 1"),
        ("method.layer=last", r"method\.layer: .* Integer"),
        ("dataset.limit=-3", r"dataset\.limit must be a whole number >= 1"),
        ("backbone.max_new_tokens=many", r"backbone\.max_new_tokens: .* Integer"),
        ("backbone.dtype=float33", r"backbone\.dtype must be one of"),
        ("backbone.device=gpu", r"backbone\.device must be auto, cpu, cuda"),
        ("pictures=some", r"config pictures: .* Integer"),
        ("seed=abc", r"config seed: .* Integer"),
        ("retry_failed=maybe", r"config retry_failed: Value 'maybe' is not a valid bool"),
        ("max_failures_in_a_row=-1", r"config max_failures_in_a_row must be >= 0"),
        ("shard.count=two", r"shard\.count: .* Integer"),
        ("backbone.path=/no/such/checkpoint", r"backbone\.path: no such directory '/no/such/checkpoint'"),
        ("dataset.path=./no_such_parquet_dir", r"dataset\.path: no such file or directory"),
        ("logger=wandb logger.mode=offlin", r"logger\.mode must be one of"),
        ("backbone.device=cuda:99", r"backbone\.device='cuda:99', but this process sees"),
    ],
)
def test_a_mistyped_setting_stops_the_run_before_any_sample(tmp_path, override, message):
    """A wrong type or range is an error naming the key, raised before the model loads;
    before this check `method.objective=entropyy` or `backbone.max_new_tokens=many` failed
    every sample, and `execution.batch_views=maybe` ran as true."""
    cfg = cfg_for(tmp_path, "backbone=tiny", "dataset=detail_toy", *override.split())
    with pytest.raises(ValueError, match=message):
        main(cfg)
    assert not (tmp_path / "runs").exists() and not (tmp_path / ".cache").exists()  # nothing loaded or written


def test_every_shipped_config_passes_the_setting_check(tmp_path):
    from egg_eval.config_check import check_config

    names = {g: sorted(p.stem for p in (Path(CONFIG_DIR) / g).glob("*.yaml")) for g in GROUPS}
    for group, options in names.items():
        for name in options:
            check_config(cfg_for(tmp_path, f"{group}={name}"))
    check_config(cfg_for(tmp_path, "stopping=fixed", "stopping.n=3", "method.layer=2", "dataset.limit=5"))


def test_a_logit_lens_layer_beyond_the_model_is_refused_before_any_sample(tmp_path):
    cfg = cfg_for(tmp_path, "backbone=tiny", "dataset=detail_toy", "method.layer=7")  # the tiny model has 2
    with pytest.raises(ValueError, match=r"method\.layer must be in 1\.\.2"):
        main(cfg)
    assert not (tmp_path / "runs").exists()


def test_help_says_what_the_tool_is_and_lists_the_groups():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "egg_eval", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("egg_eval: Entropy-Gradient Grounding")
    assert "backbone: internvl35, llava15, llava16, qwen25vl, tiny, toy" in out and "method: egg, vanilla\n" in out
    assert "python -m egg_eval.merge" in out


def test_deterministic_mode_is_set_for_the_run_and_may_change_on_resume(tmp_path):
    """``deterministic=true`` turns on deterministic kernels for the run (for GPUs; CPU
    kernels are deterministic anyway, so the records are the same), and, like the device, it
    is not a setting the records depend on: a resume may switch it."""
    import torch

    args = (
        "backbone=tiny",
        "dataset=detail_toy",
        "method.max_rounds=2",
        "pictures=0",
        f"output_dir={tmp_path / 'run'}",
    )
    try:
        main(cfg_for(tmp_path, *args, "deterministic=true"))
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        records = tmp_path / "run" / "records.jsonl"
        records.write_text("".join(records.read_text().splitlines(keepends=True)[:2]))  # as if killed after two
        main(cfg_for(tmp_path, *args))  # resumes the same folder with it off
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    plain = tmp_path / "plain"
    main(cfg_for(tmp_path, *args[:-1], f"output_dir={plain}"))
    keep = ("id", "prediction", "metrics", "rounds")
    a = [json.loads(x) for x in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (plain / "records.jsonl").read_text().splitlines()]
    assert [{k: r[k] for k in keep} for r in a] == [{k: r[k] for k in keep} for r in b] and len(a) == 4


def test_a_backbone_that_cannot_be_loaded_is_named_with_what_to_do(tmp_path, monkeypatch):
    """Offline, a hub id not in the cache: the error names the backbone and the id (the
    transformers message alone names neither) and says how to run from a local copy."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = cfg_for(tmp_path, "backbone=qwen25vl", "backbone.path=egg-eval-tests/not-a-model", "dataset=detail_toy")
    with pytest.raises(
        OSError,
        match=r"(?s)could not load backbone 'qwen25vl' from 'egg-eval-tests/not-a-model'.*"
        r"hf download egg-eval-tests/not-a-model --local-dir <dir>.*backbone\.path=<dir>",
    ):
        main(cfg)
