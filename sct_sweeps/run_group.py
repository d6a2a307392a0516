"""A training's MLflow runs: one child run per evaluated variant (one run when it has no variants).

The trainer reports a variant's metrics as `v<k>/<metric>` (trainer/evaluate.py) and its sample grids
under `samples/v<k>/`; everything else it reports (loss, cost, iteration) belongs to the training and
goes to every variant's run, so each run reads as a whole trial. Tags and the run's end go to all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sct_sweeps.trial_tracker import TrialTracker
from trainer.config import VARIANT_PREFIX, split_variant_metric


class RunGroup:
    """The `TrialTracker` of every variant of one training, driven as one."""

    def __init__(self, trackers: Sequence[TrialTracker]) -> None:
        if not trackers:
            raise ValueError("a training has at least one run")
        self.trackers = list(trackers)
        self.lead = self.trackers[0]

    # -- identity ------------------------------------------------------------------------------

    @property
    def trial_id(self) -> str:
        return self.lead.trial_id

    @property
    def uri(self) -> str:
        return self.lead.uri

    @property
    def run_id(self) -> str | None:
        return self.lead.run_id

    @property
    def run_ids(self) -> list[str | None]:
        return [t.run_id for t in self.trackers]

    def peek(self) -> Any | None:
        """The lead variant's existing run (see `TrialTracker.peek`)."""
        return self.lead.peek()

    def peek_all(self) -> list[Any | None]:
        """Every variant's existing run, read only (None for one not created yet or not answering)."""
        return [t.peek() for t in self.trackers]

    # -- logging -------------------------------------------------------------------------------

    def _for(self, k: int | None) -> list[TrialTracker]:
        if k is None:
            return self.trackers
        return [self.trackers[k]] if k < len(self.trackers) else []

    def start(self) -> str | None:
        for t in self.trackers:
            t.start()
        return self.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """A variant's `v<k>/x` as `x` to its run; every other metric to every run."""
        routed: dict[int | None, dict[str, float]] = {}
        for key, value in metrics.items():
            k, name = split_variant_metric(key)
            routed.setdefault(k, {})[name] = value
        for k, values in routed.items():
            for t in self._for(k):
                t.log_metrics(values, step)

    def flush(self, force: bool = False) -> bool:
        return all([t.flush(force) for t in self.trackers])

    def set_tag(self, key: str, value: str) -> None:
        for t in self.trackers:
            t.set_tag(key, value)

    def _owner(self, path: Path) -> int | None:
        """The variant whose grid `path` is (a file under `samples/v<k>/`), else None (the training's)."""
        name = Path(path).parent.name
        digits = name[len(VARIANT_PREFIX):]
        return int(digits) if name.startswith(VARIANT_PREFIX) and digits.isdigit() else None

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        for t in self._for(self._owner(path)):
            t.log_artifact(path, artifact_path)

    def log_image(self, path: Path, key: str, step: int) -> None:
        for t in self._for(self._owner(path)):
            t.log_image(path, key, step)

    def finish(self, status: str = "FINISHED", **kwargs: Any) -> int:
        """End every run (see `TrialTracker.finish`); the entries lost, summed."""
        return sum(t.finish(status, **kwargs) for t in self.trackers)
