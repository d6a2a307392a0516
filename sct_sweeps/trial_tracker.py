"""A trial's one MLflow child run, for the trial's whole life (sct_sweeps/tracking.py has the store's
layout and the parent run).

A retried or resumed trial finds its run again (by the tags ``sct.trial_id`` + ``mlflow.parentRunId``) and
goes on logging into it, never opening a second one; a metric step already logged is never logged twice.
Logging never crashes the trial: while the tracking server is away, metrics, tags and artifacts wait in a
buffer and are retried with backoff; whatever is still undelivered when the trial ends is written to a
JSON-lines file beside the results and reported loudly. Metrics are sent every `flush_every_s` seconds,
not at every report (docs/benchmarks.md §2); a caller flushes before it checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sct_sweeps import schema
from sct_sweeps.tracking import client

log = logging.getLogger(__name__)

_BATCH = 500  # metric entries per log_batch (MLflow allows 1000)
_MAX_BACKOFF_S = 60.0


class TrialTracker:
    """The MLflow child run of one trial: find-or-create, buffered logging, end status.

    Every call is safe while the tracking store is unreachable: work waits in a buffer and is
    retried with exponential backoff; `finish` waits up to `finish_wait_s` for it to drain.
    """

    def __init__(
        self,
        *,
        uri: str,
        experiment_id: str,
        parent_run_id: str,
        sweep: str,
        trial_id: str,
        run_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, str],
        lost_dir: Path | None = None,
        run_id: str | None = None,
        flush_every_s: float = 0.0,
        variant: str | None = None,
    ) -> None:
        self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
        self.sweep, self.trial_id, self.run_name = sweep, trial_id, run_name
        self.tags = {
            **tags,
            schema.ROLE: schema.ROLE_TRIAL,
            schema.SWEEP: sweep,
            schema.TRIAL_ID: trial_id,
            schema.TRAINING: trial_id,
            schema.PARENT: parent_run_id,
            **({schema.VARIANT: variant} if variant is not None else {}),
        }
        self.variant = variant
        self.params = dict(params)
        self.lost_dir = lost_dir
        self.run_id = run_id
        self.reattached = False
        self._client: Any = None
        self._connected = False
        self._metrics: list[Any] = []  # mlflow.entities.Metric waiting to be sent
        self._late_tags: dict[str, str] = {}
        self._artifacts: list[tuple[Path, str | None, int | None]] = []  # (file, folder or image key, image step)
        self._last_step: dict[str, int] = {}
        self.flush_every_s = flush_every_s
        self._due = 0.0  # when waiting metrics are sent next: flush_every_s after the last send
        self._next_try = 0.0
        self._backoff = 1.0
        self._outage_since: float | None = None
        self._staging = Path(tempfile.mkdtemp(prefix="sct-artifacts-"))
        self.dropped = 0  # entries MLflow refused as invalid (never retried)

    # -- connection ----------------------------------------------------------------------------

    def _find_run(self) -> str | None:
        filt = f"tags.`{schema.TRIAL_ID}` = '{self.trial_id}' and tags.`{schema.PARENT}` = '{self.parent_run_id}'"
        if self.variant is not None:
            filt += f" and tags.`{schema.VARIANT}` = '{self.variant}'"
        runs = self._client.search_runs([self.experiment_id], filter_string=filt, max_results=5)
        return runs[0].info.run_id if runs else None

    def _log_params(self, run_id: str) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in self.params.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(run_id, params=items[i : i + 100])

    def _connect(self) -> None:
        from mlflow.entities import RunTag
        from mlflow.exceptions import MlflowException

        if self._client is None:
            self._client = client(self.uri)
        run = None
        if self.run_id is not None:
            try:
                run = self._client.get_run(self.run_id)
            except MlflowException as e:
                if e.get_http_status_code() != 404:
                    raise
                log.warning("MLflow run %s of trial %s not in this store; searching", self.run_id, self.trial_id)
        if run is None:
            found = self._find_run()
            run = self._client.get_run(found) if found else None
        if run is None:
            run = self._client.create_run(self.experiment_id, tags=self.tags, run_name=self.run_name)
            self._log_params(run.info.run_id)
            attempts = 1
        else:
            self.reattached = True
            run_id = run.info.run_id
            if not run.data.params:  # created, then the store went away before its params
                self._log_params(run_id)
            for key in run.data.metrics:
                steps = [m.step for m in self._client.get_metric_history(run_id, key)]
                if steps:
                    self._last_step[key] = max(self._last_step.get(key, -1), *steps)
            attempts = int(run.data.tags.get(schema.ATTEMPTS, "1")) + 1
            self._client.update_run(run_id, status="RUNNING")
            log.info("trial %s reattached to MLflow run %s (attempt %d)", self.trial_id, run_id, attempts)
        self._client.log_batch(run.info.run_id, tags=[RunTag(schema.ATTEMPTS, str(attempts))])
        self.run_id = run.info.run_id
        self._connected = True

    def peek(self) -> Any | None:
        """The trial's existing run, read only (None when it has none or the store does not answer)."""
        try:
            if self._client is None:
                self._client = client(self.uri)
            run_id = self.run_id or self._find_run()
            return self._client.get_run(run_id) if run_id else None
        except Exception:
            return None

    def start(self) -> str | None:
        """Find or create the run now if the store answers; the run id (None while unreachable)."""
        self.flush(force=True)
        return self.run_id if self._connected else None

    # -- buffered work -------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue finite numeric metrics at `step` (steps already logged for a key are skipped); send
        what waits if `flush_every_s` has passed since the last send."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            self._metrics.append(Metric(key, float(value), now, int(step)))
        if time.monotonic() >= self._due:
            self.flush()

    def set_tag(self, key: str, value: str) -> None:
        """Queue a tag."""
        self._late_tags[key] = str(value)[:8000]
        self.flush()

    def _stage(self, path: Path) -> Path | None:
        """A copy of the file at `path`, taken now (the trainer may overwrite it later); None if absent."""
        path = Path(path)
        if not path.is_file():
            log.warning("artifact %s does not exist; skipped", path)
            return None
        dest = Path(tempfile.mkdtemp(dir=self._staging)) / path.name  # own folder: removed once sent
        shutil.copy2(path, dest)
        return dest

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Queue a copy of the file at `path` as an artifact under `artifact_path`."""
        if (dest := self._stage(path)) is not None:
            self._artifacts.append((dest, artifact_path, None))
            self.flush()

    def log_image(self, path: Path, key: str, step: int) -> None:
        """Queue the PNG at `path` as MLflow image `key` at `step` (the run page's step slider)."""
        if (dest := self._stage(path)) is not None:
            self._artifacts.append((dest, key, int(step)))
            self.flush()

    def _fresh(self, pending: list[Any]) -> list[Any]:
        """Drop entries at a step the run already has for that key (resume, or a repeated report)."""
        out = []
        for m in pending:
            if m.step > self._last_step.get(m.key, -1):
                self._last_step[m.key] = m.step
                out.append(m)
        return out

    def _send(self) -> None:
        from mlflow.entities import RunTag
        from mlflow.exceptions import MlflowException

        if not self._connected:
            self._connect()
        while self._metrics:
            before = dict(self._last_step)
            batch = self._fresh(self._metrics[:_BATCH])
            try:
                if batch:
                    self._client.log_batch(self.run_id, metrics=batch)
            except MlflowException as e:
                if e.get_http_status_code() != 400:
                    self._last_step = before  # not sent: retried later
                    raise
                log.error("MLflow refused %d metric values of trial %s: %s", len(batch), self.trial_id, e)
                self.dropped += len(batch)
            except Exception:
                self._last_step = before
                raise
            del self._metrics[:_BATCH]
        if self._late_tags:
            self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in self._late_tags.items()])
            self._late_tags.clear()
        while self._artifacts:
            path, artifact_path, step = self._artifacts[0]
            if step is None:
                self._client.log_artifact(self.run_id, str(path), artifact_path)
            else:
                from PIL import Image

                with Image.open(path) as image:
                    self._client.log_image(self.run_id, image.copy(), key=artifact_path, step=step)
            self._artifacts.pop(0)
            shutil.rmtree(path.parent, ignore_errors=True)

    def flush(self, force: bool = False) -> bool:
        """Try to send what waits (now if `force`, else when the backoff allows); True when drained."""
        if not force and time.monotonic() < self._next_try:
            return False
        try:
            self._send()
        except Exception as e:  # the store is away: keep everything, back off
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                log.warning("MLflow unreachable for trial %s (%s); buffering", self.trial_id, type(e).__name__)
            self._next_try = time.monotonic() + self._backoff
            self._backoff = min(2 * self._backoff, _MAX_BACKOFF_S)
            return False
        if self._outage_since is not None:
            log.warning("MLflow back for trial %s after %.0f s", self.trial_id, time.monotonic() - self._outage_since)
            self._outage_since = None
        self._backoff = 1.0
        self._due = time.monotonic() + self.flush_every_s
        return True

    @property
    def pending(self) -> int:
        """Metric values, tags and artifacts not yet delivered."""
        return len(self._metrics) + len(self._late_tags) + len(self._artifacts)

    # -- end -----------------------------------------------------------------------------------

    def finish(
        self,
        status: str = "FINISHED",
        error: str | None = None,
        details: str | None = None,
        finish_wait_s: float = 120.0,
        keep_details: bool = False,
    ) -> int:
        """Deliver what waits (retrying up to `finish_wait_s`), then end the run; returns entries lost.

        `error` (one line) becomes tag ``sct.error``; `details` (a traceback) artifact ``error.txt`` (schema.py);
        `keep_details` leaves an earlier attempt's ``error.txt`` as it is (this attempt has no traceback of its own).
        """
        if error is not None:
            self._late_tags[schema.ERROR] = error[:8000]
            if not keep_details:
                err_file = self._staging / schema.ERROR_ARTIFACT
                err_file.write_text(details or error)
                self._artifacts.append((err_file, None, None))
        deadline = time.monotonic() + finish_wait_s
        while not self.flush(force=True) and time.monotonic() < deadline:
            time.sleep(min(self._backoff, max(0.0, deadline - time.monotonic())))
        lost = self.pending
        if lost == 0:
            try:
                self._client.set_terminated(self.run_id, status=status)
            except Exception as e:
                log.error("could not end MLflow run %s of trial %s: %s", self.run_id, self.trial_id, e)
                lost = 1
        if lost:
            self._write_lost(status)
        shutil.rmtree(self._staging, ignore_errors=True)
        return lost + self.dropped

    def _write_lost(self, status: str) -> None:
        where = "nowhere (no results directory)"
        if self.lost_dir is not None:
            self.lost_dir.mkdir(parents=True, exist_ok=True)
            path = self.lost_dir / f"{self.trial_id}.jsonl"
            keep = self.lost_dir / f"{self.trial_id}_artifacts"
            with open(path, "a") as f:
                head = {"trial_id": self.trial_id, "run_id": self.run_id, "run_name": self.run_name}
                f.write(json.dumps({**head, "status": status, "tags": self._late_tags}) + "\n")
                for m in self._metrics:
                    f.write(json.dumps({"key": m.key, "value": m.value, "step": m.step, "ts": m.timestamp}) + "\n")
                for p, artifact_path, step in self._artifacts:
                    keep.mkdir(exist_ok=True)
                    shutil.copy2(p, keep / p.name)
                    entry = {"artifact": str(keep / p.name), "artifact_path": artifact_path, "image_step": step}
                    f.write(json.dumps(entry) + "\n")
            where = str(path)
        log.error(
            "MLFLOW DATA LOST for trial %s (run %s): %d metric values, %d tags, %d artifacts not delivered; "
            "saved to %s",
            self.trial_id,
            self.run_id,
            len(self._metrics),
            len(self._late_tags),
            len(self._artifacts),
            where,
        )
