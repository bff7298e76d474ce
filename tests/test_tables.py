"""Paired statistics between two runs, and the paper's tables built from run folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from egg_eval.compare import compare_runs, mcnemar, paired_difference
from egg_eval.records import flatten
from egg_eval.tables import TABLES, build, egg_defaults, load_runs
from egg_eval.tables import main as tables_main


def test_mcnemar_is_the_exact_binomial_test_on_the_discordant_pairs():
    a = np.array([1] * 10 + [0] * 2 + [1] * 5 + [0] * 3)
    b = np.array([0] * 10 + [1] * 2 + [1] * 5 + [0] * 3)
    n10, n01, p = mcnemar(a, b)
    # two-sided exact p for 10 vs 2 discordant pairs: 2 * P(X <= 2), X ~ Bin(12, 1/2)
    assert (n10, n01) == (10, 2) and p == pytest.approx(2 * (1 + 12 + 66) / 2**12)
    assert mcnemar(a, a) == (0, 0, 1.0)


def test_the_paired_bootstrap_ci_is_seeded_and_close_to_the_normal_one():
    rng = np.random.default_rng(3)
    a, b = rng.random(2000), rng.random(2000) - 0.05
    lo, hi = paired_difference(a, b, resamples=4000, seed=1)
    d = a - b
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    assert lo == pytest.approx(d.mean() - half, abs=0.15 * half) and hi == pytest.approx(
        d.mean() + half, abs=0.15 * half
    )
    assert (lo, hi) == paired_difference(a, b, resamples=4000, seed=1)  # the same seed, the same CI
    assert paired_difference(np.ones(5), np.zeros(5)) == (1.0, 1.0)  # no spread: the difference itself


def _run(
    root: Path,
    dataset: str,
    method: dict,
    scores: dict[str, float],
    sample_set: str = "validation",
    backbone: str = "llava16",
    metric: str = "exact_match",
    stopping: dict | None = None,
) -> Path:
    """A finished run folder as the runner writes it, without running a model."""
    name = method.get("name", "egg")
    settings = {"method": method, "stopping": stopping or {"name": "spatial_entropy", "n": None}, "dataset": {}}
    if name == "egg":
        settings["method"] = {
            **{k[len("method.") :]: v for k, v in egg_defaults(1.5).items() if k.startswith("method.")},
            **method,
        }
    out = root / "runs" / dataset / sample_set / backbone / f"{name}_{len(list(root.glob('runs/**/summary.json')))}"
    out.mkdir(parents=True)
    (out / "records.jsonl").write_text(
        "".join(json.dumps({"id": i, "metrics": {metric: v}, "error": None}) + "\n" for i, v in scores.items())
    )
    limit = int(sample_set.split("first")[1]) if "first" in sample_set else None
    summary = {
        "dataset": dataset,
        "backbone": backbone,
        "metric": metric,
        "score": sum(scores.values()) / len(scores),
        "n_samples": len(scores),
        "n_scored": len(scores),
        "sample_set": {"split": sample_set.split("-")[0], "subsets": None, "limit": limit},
        "mean_time_s": 1.0 if name == "vanilla" else 3.0,
        "config": {"backbone": {"sigma": None}, "method": settings["method"]},
        "fingerprint": {"settings": flatten(settings)},
    }
    (out / "summary.json").write_text(json.dumps(summary))
    return out


def _scores(n_right: int, n: int = 100, offset: int = 0) -> dict[str, float]:
    return {f"q{i}": float((i + offset) % n < n_right) for i in range(n)}


def test_compare_pairs_the_samples_of_two_runs(tmp_path):
    a = _run(tmp_path, "pope", {"name": "egg"}, _scores(70))
    b = _run(tmp_path, "pope", {"name": "vanilla"}, _scores(50))
    c = compare_runs(a, b, resamples=2000)
    assert (c.n, c.score_a, c.score_b) == (100, 0.70, 0.50) and c.diff == pytest.approx(0.20)
    assert (c.discordant_a, c.discordant_b) == (20, 0) and c.mcnemar_p == pytest.approx(2 * 0.5**20)
    assert c.significant and c.ci_low > 0.1
    same = compare_runs(b, b)
    assert same.diff == 0 and (same.ci_low, same.ci_high) == (0, 0) and not same.significant
    r = subprocess.run(
        [sys.executable, "-m", "egg_eval.compare", str(a), str(b), "--resamples", "2000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "A - B = +20.00 points, 95% CI [+" in r.stdout and "the CI excludes 0" in r.stdout
    assert "exact McNemar: A right and B wrong on 20, B right and A wrong on 0" in r.stdout


def test_compare_refuses_runs_of_two_benchmarks(tmp_path):
    a = _run(tmp_path, "pope", {"name": "egg"}, _scores(70), metric="pope")
    b = _run(tmp_path, "docvqa", {"name": "vanilla"}, _scores(50), metric="anls")
    with pytest.raises(ValueError, match="different metrics"):
        compare_runs(a, b)
    r = subprocess.run(
        [sys.executable, "-m", "egg_eval.compare", str(a), str(tmp_path)], capture_output=True, text=True
    )
    assert r.returncode == 2 and "not a finished run folder" in r.stderr


def test_table_cells_are_one_run_each_matched_by_their_settings(tmp_path):
    for ds in ("pope", "vstar", "docvqa", "rwqa"):
        _run(tmp_path, ds, {"name": "vanilla"}, _scores(50))
        _run(tmp_path, ds, {"name": "egg"}, _scores(80))  # K = 2, the default
        _run(tmp_path, ds, {"name": "egg", "top_k": 1}, _scores(52))
    _run(tmp_path, "pope", {"name": "egg", "sigma": 0.5}, _scores(99))  # another sigma: in no cell
    headers, rows, notes = build(TABLES["table4"], load_runs(tmp_path), "llava16")
    assert headers == ["Method", "POPE", "V*", "DocVQA", "RWQA"]
    assert rows[0] == ["Base", "50.00", "50.00", "50.00", "50.00"]
    assert rows[1] == ["1 added", "52.00", "52.00", "52.00", "52.00"]  # 2 more right of 100: the CI holds 0
    assert rows[2] == ["2 added", "80.00*", "80.00*", "80.00*", "80.00*"]
    assert rows[3][1:] == ["-"] * 4 and rows[-1] == ["n", "100", "100", "100", "100"] and notes == []


def test_a_column_of_different_sample_sets_says_so_in_its_cells(tmp_path):
    _run(tmp_path, "docvqa", {"name": "vanilla"}, _scores(50))
    _run(tmp_path, "docvqa", {"name": "egg"}, _scores(40, n=50), sample_set="validation-first50")
    _run(tmp_path, "textvqa", {"name": "vanilla"}, _scores(10, n=20), sample_set="validation-first20")
    _run(tmp_path, "textvqa", {"name": "vanilla"}, _scores(50))  # the whole split beats its first 20
    _run(tmp_path, "textvqa", {"name": "egg"}, _scores(60))
    headers, rows, notes = build(TABLES["table1"], load_runs(tmp_path), "llava16")
    col = headers.index("DocVQA")
    assert rows[0][col] == "50.00 (n=100)" and rows[1][col].startswith("80.00") and rows[1][col].endswith("(n=50)")
    assert rows[0][headers.index("TextVQA")] == "50.00" and rows[1][headers.index("TextVQA")] == "60.00*"
    assert rows[2][0] == "Δ" and rows[2][headers.index("TextVQA")] == "+10.00*"
    assert any(n.startswith("DocVQA: its cells were computed on different sample sets") for n in notes)
    assert all(r[0] != "n" for r in rows)  # no single n per column to give


def test_make_tables_writes_markdown_csv_and_latex(tmp_path, capsys):
    for ds in ("textvqa", "docvqa"):
        for t in (1, 2):
            _run(tmp_path, ds, {"name": "egg", "token_index": t}, _scores(60 - t))
    tables_main(["--results", str(tmp_path)])
    out = tmp_path / "tables" / "paper"
    # the default EGG run (t = 1) is a row of every table; Table 6 also has its t = 2 column
    assert {"table6.csv", "table6.md", "table6.tex", "table1.md"} <= {p.name for p in out.iterdir()}
    md = (out / "table6.md").read_text()
    assert "| Dataset   |   First |   Second |   Third |   Fourth |" in md and "| TextVQA   |   59.00 |" in md
    assert (out / "table6.tex").read_text().startswith("\\begin{tabular}") and "\\toprule" in (
        out / "table6.tex"
    ).read_text()
    assert (out / "table6.csv").read_text().splitlines()[0] == "Dataset,First,Second,Third,Fourth"
    assert "Table 6" in capsys.readouterr().out
