"""Where a dataset's rows are read from: the hub (streamed) or a local copy (parquet files laid
out as the hub has them, a ``save_to_disk`` folder, or one file)."""

from __future__ import annotations

import glob
import re
from pathlib import Path

from egg_eval.errors import MissingFiles


def _split_dirs(root: Path, config: str | None) -> list[Path]:
    """Where a local copy of a hub dataset keeps a split's parquet files, most specific first:
    ``<config>/`` (``hf download <id> --repo-type dataset --local-dir <root>`` of a dataset with
    configs: lmms-lab's DocVQA/, Full/ of POPE, testdev_balanced_instructions/ of GQA), the
    folder itself, ``data/`` (a dataset without configs)."""
    return [d for d in ([root / config] if config else []) + [root, root / "data"] if d.is_dir()]


ROW_FILES = ("parquet", "jsonl")  # the row files of a local copy, in the order they are looked for


def split_files(root: Path, config: str | None, split: str) -> list[Path]:
    """The row files of ``split`` (parquet, else JSON lines) in the first of :func:`_split_dirs`
    that has any: named ``<split>.<ext>`` or ``<split>-NNNNN-of-NNNNN.<ext>`` as the hub names
    them (so that split ``test`` never takes ``testdev-*``), else, for other layouts,
    ``<split>_*.<ext>`` (V*'s ``test_questions.jsonl``) or ``<split>.*.<ext>`` (never a longer
    split's name: ``test`` is not ``testdev``)."""
    s = glob.escape(split)
    for patterns in ((f"{s}.{{}}", f"{s}-*.{{}}"), (f"{s}_*.{{}}", f"{s}.*.{{}}")):
        for ext in ROW_FILES:
            for d in _split_dirs(root, config):
                files = sorted({f for pattern in patterns for f in d.glob(pattern.format(ext))})
                if files:
                    return files
    return []


def open_stream(
    source: str,
    config: str | None,
    split: str,
    revision: str | None,
    path: str | None,
    columns: list[str] | None = None,
):
    """The rows of ``split``, streamed: from the hub (``source``, ``config``, ``revision``) or
    from the local copy at ``path``. ``columns``: read only these (a parquet source reads no
    other column at all, images included); elsewhere the others are dropped after reading."""
    from datasets import load_dataset, load_from_disk

    if path:
        p = Path(path)
        if not p.exists():
            raise MissingFiles(f"dataset.path {path} does not exist")
        if p.is_dir() and (p / split).is_dir() and any((p / split).glob("*.arrow")):
            return _only(load_from_disk(str(p / split)).to_iterable_dataset(), columns)
        if p.is_dir() and (p / "dataset_info.json").exists():
            return _only(load_from_disk(str(p)).to_iterable_dataset(), columns)
        files = split_files(p, config, split) if p.is_dir() else [p]
        if not files:
            dirs = _split_dirs(p, config)
            there = sorted(
                {re.sub(r"-\d+-of-\d+$", "", f.stem) for d in dirs for ext in ROW_FILES for f in d.glob(f"*.{ext}")}
            )
            raise MissingFiles(
                f"no {split}.parquet or {split}-*.parquet in {', '.join(str(d) for d in dirs)}"
                + (
                    f"; the splits there: {', '.join(there)} (dataset.split=...)"
                    if there
                    else "; no parquet files there"
                )
            )
        builder = "json" if files[0].suffix == ".jsonl" else "parquet"
        kw = {"columns": columns} if columns and builder == "parquet" else {}
        ds = load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True, **kw)
        return ds if kw else _only(ds, columns)
    if columns:
        try:  # a parquet dataset on the hub reads only these columns' bytes
            return load_dataset(source, config, split=split, revision=revision, streaming=True, columns=columns)
        except (TypeError, ValueError):  # a builder without the option
            pass
    return _only(load_dataset(source, config, split=split, revision=revision, streaming=True), columns)


def _only(ds, columns: list[str] | None):
    if not columns:
        return ds
    features = getattr(ds, "features", None)
    if features is not None:  # an image column left out is never decoded
        return ds.select_columns([c for c in columns if c in features])
    return ds  # types unknown until read: nothing is decoded as an image either


def no_decode(ds, column: str):
    from datasets import Image as ImageFeature

    features = getattr(ds, "features", None)
    if features is not None and column in features and isinstance(features[column], ImageFeature):
        return ds.cast_column(column, ImageFeature(decode=False))
    return ds
