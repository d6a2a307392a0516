"""Tracking over a real `mlflow server` on 127.0.0.1: a sweep read back over REST, and a server outage."""

from __future__ import annotations

import json
import logging
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import (
    MlflowServer,
    sct_sweep,
    tiny_spec,
)

from sct_sweeps import tracking
from sct_sweeps.trial_tracker import TrialTracker


def rest(url: str, path: str, body: dict | None = None, **query: str) -> dict:
    """GET (with query parameters) or POST (with a JSON body) to the MLflow REST API."""
    full = f"{url}{path}" + ("?" + urllib.parse.urlencode(query) if query else "")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(full, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _parent(uri: str, name: str) -> tuple[str, str]:
    client = tracking.client(uri)
    exp = tracking.ensure_experiment(client, name, None)
    run = tracking.start_parent_run(client, exp, name, {"k": 1}, "name: x\n", Path("/nonexistent"))
    return exp, run


def _tracker(uri: str, exp: str, parent: str, tmp_path: Path, trial: str = "t0") -> TrialTracker:
    return TrialTracker(
        uri=uri, experiment_id=exp, parent_run_id=parent, sweep="outage", trial_id=trial, run_name=f"run-{trial}",
        tags={"sct.axis.seed": "0"}, params={"seed": "0"}, lost_dir=tmp_path / "lost",
    )  # fmt: skip


@pytest.fixture
def fail_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


@pytest.mark.slow
def test_trial_logging_survives_a_server_outage(
    mlflow_server: MlflowServer, tmp_path: Path, fail_fast: None, caplog: pytest.LogCaptureFixture
) -> None:
    exp, parent = _parent(mlflow_server.url, "outage")
    tr = _tracker(mlflow_server.url, exp, parent, tmp_path)
    assert tr.start() is not None
    for step in range(5):
        tr.log_metrics({"loss": 1.0 / (step + 1)}, step)
    mlflow_server.stop(graceful=False)
    t0 = time.monotonic()
    for step in range(5, 10):
        tr.log_metrics({"loss": 1.0 / (step + 1)}, step)  # buffered: must neither raise nor block long
    png = tmp_path / "grid.png"
    png.write_bytes(b"\x89PNG fake")
    tr.log_artifact(png, "samples")
    assert time.monotonic() - t0 < 20
    assert tr.pending >= 6
    mlflow_server.start()  # the server comes back: everything arrives, in order, once
    assert tr.finish("FINISHED") == 0
    client = tracking.client(mlflow_server.url)
    steps = [m.step for m in client.get_metric_history(tr.run_id, "loss")]
    assert steps == list(range(10))
    assert client.get_run(tr.run_id).info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(tr.run_id, "samples")] == ["samples/grid.png"]

    # It goes away for good: the trial still ends, and the loss is loud and saved to a file.
    tr2 = _tracker(mlflow_server.url, exp, parent, tmp_path, trial="t1")
    tr2.start()
    mlflow_server.stop(graceful=False)
    tr2.log_metrics({"fid_1step": 12.5}, 100)
    with caplog.at_level(logging.ERROR, logger="sct_sweeps.tracking"):
        lost = tr2.finish("FINISHED", finish_wait_s=2.0)
    assert lost >= 1
    assert "MLFLOW DATA LOST" in caplog.text
    saved = [json.loads(line) for line in (tmp_path / "lost" / "t1.jsonl").read_text().splitlines()]
    assert {"key": "fid_1step", "value": 12.5, "step": 100} in [
        {k: d.get(k) for k in ("key", "value", "step")} for d in saved
    ]


@pytest.mark.slow
def test_sweep_against_mlflow_server(
    mlflow_server: MlflowServer, tmp_path: Path, cli_env: dict[str, str], pretrain_cache: Path
) -> None:
    spec = tmp_path / "served.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec("served", pretrain_cache, seeds=[0, 1])))
    done = subprocess.run(
        [sct_sweep(), "run", str(spec), "--tracking-uri", mlflow_server.url, "--num-cpus", "2", "--no-report"],
        env=cli_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    exp = rest(mlflow_server.url, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="served")["experiment"]
    runs = rest(mlflow_server.url, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    parents = [r for r, t in zip(runs, tags, strict=True) if t.get("sct.role") == "parent"]
    children = [(r, t) for r, t in zip(runs, tags, strict=True) if t.get("sct.role") == "trial"]
    assert len(parents) == 1 and len(children) == 2, tags
    parent_id = parents[0]["info"]["run_id"]
    assert parents[0]["info"]["status"] == "FINISHED"
    for run, t in children:
        assert t["mlflow.parentRunId"] == parent_id
        assert run["info"]["status"] == "FINISHED"
        keys = {m["key"] for m in run["data"]["metrics"]}
        assert {"loss", "fid_1step", "fid_2step", "images_seen", "flops", "wall_s", "n_params"} <= keys, keys
        # On a server the final checkpoint travels with the run: a tag with its path, the file as artifact.
        assert Path(t["sct.checkpoint"]).name.startswith("checkpoint_"), t
        query = urllib.parse.urlencode({"run_id": run["info"]["run_id"], "path": "checkpoint"})
        files = rest(mlflow_server.url, f"/api/2.0/mlflow/artifacts/list?{query}").get("files", [])
        assert [f["path"] for f in files] == ["checkpoint/state.pt"] and int(files[0]["file_size"]) > 0, files
    listing = rest(mlflow_server.url, "/api/2.0/mlflow/artifacts/list", run_id=parent_id)
    assert "spec.yaml" in [f["path"] for f in listing.get("files", [])]
