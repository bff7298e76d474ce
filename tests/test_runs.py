"""One run folder = one sample set and one set of settings; settings checked before anything loads."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import pytest
from conftest import interrupt_after
from test_harness import cfg_for

from egg_eval.cli import main
from egg_eval.config_check import ConfigError
from egg_eval.progress import Progress
from egg_eval.runner import RunInterrupted

BASE = ("backbone=tiny", "dataset=detail_toy", "method.max_rounds=2", "pictures=0")


def _records(summary: dict) -> list[dict]:
    path = os.path.join(summary["output_dir"], "records.jsonl")
    return [json.loads(x) for x in open(path).read().splitlines()]


def test_a_rerun_with_a_smaller_limit_reports_exactly_its_first_samples(tmp_path):
    full = main(cfg_for(tmp_path, *BASE))
    first2 = main(cfg_for(tmp_path, *BASE, "dataset.limit=2"))
    assert full["n_samples"] == 4 and first2["n_samples"] == 2
    assert [r["id"] for r in _records(first2)] == [r["id"] for r in _records(full)][:2]
    assert first2["output_dir"].split(os.sep)[-3] == "test-first2" and full["output_dir"].split(os.sep)[-3] == "test"
    assert first2["sample_set"] == {"split": "test", "subsets": None, "limit": 2}


def test_a_pinned_folder_refuses_another_sample_set(tmp_path):
    out = f"output_dir={tmp_path / 'pinned'}"
    main(cfg_for(tmp_path, *BASE, out, "dataset.limit=2"))
    with pytest.raises(ValueError, match=r"dataset\.limit: 2 -> 3"):
        main(cfg_for(tmp_path, *BASE, out, "dataset.limit=3"))


def test_the_split_is_part_of_the_folder(tmp_path):
    val = main(cfg_for(tmp_path, "backbone=tiny", "dataset=docvqa_toy", "method=vanilla"))
    test = main(cfg_for(tmp_path, "backbone=tiny", "dataset=docvqa_toy", "method=vanilla", "dataset.split=test"))
    assert val["output_dir"] != test["output_dir"] and "/test/" in test["output_dir"]
    assert val["score"] is not None and test["score"] is None  # the test split's answers are withheld


def test_pope_runs_the_sub_split_asked_for(tmp_path):
    s = main(cfg_for(tmp_path, "backbone=tiny", "dataset=pope_toy", "method=vanilla", "dataset.split=popular"))
    assert s["n_samples"] == 4 and set(s["pope_splits"]) == {"popular"} and "/popular/" in s["output_dir"]
    assert {r["subset"] for r in _records(s)} == {"popular"}
    two = main(
        cfg_for(tmp_path, "backbone=tiny", "dataset=pope_toy", "method=vanilla", "dataset.split=[random,popular]")
    )
    assert set(two["pope_splits"]) == {"random", "popular"} and "/random+popular/" in two["output_dir"]
    every = main(cfg_for(tmp_path, "backbone=tiny", "dataset=pope_toy", "method=vanilla"))
    assert set(every["pope_splits"]) == {"adversarial", "popular", "random"} and "/all/" in every["output_dir"]
    # the subset's records are the same samples as those of that subset in the full run
    assert {r["id"]: r["prediction"] for r in _records(s)} == {
        r["id"]: r["prediction"] for r in _records(every) if r["subset"] == "popular"
    }


def test_a_run_that_fails_before_its_first_sample_pins_nothing(tmp_path):
    bad = (*BASE, "dataset.columns.id=qid")  # no such column: the stream stops at its first row
    with pytest.raises(KeyError, match="qid"):
        main(cfg_for(tmp_path, *bad))
    run_dir = next((tmp_path / "runs").glob("*/*/*/*"))
    assert not (run_dir / "run.json").exists()
    # the obvious fix is not refused as "other settings": nothing was recorded under the old ones
    fixed = main(cfg_for(tmp_path, *BASE))
    assert fixed["output_dir"] == str(run_dir) and fixed["n_samples"] == 4 and (run_dir / "run.json").exists()


def test_a_table_row_is_written_once_per_folder(tmp_path):
    main(cfg_for(tmp_path, *BASE))
    main(cfg_for(tmp_path, *BASE))  # a rerun of the finished run: its row is rewritten, not added
    main(cfg_for(tmp_path, *BASE, "dataset.limit=2"))  # another folder: its own row
    rows = list(csv.DictReader(io.StringIO((tmp_path / "tables" / "detail_toy.csv").read_text())))
    assert len(rows) == 2 and sorted(r["n_samples"] for r in rows) == ["2", "4"]
    assert sorted(r["limit"] for r in rows) == ["", "2"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stopping=confidence", "stopping.n=2"], "stopping.n=2 has no effect with stopping=confidence"),
        (["stopping=spatial_entropy", "stopping.n=3"], "stopping.n=3 has no effect with stopping=spatial_entropy"),
        (["method=vanilla", "stopping=fixed"], "has no effect with method=vanilla"),
        (["dataset=pope_toy", "dataset.split=popula"], "pope_toy has the splits adversarial, popular, random"),
        (["dataset=docvqa_toy", "dataset.protocol=likelihood"], "protocol=likelihood has no effect on docvqa_toy"),
        (["dataset=textvqa", "dataset.toy_n=3"], "toy_n has no effect on textvqa"),
        (["dataset.metric=vqa_acuracy"], "dataset.metric='vqa_acuracy' is none of anls, exact_match"),
        (["dataset.kind=multiple"], "dataset.kind='multiple' is none of open, mc, pope"),
        (["dataset.submission=eval_ai"], "dataset.submission='eval_ai' is none of evalai, gqa, rrc"),
        (["dataset=textvqa_toy", "dataset.boxes.frame=raw"], "dataset.boxes.frame='raw' is none of upright, stored"),
        (["backbone=toy", "method.layer=40"], r"method\.layer must be in 1\.\.2 for .*toy_vlm"),
    ],
)
def test_a_setting_without_effect_or_outside_its_registry_is_refused_before_anything_loads(
    tmp_path, overrides, message
):
    cfg = cfg_for(tmp_path, "backbone=tiny", "dataset=detail_toy", *overrides)
    with pytest.raises(ConfigError, match=message):
        main(cfg)
    assert not (tmp_path / "runs").exists() and not (tmp_path / ".cache").exists()  # nothing built or loaded


def test_a_toy_dataset_reads_dataset_path_when_it_is_given(tmp_path):
    from egg_eval.data.toy import write_toy_subset

    write_toy_subset("docvqa", tmp_path / "mine", n=3, seed=7)
    s = main(
        cfg_for(tmp_path, "backbone=tiny", "dataset=docvqa_toy", "method=vanilla", f"dataset.path={tmp_path / 'mine'}")
    )
    assert s["n_samples"] == 3  # the built-in toy subset has 4 rows
    assert not (tmp_path / ".cache" / "toy").exists()


def _cli(tmp_path, *overrides, env=None):
    return subprocess.run(
        [sys.executable, "-m", "egg_eval", f"output_root={tmp_path}", "progress=false", *overrides],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_a_config_error_is_one_line_without_a_traceback(tmp_path):
    r = _cli(tmp_path, "stopping=confidence", "stopping.n=2")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert r.stderr.startswith("egg_eval: config stopping.n=2 has no effect with stopping=confidence")


def test_a_data_or_folder_error_is_its_message_without_a_traceback(tmp_path):
    r = _cli(tmp_path, "backbone=tiny", "dataset=detail_toy", "dataset.columns.id=qid")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("egg_eval: detail_toy: column 'qid' (for id) missing")


INTERRUPTED = """
import sys
import egg_eval.cli as cli
from egg_eval.runner import RunInterrupted
from pathlib import Path

def main(cfg):
    raise RunInterrupted(Path("/r/records.jsonl"), 3)

cli.main = main
sys.argv = ["egg_eval", "output_root={out}", "progress=false"]
cli.hydra_main()
"""


def test_ctrl_c_ends_with_one_line_saying_how_to_resume(tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", INTERRUPTED.format(out=tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 130 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        "egg_eval: interrupted; 3 records kept in /r/records.jsonl; rerun the same command to resume."
    )


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    interrupt_after(monkeypatch, 3)
    with pytest.raises(RunInterrupted) as e:
        main(cfg_for(tmp_path, *BASE))
    assert e.value.n_records == 3
    s = main(cfg_for(tmp_path, *BASE))
    assert s["n_samples"] == 4 and len(_records(s)) == 4


def test_progress_off_a_terminal_writes_a_line_per_few_percent():
    out = io.StringIO()  # not a tty
    p = Progress("textvqa/egg", total=40, stream=out, step_percent=10)
    for _ in range(40):
        p.update("vqa_accuracy 0.500")
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and lines[0].startswith("textvqa/egg: 4/40 (10%) | vqa_accuracy 0.500 | ")
    assert lines[-1].startswith("textvqa/egg: 40/40 (100%)") and "ETA 00:00" in lines[-1]
    unknown = io.StringIO()
    q = Progress("x", total=None, initial=150, stream=unknown, every_unknown=100)
    for _ in range(60):
        q.update()
    assert unknown.getvalue().splitlines()[0].startswith("x: 200 | ")  # the count, no total


def test_the_total_counts_the_limit_the_sizes_and_the_shard():
    from omegaconf import OmegaConf

    from egg_eval.data.specs import spec_from_config
    from egg_eval.runs import expected_total

    pope = OmegaConf.create(
        {
            "name": "pope",
            "hf_id": "x",
            "split": "all",
            "splits": ["adversarial", "popular", "random"],
            "sizes": {"adversarial": 3000, "popular": 3000, "random": 3000},
            "metric": "pope",
            "kind": "pope",
            "limit": None,
        }
    )
    spec = spec_from_config(pope)
    assert expected_total(pope, spec, (0, 1)) == 9000
    pope.limit = 50
    assert expected_total(pope, spec, (0, 1)) == 150
    assert [expected_total(pope, spec, (i, 4)) for i in range(4)] == [38, 38, 37, 37]  # 150 samples over 4 shards
    pope.sizes = {}
    pope.limit = None
    assert expected_total(pope, spec, (0, 1)) is None
