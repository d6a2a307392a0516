"""`resources.workers: N`: one trial as N data-parallel Ray Train workers (real Ray, real MLflow SQLite, digits)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    assert_no_duplicate_steps,
    child_runs,
    driver_process,
    kill_pids,
    processes_under,
    run_sweep_cli,
    sct_sweep,
    tiny_spec,
)
from typer.testing import CliRunner

from sct_sweeps.cli import app


def two_worker_spec(name: str, pretrain_cache: Path, **changes: object) -> dict:
    """Two tiny SCT trials (seeds 0, 1), each on 2 workers of 1 CPU: one trial at a time on 2 CPUs."""
    spec = tiny_spec(name, pretrain_cache, seeds=[0, 1])
    spec["resources"] = {"workers": 2, "cpu": 1, "gpu": 0}
    spec.update(changes)
    return spec


def test_validate_shows_workers_per_trial(project: Path, tmp_path: Path, pretrain_cache: Path) -> None:
    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(two_worker_spec("dp", pretrain_cache)))
    result = CliRunner().invoke(app, ["validate", str(path), "--num-cpus", "2"])
    assert result.exit_code == 0, result.output
    assert "2 workers x (1 CPU, 0.0 GPU), placement pack; up to 1 at a time" in result.output, result.output
    result = CliRunner().invoke(app, ["validate", str(path), "--num-cpus", "8"])
    assert "up to 2 at a time" in result.output, result.output  # 2 trials of 2 CPUs each fit in 8


def _train_workers(ray_tmp: Path) -> list[int]:
    """PIDs of the Ray Train workers of the Ray whose temp dir is `ray_tmp` (children of its raylet)."""
    raylets = [pid for pid in processes_under(str(ray_tmp)) if "raylet" in Path(f"/proc/{pid}/cmdline").read_text()]
    return [pid for raylet in raylets for pid in processes_under("RayTrainWorker", parent=raylet)]


def _wait_for_checkpoint(results: Path, step: int, driver: subprocess.Popen, timeout: float = 400) -> None:
    """Until Ray holds the checkpoint of `step` (Ray Train registered it and passed it on to Tune's results)."""
    deadline = time.time() + timeout
    while time.time() < deadline and driver.poll() is None:
        for result_file in results.glob("*/result.json"):
            lines = [json.loads(ln) for ln in result_file.read_text().splitlines() if ln.strip()]
            if any(r.get("iteration", -1) >= step and r.get("checkpoint_path") for r in lines):
                return
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint at step {step} in {results} (driver exit code {driver.poll()})")


@contextmanager
def sweep_at_checkpoint(name: str, step: int, workdir: Path, env: dict[str, str], cache: Path) -> Iterator[Any]:
    """A sweep of one 2-worker trial (200 iterations, evaluated and checkpointed every 20) whose driver runs
    until Ray holds the checkpoint of `step`; the driver (output in `workdir`/driver.log) is yielded."""
    spec = two_worker_spec(name, cache)
    spec["search"] = {"seed": {"grid": [0]}}
    spec["base"].update(iterations=200, checkpoint_every=20)
    spec["base"]["eval"]["every"] = 20
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    cmd = [sct_sweep(), "run", str(path), "--num-cpus", "2"]
    with driver_process(cmd, env, workdir / "driver.log") as driver:
        _wait_for_checkpoint(Path(env["SCT_PROJECT_DIR"]) / "ray_results" / name, step, driver)
        yield driver


def assert_went_on_in_its_run(uri: str, sweep: str) -> None:
    """The trial's one MLflow run finished after a second attempt that went on from a checkpoint (not from
    the start), with a continuous FID history, no step twice, and no run left RUNNING."""
    from sct_sweeps import tracking

    client = tracking.client(uri)
    runs = child_runs(uri, sweep)
    assert len(runs) == 1, [r.info.run_id for r in runs]  # the retry reattached to the trial's one run
    run = runs[0]
    tags = run.data.tags
    assert run.info.status == "FINISHED", tags.get("sct.error")
    assert int(tags["sct.attempts"]) >= 2 and 20 <= int(tags["sct.resumed_from"]) < 200, tags
    assert [m.step for m in client.get_metric_history(run.info.run_id, "fid_1step")] == list(range(0, 201, 20))
    assert_no_duplicate_steps(client, run)
    exp = client.get_experiment_by_name(sweep)
    assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")


@pytest.mark.slow
# The driver's SIGKILL then `sct-sweep resume` (~80 s) runs with SCT_LONG_TESTS=1: the default suite keeps to
# its 15-minute budget with the worker's (the one-process resume is tests/test_resume.py).
@pytest.mark.parametrize("killed", ["worker", "driver"] if os.environ.get("SCT_LONG_TESTS") else ["worker"])
def test_interrupted_trial_goes_on_from_its_checkpoint(
    killed: str, tmp_path: Path, cli_env: dict[str, str], ray_tmp: Path, pretrain_cache: Path
) -> None:
    """worker: SIGKILL of one of the trial's two Train workers; Ray Train restarts both from the checkpoint.
    driver: SIGKILL of the driver (and with it the embedded Ray); `sct-sweep resume` goes on from it."""
    name = f"dp{killed}"
    with sweep_at_checkpoint(name, 40 if killed == "driver" else 20, tmp_path, cli_env, pretrain_cache) as driver:
        if killed == "worker":
            workers = _train_workers(ray_tmp)
            assert len(workers) == 2, workers
            kill_pids(workers[:1])
            driver.wait(timeout=600)
        else:
            driver.kill()
            driver.wait(timeout=30)
    out = (tmp_path / "driver.log").read_text()
    if killed == "driver":
        deadline = time.time() + 60
        while processes_under(str(ray_tmp)) and time.time() < deadline:
            time.sleep(1)
        assert not processes_under(str(ray_tmp)), "Ray processes outlived the SIGKILLed driver"
        cmd = [sct_sweep(), "resume", name, "--num-cpus", "2"]
        out = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=600).stdout
    assert f"sweep {name}: 1 trials, 0 failed" in out, out[-5000:]
    assert_went_on_in_its_run(f"sqlite:///{Path(cli_env['SCT_PROJECT_DIR']) / 'mlruns.db'}", name)


@pytest.mark.slow
def test_two_worker_trials_log_one_run_each_and_free_their_workers_when_stopped(
    tmp_path: Path, cli_env: dict[str, str], pretrain_cache: Path
) -> None:
    """Two 2-worker trials, each one MLflow run (tagged `sct.world_size` 2 and its ranks' nodes) with a FID
    history. ASHA with max_t below the budget stops each trial at iteration 20: the next trial gets the
    stopped one's workers (no wait for resources) and no MLflow run stays RUNNING."""
    spec = two_worker_spec("dp", pretrain_cache, scheduler={"type": "asha", "max_t": 20, "grace_period": 10})
    spec["base"]["iterations"] = 200
    run_sweep_cli(spec, tmp_path, cli_env, trials=2)
    project = Path(cli_env["SCT_PROJECT_DIR"])
    uri = f"sqlite:///{project / 'mlruns.db'}"
    from sct_sweeps import tracking

    client = tracking.client(uri)
    runs = child_runs(uri, "dp")
    assert len(runs) == 2 and {r.data.tags["sct.axis.seed"] for r in runs} == {"0", "1"}
    for run in runs:
        tags = run.data.tags
        assert run.info.status == "FINISHED", tags.get("sct.error")
        assert tags["sct.world_size"] == "2" and 20 <= run.data.metrics["iteration"] < 200
        nodes = tags["sct.nodes"].split(",")
        assert len(nodes) == 2 and nodes[0] == tags["sct.node_id"]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "fid_1step")]
        assert steps == list(range(0, max(steps) + 10, 10)) and max(steps) >= 20, steps  # stopped at 20 or soon after
        assert run.data.params["optim.batch_size"] == "64"  # the global batch, split over the workers
        assert_no_duplicate_steps(client, run)
    exp = client.get_experiment_by_name("dp")
    assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")

    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(project / "ray_results" / "dp"))
    assert [t.status for t in analysis.trials] == ["TERMINATED"] * 2
    for trial in analysis.trials:
        assert 10 <= trial.last_result["iteration"] < 200 and "fid_1step" in trial.last_result  # ASHA: rung 10 or 20
        ckpt = Path(trial.last_result["checkpoint_path"])  # Ray Train's checkpoint, in the trial's directory
        assert ckpt.parent == project / "ray_results" / "dp" / trial.trial_id and (ckpt / "state.pt").is_file()

    status = subprocess.run([sct_sweep(), "status", "dp"], env=cli_env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and status.stdout.count("TERMINATED") == 2, status.stdout + status.stderr
    from sct_sweeps.status import trial_rows

    _, rows = trial_rows("dp", project / "ray_results")
    assert [row[4] for row in rows] == [runs[0].data.tags["sct.node_id"][:12]] * 2  # each trial's node(s)
