"""The ``dataset`` config group as a :class:`~egg_eval.data.benchmarks.BenchmarkSpec` (used by the
CLI, the shard merge and the scripts)."""

from __future__ import annotations

from egg_eval.data.benchmarks import BenchmarkSpec


def _boxes_kwargs(boxes) -> dict:
    """``dataset.boxes`` (a side dataset of evidence boxes joined by id) -> BenchmarkSpec fields."""
    if not boxes:
        return {}
    return {
        "boxes_id": boxes.get("hf_id"),
        "boxes_split": boxes.get("split", "train"),
        "boxes_key": boxes.get("key", "dataset_id"),
        "boxes_column": boxes.get("column", "bbox"),
        "boxes_format": boxes.get("format", "xywh"),
        "boxes_frame": boxes.get("frame", "upright"),
        "boxes_path": boxes.get("path"),
    }


def chosen_splits(d) -> tuple[str, tuple[str, ...]]:
    """``(split, sub-splits)`` of a ``dataset`` group: a benchmark of sub-splits scored apart
    (POPE's ``splits``) takes those ``dataset.split`` names: ``all`` (the default), one, or a
    list, named in the run's folder as ``all``, ``popular`` or ``adversarial+random``."""
    subsets = tuple(d.get("splits") or ())
    split = d["split"]
    if not subsets:
        return str(split), ()
    chosen = subsets if split in (None, "all") else (split,) if isinstance(split, str) else tuple(split)
    return ("all" if chosen == subsets else "+".join(chosen)), chosen


def spec_from_config(d) -> BenchmarkSpec:
    """The ``dataset`` config group (a DictConfig or a dict) as a :class:`BenchmarkSpec`."""
    split, subsets = chosen_splits(d)
    return BenchmarkSpec(
        name=d["name"],
        hf_id=d["hf_id"],
        split=split,
        metric=d["metric"],
        kind=d["kind"],
        config_name=d.get("config_name"),
        revision=d.get("revision"),
        columns=dict(d.get("columns") or {}),
        splits=subsets,
        images_id=d.get("images_id"),
        images_config=d.get("images_config"),
        images_split=d.get("images_split"),
        submission=d.get("submission"),
        protocol=d.get("protocol") or "generate",
        annotations=d.get("annotations"),
        bbox_format=d.get("bbox_format", "xyxy"),
        max_pixels=d.get("max_pixels"),
        **_boxes_kwargs(d.get("boxes")),
    )
