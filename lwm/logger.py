"""Run logging: wandb (offline unless `--logger.online=True`) plus a `metrics.jsonl` file.

The run's folder is `output_dir/<experiment_id>` (a uuid is appended to the id with
`append_uuid`); checkpoints go there too. Every logged dict is appended to
`metrics.jsonl` as one JSON line, so runs can be plotted and compared without wandb. A
restarted run keeps one row per step there: `restart_at(step)` moves the rows it is about to
log again to `metrics.replaced.jsonl`.
`WANDB_MODE=disabled` in the environment turns wandb off entirely (tests).

`output_dir` may be a bucket URL (gs://...). A bucket has no append: metrics.jsonl is then kept
in memory and rewritten whole at most every `remote_flush_seconds`, at every checkpoint
(`flush`) and at the end; wandb writes under a local folder (`wandb_dir`, default a temporary
one), since it needs a file system.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from typing import Any, Mapping

import numpy as np
from ml_collections import ConfigDict

from lwm import storage


class MetricsLogger:
    @staticmethod
    def get_default_config(updates=None) -> ConfigDict:
        config = ConfigDict()
        config.project_id = "lwm"  # wandb project
        config.project_entity = ""  # wandb entity (team); '' = the default
        config.experiment_id = ""  # run name and folder name; '' = a new uuid
        config.experiment_group = ""
        config.append_uuid = True  # make experiment_id unique (disable for autoresume)
        config.experiment_note = ""
        config.output_dir = ""  # '' = a temporary folder
        config.wandb_dir = ""  # '' = the run folder
        config.profile_dir = ""  # a jax.profiler trace of a few steps goes here when set
        config.online = False  # False: wandb runs offline, nothing leaves the machine
        config.remote_flush_seconds = 30.0  # bucket output_dir: rewrite metrics.jsonl at most this often
        if updates is not None:
            config.update(ConfigDict(updates).copy_and_resolve_references())
        return config

    def __init__(self, config, variant: Mapping[str, Any] | None = None, enable: bool = True):
        self.config = config = self.get_default_config(config)
        self.enable = enable
        experiment_id = config.experiment_id or uuid.uuid4().hex
        if config.append_uuid and config.experiment_id:
            experiment_id = f"{experiment_id}-{uuid.uuid4().hex}"
        self.experiment_id = experiment_id
        base = config.output_dir or tempfile.mkdtemp(prefix="lwm-")
        self.output_dir = storage.join(base, experiment_id)
        self.metrics_path = storage.join(self.output_dir, "metrics.jsonl")
        self.run = None
        self._metrics_file = None
        self._remote_lines = None  # a bucket's metrics.jsonl, kept whole in memory
        self._last_flush = 0.0
        if not enable:
            return
        storage.makedirs(self.output_dir)
        if storage.is_remote(self.output_dir):
            existing = storage.read_text(self.metrics_path) if storage.exists(self.metrics_path) else ""
            self._remote_lines = [line for line in existing.splitlines() if line.strip()]
        else:
            self._metrics_file = open(self.metrics_path, "a")
        if os.environ.get("WANDB_MODE", "").lower() != "disabled":
            import wandb

            wandb_dir = config.wandb_dir or (os.path.join(tempfile.gettempdir(), "lwm-wandb", experiment_id)
                                             if storage.is_remote(self.output_dir) else self.output_dir)
            os.makedirs(wandb_dir, exist_ok=True)
            self.run = wandb.init(
                project=config.project_id, entity=config.project_entity or None,
                group=config.experiment_group or None, name=experiment_id, id=experiment_id,
                notes=config.experiment_note or None, dir=wandb_dir, config=dict(variant or {}),
                mode="online" if config.online else "offline", resume="allow",
                settings=wandb.Settings(silent=True, console="off"),
            )

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if not self.enable:
            return
        record = {k: _plain(v) for k, v in metrics.items()}
        if step is not None:
            record["step"] = int(step)
        line = json.dumps(record, allow_nan=True)
        if self._remote_lines is not None:
            self._remote_lines.append(line)
            if time.time() - self._last_flush >= self.config.remote_flush_seconds:
                self.flush()
        else:
            self._metrics_file.write(line + "\n")
            self._metrics_file.flush()
        if self.run is not None:
            self.run.log(record, step=step)

    def restart_at(self, step: int) -> int:
        """A run restarting at `step` (0, or the step it resumed from): rows of later steps, logged
        before the restart and about to be logged again, move to `metrics.replaced.jsonl`, so
        metrics.jsonl keeps one row per step. Returns how many moved. (wandb, resumed as the same
        run, ignores steps at or below the last it recorded.)"""
        if not self.enable:
            return 0
        lines = self._remote_lines if self._remote_lines is not None else \
            storage.read_text(self.metrics_path).splitlines()
        kept, later = [], []
        for line in filter(str.strip, lines):
            (later if json.loads(line).get("step", 0) > step else kept).append(line)
        if not later:
            return 0
        aside = storage.join(self.output_dir, "metrics.replaced.jsonl")
        before = storage.read_text(aside) if storage.exists(aside) else ""
        storage.write_text(aside, before + "".join(line + "\n" for line in later))  # first: a crash loses no row
        if self._remote_lines is not None:
            self._remote_lines = kept
            self.flush()
        else:
            self._metrics_file.close()
            storage.write_text(self.metrics_path, "".join(line + "\n" for line in kept))
            self._metrics_file = open(self.metrics_path, "a")
        return len(later)

    def flush(self) -> None:
        """Make every logged row durable (a bucket's metrics.jsonl is rewritten whole)."""
        if self._remote_lines is not None:
            storage.write_text(self.metrics_path, "".join(line + "\n" for line in self._remote_lines))
            self._last_flush = time.time()
        elif self._metrics_file is not None:
            self._metrics_file.flush()

    def close(self) -> None:
        if self._remote_lines is not None:
            self.flush()
            self._remote_lines = None
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self.run is not None:
            self.run.finish()
            self.run = None


def _plain(value):
    """JSON-friendly scalars from numpy/jax values."""
    if hasattr(value, "dtype"):
        value = np.asarray(value)
        return value.item() if value.size == 1 else value.tolist()
    return value


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl file (for plots, comparisons and tests)."""
    return [json.loads(line) for line in storage.read_text(str(path)).splitlines() if line.strip()]
