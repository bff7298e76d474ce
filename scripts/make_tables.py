"""Turn results/tables/*.csv into paper-style tables (Markdown and CSV).

    python scripts/make_tables.py [--results results] [--by top_k]

Rows: method settings (one row per distinct setting of the ablated key, or per
backbone/method/stopping), columns: datasets, cells: the score of the latest run.
Any other recorded setting that differs between runs of one row (say two top_k in the main
table) becomes a row key too, so that runs with different settings never share a cell.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

ABLATIONS = {
    "stopping": ["stopping", "n_rounds"],
    "objective": ["objective"],
    "top_k": ["top_k"],
    "layer": ["layer"],
    "token_index": ["token_index"],
}


def load(results: Path) -> pd.DataFrame:
    files = sorted((results / "tables").glob("*.csv"))
    if not files:
        raise SystemExit(f"no tables under {results / 'tables'}: run python -m egg_eval first")
    df = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    return df.sort_values("finished").groupby(["dataset", "backbone", "output_dir"], as_index=False).last()


SETTINGS = ["stopping", "n_rounds", "objective", "top_k", "layer", "token_index", "sigma"]  # as the rows record


def table(df: pd.DataFrame, by: str | None) -> pd.DataFrame:
    keys = ["backbone", "method"] + (ABLATIONS[by] if by else ["stopping"])
    df = df.copy()
    df["score"] = 100 * df["score"]
    settings = [k for k in SETTINGS if k in df]
    for k in dict.fromkeys([*keys, *settings]):
        df[k] = df[k].map(_label)
    cells = df.groupby([*keys, "dataset"])
    keys += [k for k in settings if k not in keys and cells[k].nunique().max() > 1]
    out = df.pivot_table(index=keys, columns="dataset", values="score", aggfunc="last")
    t = df.groupby(keys)["mean_time_s"].mean().rename("time (s)")
    return out.join(t).round(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="results", type=Path)
    ap.add_argument("--by", choices=sorted(ABLATIONS), default=None, help="the ablated setting (one table per key)")
    args = ap.parse_args()
    t = table(load(args.results), args.by)
    name = f"table_{args.by or 'main'}"
    t.to_csv(args.results / f"{name}.csv")
    md = t.to_markdown() if _has_tabulate() else t.to_string()
    (args.results / f"{name}.md").write_text(md + "\n")
    print(md)


def _label(v) -> str:
    """A setting as a row label: '-' where the run had none, 2 rather than 2.0."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
