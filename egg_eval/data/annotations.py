"""Annotation files beside each image, as V* Bench keeps them.

craigwu/vstar_bench (the original benchmark) lists its questions in ``test_questions.jsonl``
(``image`` = a path inside the repository such as ``direct_attributes/sa_4690.jpg``, ``text``
= the question with its lettered options, ``label``, ``category``, ``question_id``) and keeps
beside each image a JSON file of the same name, ``direct_attributes/sa_4690.json``, with the
target objects (``target_object``), their boxes (``bbox``, [x, y, w, h] pixels), the bare
``question`` and the ``options``, the correct one first: what its ``vstar_bench_eval.py`` scores
by likelihood. ``dataset.annotations: .json`` reads that file for each row: its boxes give IoU
and hit rate, and under ``dataset.protocol=likelihood`` its question and options are the
sample's (the correct option is then A).
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from egg_eval.data.benchmarks import BenchmarkSpec, Sample


class RepoFiles:
    """Files of a dataset repository, by their path inside it: from a local copy (``root``,
    ``hf download <repo> --repo-type dataset --local-dir <root>``) or fetched one at a time from
    the hub at ``revision`` (into the hub's cache, so a rerun fetches nothing)."""

    def __init__(self, repo: str, revision: str | None, root: Path | None):
        self.repo, self.revision, self.root = repo, revision, root

    def local(self, rel: str) -> Path:
        if self.root is not None:
            return self.root / rel
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(self.repo, rel, repo_type="dataset", revision=self.revision))


def _xyxy(b) -> list[float]:
    x, y, w, h = (float(v) for v in b)
    return [x, y, x + w, y + h]


def annotate(sample: Sample, files: RepoFiles, spec: BenchmarkSpec) -> None:
    """Point ``sample``'s image at its file and read its annotation file (``spec.annotations``:
    the suffix that replaces the image's); a missing or unreadable one fails the sample."""
    image = str(sample.raw)
    rel = str(PurePosixPath(image).with_suffix(spec.annotations or ".json"))
    try:
        sample.raw = str(files.local(image).absolute())  # not joined to dataset.path a second time
        ann = json.loads(files.local(rel).read_text())
        boxes = ann.get("bbox") or []
        boxes = boxes if boxes and isinstance(boxes[0], (list, tuple)) else [boxes] if boxes else []
        sample.bbox = [_xyxy(b) for b in boxes if b is not None and len(b) == 4] or None
        if spec.protocol == "likelihood":  # V*'s official protocol: the bare question, its options
            sample.question, sample.answers = str(ann["question"]), ["A"]
            sample.options = [str(o) for o in ann["options"]]
    except Exception as e:  # recorded per sample; the stream goes on
        sample.error = f"{type(e).__name__}: annotation {rel}: {e}"
