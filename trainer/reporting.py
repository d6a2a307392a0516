"""Where a run's metrics, checkpoints and artifacts go: the `Reporter` protocol `train()` reports through
(Ray Tune + MLflow in a sweep, `sct_sweeps/trainable.py`), a JSON-lines file when run alone, and nothing at
all on the data-parallel ranks other than 0."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


class Reporter(Protocol):
    """Where metrics, checkpoints and artifacts go (Ray Tune + MLflow in a sweep, a log file alone)."""

    def report(self, step: int, metrics: Mapping[str, float], checkpoint_dir: Path | None = None) -> None: ...

    def log_artifact(self, path: Path) -> None: ...


class SilentReporter:
    """The reporter of a data-parallel rank other than 0: only rank 0 reports and checkpoints. A reporter
    with `every_rank = True` is kept on every rank instead (Ray Train needs each worker's reports)."""

    def report(self, step: int, metrics: Mapping[str, float], checkpoint_dir: Path | None = None) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass


class JsonlReporter:
    """Default reporter: appends metrics to `<out_dir>/metrics.jsonl` and logs them."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def report(self, step: int, metrics: Mapping[str, float], checkpoint_dir: Path | None = None) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        log.info("step %d %s", step, {k: round(float(v), 4) for k, v in metrics.items()})

    def log_artifact(self, path: Path) -> None:
        log.info("artifact %s", path)
