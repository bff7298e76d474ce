"""Turn results/tables/*.csv into paper-style tables (Markdown and CSV).

    python scripts/make_tables.py [--results results] [--by top_k]

Rows: method settings (one row per distinct setting of the ablated key, or per
backbone/method/stopping), columns: datasets, cells: the score of the latest run.
"""

from __future__ import annotations

import argparse
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


def table(df: pd.DataFrame, by: str | None) -> pd.DataFrame:
    keys = ["backbone", "method"] + (ABLATIONS[by] if by else ["stopping"])
    df = df.copy()
    df["score"] = 100 * df["score"]
    for k in keys:
        df[k] = df[k].fillna("-").astype(str)
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


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
