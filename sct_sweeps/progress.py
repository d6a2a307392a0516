"""A Ray Tune callback that shows sweep progress with rich in the driver's terminal.

It is pickled with the Tuner's run config (and unpickled by `Tuner.restore`), so it keeps only
plain settings and builds its live display in `setup`.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune import Callback


class RichProgress(Callback):
    """One progress bar over the sweep's trials, with the best metric so far and a line per trial end."""

    def __init__(self, total: int, metric: str, mode: str) -> None:
        self.total, self.metric, self.mode = total, metric, mode
        self._progress: Any = None
        self._task: Any = None
        self._best = math.inf if mode == "min" else -math.inf
        self._done = 0
        self._counted_ended = False  # the trials a resumed sweep had already ended are counted once

    def __getstate__(self) -> dict[str, Any]:
        return {"total": self.total, "metric": self.metric, "mode": self.mode}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["total"], state["metric"], state["mode"])  # type: ignore[misc]

    def setup(self, **info: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[best]}"),
        )
        self._task = self._progress.add_task("trials", total=self.total, best="")
        self._progress.start()

    def _better(self, v: float) -> bool:
        return v < self._best if self.mode == "min" else v > self._best

    def _offer(self, trial: Any, v: Any) -> None:
        """Show `v` (trial's metric value) as the best so far if it is."""
        if self._progress is None or not isinstance(v, (int, float)) or not math.isfinite(v):
            return
        if self._better(v):
            self._best = float(v)
            self._progress.update(self._task, best=f"best {self.metric} {self._best:.3g} ({trial.trial_id})")

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        """Once: a resumed sweep's bar starts from the trials it had already ended, and their best."""
        if self._counted_ended or self._progress is None:
            return
        self._counted_ended = True
        ended = [t for t in trials if t.status in ("TERMINATED", "ERROR")]
        self._done = len(ended)
        self._progress.update(self._task, completed=self._done)
        for t in ended:
            self._offer(t, (t.last_result or {}).get(self.metric))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._offer(trial, result.get(self.metric))

    def _end(self, trial: Any, what: str) -> None:
        if self._progress is None:
            return
        self._done += 1
        self._progress.update(self._task, completed=self._done)
        self._progress.console.print(f"trial {trial.trial_id} {what}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = (trial.last_result or {}).get(self.metric)
        self._end(trial, f"finished ({self.metric} {last:.3g})" if isinstance(last, float) else "finished")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FAILED (see its MLflow run: tag sct.error, artifact error.txt)")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
