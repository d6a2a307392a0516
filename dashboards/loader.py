"""Read one sweep's stored results from MLflow: the single loader behind the report and the export.

The layout it reads is the one the sweep runner writes, named in `sct_sweeps.schema`
(docs/architecture.md): a parent run per sweep, one child run per trial with its axis values as tags.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dashboards.errors import DashboardError
from sct_sweeps import schema

log = logging.getLogger(__name__)

DEFAULT_UI = "http://127.0.0.1:5000"  # `sct-sweep ui` over a local (SQLite) store
BASE_COLUMNS = ("trial_id", "run_name", "run_id", "step")


class ResultsError(DashboardError, LookupError):
    """The sweep, its parent run or its trials are not in the tracking store."""


@dataclass(frozen=True, kw_only=True)
class Trial:
    """One trial (one MLflow child run): raw string params, typed axis values, last metric values."""

    trial_id: str
    run_id: str
    status: str
    params: dict[str, str]
    axes: dict[str, object]
    final: dict[str, float]
    run_name: str | None = None


@dataclass(kw_only=True)
class SweepResults:
    """Everything stored about one sweep. `history` has one row per (trial, step)."""

    sweep: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    spec_yaml: str | None
    trials: list[Trial]
    history: pd.DataFrame
    metric_names: list[str] = field(default_factory=list)
    param_names: list[str] = field(default_factory=list)

    @property
    def axis_names(self) -> list[str]:
        """Swept axes (dotted TrainConfig paths) in first-seen order."""
        names: dict[str, None] = {}
        for t in self.trials:
            names.update(dict.fromkeys(t.axes))
        return list(names)

    @property
    def fid_steps(self) -> list[int]:
        """Sampler step counts k with an EMA `fid_{k}step` metric, ascending."""
        ks = {int(m.group(1)) for n in self.metric_names if (m := schema.FID_RE.fullmatch(n))}
        return sorted(ks)

    def trial(self, trial_id: str) -> Trial:
        for t in self.trials:
            if t.trial_id == trial_id:
                return t
        raise ResultsError(f"sweep {self.sweep}: no trial {trial_id}")


def ui_base(tracking_uri: str) -> str:
    """Where a browser finds the store's MLflow UI: the server itself, else `sct-sweep ui`'s default address."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else DEFAULT_UI


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of one run."""
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}"


def parse_value(text: str | None) -> object:
    """A logged string back to bool / int / float / None where it is one, else the string."""
    if text is None or text == "None":
        return None
    if text in ("True", "true", "False", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def typed_column(values: list[str | None]) -> list[object]:
    """One param column with a single type: numeric or bool when every value is, else strings."""
    parsed = [parse_value(v) for v in values]
    present = [p for p in parsed if p is not None]
    if present and all(isinstance(p, bool) for p in present):
        return parsed
    if present and all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in present):
        return [math.nan if p is None else p for p in parsed]
    return [None if p is None else str(v) for v, p in zip(values, parsed, strict=True)]  # "None" is a null


@contextmanager
def _quiet_downloads() -> Iterator[None]:
    """Silence MLflow's per-download progress bar (unless the user set it explicitly)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if key in os.environ:
        yield
        return
    os.environ[key] = "false"
    try:
        yield
    finally:
        os.environ.pop(key, None)


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _search_all(client, experiment_id: str, filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_parent_run(client, sweep: str):
    """The sweep's parent run (the most recently started one if the name was reused)."""
    exp = client.get_experiment_by_name(sweep)
    if exp is None:
        raise ResultsError(f"sweep {sweep}: no MLflow experiment of that name in the tracking store")
    parents = _search_all(client, exp.experiment_id, schema.parent_runs_filter(sweep))
    if not parents:
        raise ResultsError(f"sweep {sweep}: experiment has no parent run tagged {schema.ROLE}={schema.ROLE_PARENT}")
    parents.sort(key=lambda r: r.info.start_time or 0)
    if len(parents) > 1:
        log.warning("sweep %s has %d parent runs; using the latest %s", sweep, len(parents),
                    parents[-1].info.run_id)
    return exp, parents[-1]


def _read_text_artifact(client, run_id: str, path: str, dst: Path) -> str | None:
    try:
        with _quiet_downloads():
            local = client.download_artifacts(run_id, path, str(dst))
    except Exception:  # absent artifact: MlflowException or OSError depending on the store
        return None
    return Path(local).read_text()


def _metric_history(client, run_id: str, keys: list[str]) -> pd.DataFrame:
    """One row per step; a metric logged twice at one step keeps the latest value."""
    rows = []
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            rows.append((m.step, m.timestamp, key, m.value))
    if not rows:
        return pd.DataFrame(columns=["step"])
    df = pd.DataFrame(rows, columns=["step", "timestamp", "key", "value"]).sort_values(["step", "timestamp"])
    wide = df.pivot_table(index="step", columns="key", values="value", aggfunc="last")
    wide.columns.name = None
    return wide.reset_index()


def load_sweep(tracking_uri: str, sweep: str) -> SweepResults:
    """Load the parent run, every trial run (params, axes, last metrics) and all metric histories."""
    import tempfile

    client = _client(tracking_uri)
    exp, parent = find_parent_run(client, sweep)
    parent_id = parent.info.run_id
    runs = _search_all(client, exp.experiment_id, schema.trial_runs_filter(parent_id))
    if not runs:
        raise ResultsError(
            f"sweep {sweep}: parent run {parent_id} has no trial runs ({schema.ROLE}={schema.ROLE_TRIAL})")
    with tempfile.TemporaryDirectory() as tmp:
        spec_text = _read_text_artifact(client, parent_id, schema.SPEC_ARTIFACT, Path(tmp))

    trials, frames = [], []
    for r in sorted(runs, key=lambda r: (r.data.tags.get(schema.TRIAL_ID, ""), r.info.start_time or 0)):
        tags = r.data.tags
        tid = tags.get(schema.TRIAL_ID) or r.info.run_name or r.info.run_id
        if schema.VARIANT in tags:  # one of a training's evaluated variants: a trial of its own here
            tid = f"{tid}:{tags[schema.VARIANT]}"
        axes = {k.removeprefix(schema.AXIS_PREFIX): parse_value(v) for k, v in sorted(tags.items())
                if k.startswith(schema.AXIS_PREFIX)}
        trials.append(Trial(trial_id=tid, run_id=r.info.run_id, status=r.info.status, params=dict(r.data.params),
                            axes=axes, final=dict(r.data.metrics), run_name=r.info.run_name or None))
        h = _metric_history(client, r.info.run_id, sorted(r.data.metrics))
        h.insert(0, "run_id", r.info.run_id)
        h.insert(0, "run_name", r.info.run_name or None)
        h.insert(0, "trial_id", tid)
        frames.append(h)
    if len({t.trial_id for t in trials}) != len(trials):
        raise ResultsError(f"sweep {sweep}: duplicate {schema.TRIAL_ID} tags among its trial runs")

    metric_names = sorted({k for t in trials for k in t.final})
    history = pd.concat(frames, ignore_index=True)
    for name in metric_names:
        if name not in history:
            history[name] = math.nan
    history["step"] = history["step"].astype("int64")
    history = history[list(BASE_COLUMNS) + metric_names]

    param_names = sorted({k for t in trials for k in t.params})
    by_trial = {t.trial_id: t for t in trials}
    for name in param_names:
        col = name if name not in history else f"param.{name}"
        if col != name:
            log.warning("param %s collides with a metric column; exported as %s", name, col)
        per_trial = dict(zip(by_trial, typed_column([t.params.get(name) for t in trials]), strict=True))
        history[col] = history["trial_id"].map(per_trial)
    history = history.sort_values(["trial_id", "step"], kind="stable").reset_index(drop=True)
    log.info("loaded sweep %s: %d trials, %d history rows", sweep, len(trials), len(history))
    return SweepResults(sweep=sweep, tracking_uri=tracking_uri, experiment_id=exp.experiment_id,
                        parent_run_id=parent_id, spec_yaml=spec_text, trials=trials, history=history,
                        metric_names=metric_names, param_names=param_names)


def fetch_sample_grids(results: SweepResults, trial_id: str, dst: Path) -> dict[int, Path]:
    """Download a trial's latest sample grid per sampler step count: {k: local png}."""
    client = _client(results.tracking_uri)
    run_id = results.trial(trial_id).run_id
    latest: dict[int, tuple[int, str]] = {}
    try:
        entries = client.list_artifacts(run_id, schema.SAMPLES_DIR)
    except Exception:  # no artifact root or no samples/ folder
        return {}
    for e in entries:
        m = schema.GRID_RE.search(e.path)
        if e.is_dir or not m:
            continue
        k, it = int(m.group(1)), int(m.group(2) or -1)
        if k not in latest or it > latest[k][0]:
            latest[k] = (it, e.path)
    dst.mkdir(parents=True, exist_ok=True)
    with _quiet_downloads():
        return {k: Path(client.download_artifacts(run_id, p, str(dst))) for k, (_, p) in sorted(latest.items())}
