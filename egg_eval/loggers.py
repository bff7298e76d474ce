"""wandb logging that can never stop a run: every call is guarded, and a failed init
turns the logger into a no-op with a warning.

A run folder keeps one wandb run: its id is stored in the folder at the first start
(:func:`folder_run_id`), so a run resumed after a kill logs into the same wandb run
(``resume="allow"``), and its final table holds every record, not only this process's."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from egg_eval.files import write_atomic

log = logging.getLogger(__name__)

ID_FILE = "wandb_run_id"


def folder_run_id(out: Path) -> str:
    """The wandb run id of run folder ``out``: made and stored there at its first start, read
    back on every resume (a deleted folder starts a new wandb run, not an old one's)."""
    path = Path(out) / ID_FILE
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:16]
    write_atomic(path, run_id)
    return run_id


COLUMNS = ("id", "question", "prediction", "answers", "score", "stop_reason", "time_s", "error")


class WandbLogger:
    def __init__(
        self,
        project: str,
        config: dict,
        name: str | None = None,
        mode: str | None = None,
        entity: str | None = None,
        run_id: str | None = None,
    ):
        self.run = None
        try:
            import wandb

            self.wandb = wandb
            self.run = wandb.init(
                project=project,
                entity=entity,
                name=name,
                config=config,
                id=run_id,
                resume="allow" if run_id else None,
                mode=mode or os.environ.get("WANDB_MODE", "online"),
                settings=wandb.Settings(init_timeout=60, silent=True),
            )
        except Exception as e:  # unreachable server, no login, ...: keep going without wandb
            log.warning("wandb disabled for this run: %s", e)
            self.run = None

    def log_record(self, rec: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.log({"time_s": rec["time_s"], "n_backward": rec["n_backward"]})
        except Exception as e:
            log.warning("wandb log failed: %s", e)

    def log_picture(self, sample_id: str, path) -> None:
        """The sample's figure (saliency overlay, boxes per round) as a wandb Image."""
        if self.run is None:
            return
        try:
            self.run.log({"pictures": self.wandb.Image(str(path), caption=str(sample_id))})
        except Exception as e:
            log.warning("wandb picture failed: %s", e)

    def finish(self, summary: dict, records: list[dict]) -> None:
        if self.run is None:
            return
        try:
            rows = [  # every record of the folder: a resumed run's table is whole
                [
                    r["id"],
                    r["question"],
                    r["prediction"],
                    str(r["answers"]),
                    next(iter(r["metrics"].values()), None),
                    r["stop_reason"],
                    r["time_s"],
                    r["error"],
                ]
                for r in records
            ]
            self.run.log({"samples": self.wandb.Table(columns=list(COLUMNS), data=rows)})
            for k, v in summary.items():
                if isinstance(v, (int, float, str)) or v is None:
                    self.run.summary[k] = v
            self.run.finish()
        except Exception as e:
            log.warning("wandb finish failed: %s", e)
