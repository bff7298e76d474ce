"""The paper's Tables 1-6 from the run folders: ``python -m egg_eval.tables`` (``make tables``).

Each cell is one run folder (``results/runs/<dataset>/<sample set>/<backbone>/<run id>/``, its
``summary.json``): the run of that benchmark and backbone whose method settings are the row's
(the paper's defaults, Sec. 4.3, but for the ablated one). Where several sample sets of a cell
were run, the largest is taken (a whole split before its first N). A column whose cells were
computed on different sample sets says so in each of its cells, ``(n=50)``; otherwise its ``n``
is in the last row. A difference from the table's reference row (Base, or the paper's default
setting) whose paired bootstrap 95% CI excludes 0 is marked ``*`` (:mod:`egg_eval.compare`).
Markdown (pipes), CSV and LaTeX (booktabs) are written side by side.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabulate import tabulate

from egg_eval.compare import compare_runs
from egg_eval.config import EggSchema, StoppingSchema, defaults
from egg_eval.files import write_atomic
from egg_eval.records import flatten

BENCHMARKS = {  # column names as the paper prints them
    "textvqa": "TextVQA",
    "vstar": "V*",
    "docvqa": "DocVQA",
    "pope": "POPE",
    "infovqa": "InfoQA",
    "gqa": "GQA",
    "rwqa": "RWQA",
}
ABLATED = ["pope", "vstar", "docvqa", "rwqa"]  # Tabs. 2-5
BASE: dict[str, Any] = {"method.name": "vanilla"}


@dataclass
class Table:
    title: str
    rows: list[tuple[str, dict[str, Any]]]  # label, the settings that differ from EGG's defaults
    columns: list[str]
    reference: str  # the row the others are tested against
    time_column: bool = False
    transposed: bool = False  # Tab. 6: a row per benchmark, a column per setting


TABLES = {
    "table1": Table(
        "Table 1: base model and EGG on seven benchmarks",
        [("Base model", BASE), ("+ Ours", {})],
        list(BENCHMARKS),
        "Base model",
    ),
    "table2": Table(
        "Table 2: stopping criteria",
        [
            ("Base", BASE),
            ("Spatial Entropy", {}),
            ("Confidence", {"stopping.name": "confidence"}),
            ("1 Iteration", {"stopping.name": "fixed", "stopping.n": 1}),
            ("2 Iterations", {"stopping.name": "fixed", "stopping.n": 2}),
            ("3 Iterations", {"stopping.name": "fixed", "stopping.n": 3}),
        ],
        ABLATED,
        "Base",
        time_column=True,
    ),
    "table3": Table(
        "Table 3: objective for the gradient",
        [
            ("Entropy", {}),
            ("Entropy Top-P", {"method.objective": "entropy_top_p"}),
            ("Maximum Probability", {"method.objective": "max_prob"}),
        ],
        ABLATED,
        "Entropy",
    ),
    "table4": Table(
        "Table 4: regions added (K)",
        [("Base", BASE)] + [(f"{k} added", {"method.top_k": k}) for k in (1, 2, 3, 4)],
        ABLATED,
        "Base",
    ),
    "table5": Table(
        "Table 5: layer of the gradient (logit lens)",
        [(f"Layer {n}", {"method.layer": n}) for n in (15, 20, 26)] + [("Last layer", {})],
        ABLATED,
        "Last layer",
    ),
    "table6": Table(
        "Table 6: decoding step t of the loss",
        [(name, {"method.token_index": t}) for t, name in enumerate(["First", "Second", "Third", "Fourth"], 1)],
        ["textvqa", "docvqa"],
        "First",
        transposed=True,
    ),
}
COMPARED = ("method.", "stopping.", "dataset.protocol")  # the settings a cell's run must match
SIGNIFICANCE = "\\* the paired bootstrap 95% CI of the difference from the reference row excludes 0"


def egg_defaults(sigma: float) -> dict[str, Any]:
    """The result-affecting settings of EGG's defaults (``egg_eval.config``: the paper's);
    ``sigma`` the backbone's (the method's default follows it)."""
    method = {**defaults(EggSchema), "sigma": sigma}
    return {**flatten({"method": method, "stopping": defaults(StoppingSchema)}), "dataset.protocol": "generate"}


@dataclass
class Run:
    path: Path
    summary: dict

    @property
    def settings(self) -> dict[str, Any]:
        s = flatten(self.summary.get("fingerprint", {}).get("settings", {}))
        s = {k: v for k, v in s.items() if k.startswith(COMPARED)}
        s.setdefault("dataset.protocol", "generate")
        return s

    @property
    def n(self) -> int:
        return int(self.summary.get("n_scored", self.summary["n_samples"]))

    @property
    def sample_set(self) -> str:
        ss = self.summary.get("sample_set") or {}
        return f"{ss.get('split', self.summary.get('split'))}" + (f"-first{ss['limit']}" if ss.get("limit") else "")


def load_runs(results: Path) -> list[Run]:
    runs = []
    for p in sorted((results / "runs").glob("**/summary.json")):
        if p.parent.name.startswith("shard-"):  # a shard's own summary: its merge is the run
            continue
        runs.append(Run(p.parent, json.loads(p.read_text())))
    return runs


def matches(run: Run, want: dict[str, Any]) -> bool:
    """``run``'s result-affecting settings are ``want``'s, where it has them (the execution
    settings are not among them: they change no record)."""
    have = run.settings
    return have.get("method.name") == want["method.name"] and all(have[k] == v for k, v in want.items() if k in have)


def pick(runs: list[Run], dataset: str, backbone: str, want: dict[str, Any]) -> Run | None:
    """The cell's run: the largest sample set, then the newest."""
    found = [
        r for r in runs if r.summary["dataset"] == dataset and r.summary["backbone"] == backbone and matches(r, want)
    ]
    return max(found, key=lambda r: (r.n, (r.path / "summary.json").stat().st_mtime), default=None)


def wanted(rows_override: dict[str, Any], sigma: float) -> dict[str, Any]:
    if rows_override.get("method.name") == "vanilla":
        return {"method.name": "vanilla", "dataset.protocol": "generate"}
    return {**egg_defaults(sigma), **rows_override}


def _sigma(runs: list[Run], backbone: str) -> float:
    """The smoothing EGG's default takes on ``backbone`` (``backbone.sigma``, else 1.5)."""
    for r in runs:
        if r.summary["backbone"] == backbone:
            return r.summary["config"].get("backbone", {}).get("sigma") or 1.5
    return 1.5


def build(
    table: Table, runs: list[Run], backbone: str, suffix: str = ""
) -> tuple[list[str], list[list[str]], list[str]]:
    """Headers, rows of cells and notes of one table for one backbone."""
    sigma = _sigma(runs, backbone)
    cells: dict[tuple[str, str], Run | None] = {}
    for label, override in table.rows:
        for col in table.columns:
            cells[label, col] = pick(runs, col + suffix, backbone, wanted(override, sigma))
    notes, ns = [], {}
    for col in table.columns:
        ns[col] = {(c.sample_set, c.n) for (_, c2), c in cells.items() if c2 == col and c is not None}
        if len(ns[col]) > 1:
            sets = ", ".join(f"{s} n={n}" for s, n in sorted(ns[col]))
            notes.append(f"{BENCHMARKS.get(col, col)}: its cells were computed on different sample sets ({sets})")

    def text(label: str, col: str) -> str:
        run = cells[label, col]
        if run is None or run.summary.get("score") is None:
            return "-"
        out = f"{100 * run.summary['score']:.2f}"
        base = cells[table.reference, col] if label != table.reference else None
        if base is not None and base.summary.get("score") is not None:
            try:
                if compare_runs(run.path, base.path).significant:
                    out += "*"
            except ValueError:
                pass
        return out + (f" (n={run.n})" if len(ns[col]) > 1 else "")

    labels = [label for label, _ in table.rows]
    if table.transposed:
        headers = ["Dataset", *labels]
        rows = [[BENCHMARKS.get(col, col)] + [text(label, col) for label in labels] for col in table.columns]
        return headers, rows, notes
    headers = ["Method", *(BENCHMARKS.get(c, c) for c in table.columns)] + (["Time (s)"] if table.time_column else [])
    rows = []
    for label in labels:
        row = [label] + [text(label, col) for col in table.columns]
        if table.time_column:
            times = [cells[label, c].summary.get("mean_time_s") for c in table.columns if cells[label, c] is not None]
            times = [t for t in times if t is not None]
            row.append(f"{sum(times) / len(times):.2f}" if times else "-")
        rows.append(row)
    if table is TABLES["table1"]:
        base, ours = rows[0], rows[1]
        rows.append(["Δ"] + [_delta(o, b) for o, b in zip(ours[1:], base[1:])])
    if all(len(ns[c]) <= 1 for c in table.columns):
        n_row = ["n"] + [str(next(iter(ns[c]))[1]) if ns[c] else "-" for c in table.columns]
        rows.append(n_row + ([""] if table.time_column else []))
    return headers, rows, notes


def _delta(ours: str, base: str) -> str:
    try:
        d = float(ours.split()[0].rstrip("*")) - float(base.split()[0].rstrip("*"))
    except ValueError:
        return "-"
    return f"{d:+.2f}" + ("*" if ours.split()[0].endswith("*") else "")


def write(name: str, title: str, headers: list[str], rows: list[list[str]], notes: list[str], out: Path) -> str:
    align = ("left",) + ("right",) * (len(headers) - 1)
    md = f"{title}\n\n{tabulate(rows, headers=headers, tablefmt='pipe', disable_numparse=True, colalign=align)}\n"
    md += "".join(f"\n- {n}" for n in [SIGNIFICANCE, *notes]) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"{name}.md", md)
    text = io.StringIO(newline="")
    csv.writer(text).writerows([headers, *rows])
    write_atomic(out / f"{name}.csv", text.getvalue())
    tex = tabulate(rows, headers=headers, tablefmt="latex_booktabs", disable_numparse=True, colalign=align)
    write_atomic(out / f"{name}.tex", tex.replace("Δ", r"$\Delta$") + "\n")
    return md


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m egg_eval.tables", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="results", type=Path, help="the output_root the runs went to")
    ap.add_argument("--backbone", action="append", help="backbone name(s) (default: every one with runs)")
    ap.add_argument("--tables", default=",".join(TABLES), help="which tables, e.g. table1,table4")
    ap.add_argument("--suffix", default="", help="a suffix of every benchmark's name (_toy: the offline subsets)")
    ap.add_argument("--out", default=None, type=Path, help="default: <results>/tables/paper")
    args = ap.parse_args(argv)
    runs = load_runs(args.results)
    if not runs:
        ap.exit(2, f"{ap.prog}: no finished runs under {args.results / 'runs'}: run python -m egg_eval first\n")
    backbones = args.backbone or sorted({r.summary["backbone"] for r in runs})
    out = args.out or args.results / "tables" / "paper"
    for name in args.tables.split(","):
        table = TABLES[name]
        for backbone in backbones:
            headers, rows, notes = build(table, runs, backbone, args.suffix)
            if all(c == "-" for row in rows for c in row[1:] if row[0] not in ("n", "Δ")):
                continue  # nothing run for this table on this backbone
            stem = name if len(backbones) == 1 else f"{name}_{backbone}"
            print(write(stem, f"{table.title} ({backbone})", headers, rows, notes, out))


if __name__ == "__main__":
    main()
