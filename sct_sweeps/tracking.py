"""MLflow layout of a sweep: one experiment per sweep, a parent run, one child run per trial.

This module opens the store (one client per SQLite store created under its lock), the experiment and the
parent run, and flattens a TrainConfig into params and path tags. A trial's child run, kept for the
trial's whole life and fed in batches, is `sct_sweeps.trial_tracker.TrialTracker`.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sct_sweeps import schema
from sct_sweeps.config import PATH_FIELDS
from sct_sweeps.errors import TrackingError
from sct_sweeps.locks import file_lock
from trainer.config import TrainConfig

log = logging.getLogger(__name__)



def client(uri: str) -> Any:
    """An MlflowClient bound to `uri` (no global MLflow state is touched).

    The client opens its store at once; a SQLite store is opened under the lock ``<db>.lock``, so the
    first process to open a new store creates and migrates it while the others wait (two at once
    collide: "duplicate column name", "Online migration expected", "Circular dependency detected").
    """
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is None:
        return MlflowClient(tracking_uri=uri)
    check_store_dir(uri)
    if not os.access(db.parent, os.W_OK):  # a read-only directory: no store can be created there to race on
        return MlflowClient(tracking_uri=uri)
    with file_lock(db.with_name(f"{db.name}.lock")):
        return MlflowClient(tracking_uri=uri)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for any other store or an in-memory one)."""
    path = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else ""
    return None if path in ("", ":memory:") else Path(path.split("?", 1)[0])


def check_store_dir(uri: str, own: Path | None = None) -> None:
    """Refuse a SQLite store whose directory does not exist (MLflow would make it): a typo in a path the
    user gave should not grow a directory tree. `own`, the project's default directory, is made."""
    db = sqlite_path(uri)
    if db is None or db.parent.is_dir():
        return
    if own is not None and db.parent.resolve() == own.resolve():
        db.parent.mkdir(parents=True, exist_ok=True)
        return
    raise TrackingError(f"tracking_uri {uri}: directory {db.parent} does not exist; create it first")


def fail_fast_http() -> None:
    """Make one MLflow HTTP request give up after seconds, not minutes: the trial's buffer retries."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def ensure_experiment(mlflow_client: Any, name: str, artifact_root: Path | None, description: str = "") -> str:
    """The id of experiment `name`, created (or restored from deleted) once, in the driver; `description`
    becomes its note (tag ``mlflow.note.content``)."""
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(exp.experiment_id)
        exp_id = exp.experiment_id
    else:
        location = (artifact_root / name).as_uri() if artifact_root is not None else None
        exp_id = mlflow_client.create_experiment(name, artifact_location=location)
    if description:
        mlflow_client.set_experiment_tag(exp_id, schema.NOTE, description)
    return exp_id


def git_commit(repo: Path) -> str | None:
    """HEAD commit of the git checkout at `repo`, if it is one."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def flatten(cfg: TrainConfig) -> tuple[dict[str, str], dict[str, str]]:
    """Every TrainConfig setting as dotted key -> string: (params, path tags). Paths differ from machine to
    machine, so they are tags ``sct.path.<key>`` (unset ones left out), and MLflow's Compare shows real diffs."""
    params: dict[str, str] = {}
    paths = set(PATH_FIELDS)

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif prefix not in paths:
            params[prefix] = "None" if node is None else str(node)

    dumped = cfg.model_dump(mode="json")
    walk("", dumped)
    tags = {}
    for key in sorted(paths):
        node: Any = dumped
        for part in key.split("."):
            node = node[part]
        if node is not None:
            tags[schema.PATH_PREFIX + key] = str(node)
    return params, tags


def start_parent_run(
    mlflow_client: Any,
    experiment_id: str,
    sweep: str,
    params: Mapping[str, Any],
    spec_text: str,
    repo: Path,
    description: str = "",
) -> str:
    """Open the sweep's parent run with its tags (the description as its note), settings as params and
    `spec.yaml` as artifact."""
    from mlflow.entities import Param

    tags = {
        schema.ROLE: schema.ROLE_PARENT,
        schema.SWEEP: sweep,
        "mlflow.source.type": "PROJECT",
        "mlflow.source.name": "sct-sweep",
    }
    if description:
        tags[schema.NOTE] = description
    commit = git_commit(repo)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run = mlflow_client.create_run(experiment_id, tags=tags, run_name=f"{sweep}-sweep")
    run_id = run.info.run_id
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[i : i + 100])
    mlflow_client.log_text(run_id, spec_text, schema.SPEC_ARTIFACT)
    return run_id


def reopen_run(mlflow_client: Any, run_id: str) -> None:
    """Mark a run RUNNING again (a resumed sweep's parent)."""
    mlflow_client.update_run(run_id, status="RUNNING")


def end_run(mlflow_client: Any, run_id: str, status: str = "FINISHED") -> None:
    """End a run with FINISHED, FAILED or KILLED."""
    mlflow_client.set_terminated(run_id, status=status)
