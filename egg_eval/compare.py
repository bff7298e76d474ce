"""Is a difference between two runs noise? ``python -m egg_eval.compare RUN_A RUN_B``.

Two run folders of one benchmark (any two methods or settings) are compared on the samples both
hold, matched by id: each run's score, the difference A - B with a paired bootstrap 95% CI
(``scipy.stats.bootstrap``, percentile, seeded), and, for a 0/1 metric (exact match, multiple
choice, POPE), the exact McNemar test on the discordant pairs (``scipy.stats.binomtest``). A
failed sample counts as wrong in both, as in the scores. The score compared is the mean of the
per-sample scores: every benchmark's headline, POPE's too when its sub-splits are of one size
(as they are: 3,000 each, or ``dataset.limit`` of each).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from egg_eval.records import RECORDS, read_records
from egg_eval.scoring import METRICS

CONFIDENCE = 0.95


@dataclass
class Comparison:
    metric: str
    n: int  # samples both runs hold (and score)
    only_a: int
    only_b: int
    score_a: float  # on the shared samples, 0..1
    score_b: float
    diff: float  # score_a - score_b
    ci_low: float
    ci_high: float
    resamples: int
    seed: int
    discordant_a: int | None = None  # 0/1 metrics: A right, B wrong
    discordant_b: int | None = None  # B right, A wrong
    mcnemar_p: float | None = None

    @property
    def significant(self) -> bool:
        """The CI of the difference excludes 0."""
        return self.ci_low > 0 or self.ci_high < 0


def paired_difference(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """The paired bootstrap CI of mean(a) - mean(b): samples resampled as pairs."""
    d = np.asarray(a, float) - np.asarray(b, float)
    if len(d) < 2 or np.all(d == d[0]):  # no spread: the difference is exactly what it is
        return float(d.mean()), float(d.mean())
    res = stats.bootstrap(
        (d,), np.mean, confidence_level=CONFIDENCE, n_resamples=resamples, method="percentile", random_state=seed
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def mcnemar(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """Exact McNemar on 0/1 scores: (A right B wrong, B right A wrong, two-sided p)."""
    ra, rb = np.asarray(a) >= 0.5, np.asarray(b) >= 0.5
    n10, n01 = int(np.sum(ra & ~rb)), int(np.sum(~ra & rb))
    p = 1.0 if n10 + n01 == 0 else float(stats.binomtest(n10, n10 + n01, 0.5).pvalue)
    return n10, n01, p


def _scores(run: Path) -> tuple[str, dict[str, float]]:
    summary = json.loads((run / "summary.json").read_text())
    metric = summary["metric"]
    scores = {r["id"]: r["metrics"].get(metric) for r in read_records(run / RECORDS)}
    return metric, {k: v for k, v in scores.items() if v is not None}


def compare_runs(run_a: str | Path, run_b: str | Path, resamples: int = 10_000, seed: int = 0) -> Comparison:
    """A against B on the samples both scored."""
    for run in (run_a, run_b):
        if not (Path(run) / "summary.json").exists():
            raise FileNotFoundError(f"{run} is not a finished run folder (no summary.json)")
    metric, a = _scores(Path(run_a))
    metric_b, b = _scores(Path(run_b))
    if metric != metric_b:
        raise ValueError(f"the runs score different metrics ({metric} and {metric_b}): not one benchmark")
    ids = [i for i in a if i in b]
    if not ids:
        raise ValueError(
            "the runs share no scored sample (another benchmark or split, or a test split without answers)"
        )
    xa, xb = np.array([a[i] for i in ids]), np.array([b[i] for i in ids])
    lo, hi = paired_difference(xa, xb, resamples, seed)
    out = Comparison(
        metric, len(ids), len(a) - len(ids), len(b) - len(ids), float(xa.mean()), float(xb.mean()),
        float(xa.mean() - xb.mean()), lo, hi, resamples, seed,
    )  # fmt: skip
    if METRICS[metric].binary:
        out.discordant_a, out.discordant_b, out.mcnemar_p = mcnemar(xa, xb)
    return out


def report(c: Comparison, run_a: str, run_b: str) -> str:
    pts = 100
    lines = [
        f"A {run_a}: {c.metric} {pts * c.score_a:.2f}",
        f"B {run_b}: {c.metric} {pts * c.score_b:.2f}",
        f"on the {c.n} samples both hold"
        + (
            f" (A has {c.only_a} more, B {c.only_b} more: scores differ from the runs' own)"
            if c.only_a or c.only_b
            else ""
        ),
        f"A - B = {pts * c.diff:+.2f} points, {int(100 * CONFIDENCE)}% CI "
        f"[{pts * c.ci_low:+.2f}, {pts * c.ci_high:+.2f}] (paired bootstrap, {c.resamples} resamples, seed {c.seed})"
        + (": the CI excludes 0" if c.significant else ": the CI includes 0"),
    ]
    if c.mcnemar_p is not None:
        lines.append(
            f"exact McNemar: A right and B wrong on {c.discordant_a}, B right and A wrong on {c.discordant_b}, "
            f"p = {c.mcnemar_p:.4g}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m egg_eval.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_a", help="a run folder (results/runs/<dataset>/<sample set>/<backbone>/<run id>)")
    ap.add_argument("run_b", help="another run folder of the same benchmark")
    ap.add_argument("--resamples", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = ap.parse_args(argv)
    try:
        c = compare_runs(args.run_a, args.run_b, args.resamples, args.seed)
    except (FileNotFoundError, ValueError) as e:
        ap.exit(2, f"{ap.prog}: {e}\n")
    print(
        json.dumps({**asdict(c), "significant": c.significant}, indent=1)
        if args.json
        else report(c, args.run_a, args.run_b)
    )


if __name__ == "__main__":
    sys.exit(main())
