"""A real sweep end to end: `sct-sweep run` (embedded Ray, SQLite MLflow, digits), read back two ways."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import assert_no_duplicate_steps, processes_under, sct_sweep, tiny_spec

from sct_sweeps import tracking


@pytest.mark.slow
def test_sweep_end_to_end(tmp_path: Path, cli_env: dict[str, str], pretrain_cache: Path) -> None:
    spec = tmp_path / "e2e.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec("e2e", pretrain_cache)))
    project = Path(cli_env["SCT_PROJECT_DIR"])
    done = subprocess.run(
        [sct_sweep(), "run", str(spec), "--num-cpus", "2"], env=cli_env, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "sweep e2e: 4 trials, 0 failed" in done.stdout, done.stdout

    # MLflow (default store of the project): a parent with the spec, one finished child per trial.
    uri = f"sqlite:///{project / 'mlruns.db'}"
    client = tracking.client(uri)
    exp = client.get_experiment_by_name("e2e")
    assert exp is not None and exp.artifact_location == (project / "mlartifacts" / "e2e").as_uri()
    parents = client.search_runs([exp.experiment_id], "tags.`sct.role` = 'parent'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    parent_files = [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert "spec.yaml" in parent_files
    assert "report" in parent_files and (project / "reports" / "e2e" / "index.html").is_file(), done.stdout
    spec_text = Path(client.download_artifacts(parent.info.run_id, "spec.yaml", str(tmp_path))).read_text()
    assert yaml.safe_load(spec_text)["search"]["sct.ref_batch"] == {"grid": [1, "all"]}
    assert parent.data.params["trials"] == "4" and parent.data.tags["sct.sweep"] == "e2e"

    children = client.search_runs([exp.experiment_id], "tags.`sct.role` = 'trial'")
    assert len(children) == 4
    assert len({c.data.tags["sct.trial_id"] for c in children}) == 4
    combos = {(c.data.tags["sct.axis.network.model_channels"], c.data.tags["sct.axis.sct.ref_batch"]) for c in children}
    assert combos == {("8", "1"), ("8", "all"), ("16", "1"), ("16", "all")}
    for c in children:
        assert c.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert c.info.status == "FINISHED", c.data.tags.get("sct.error")
        assert c.info.run_name.startswith("sct-w")
        assert c.data.params["sct.ref_batch"] in ("1", "all") and c.data.params["iterations"] == "20"
        for key in ("fid_1step", "fid_2step"):
            assert [m.step for m in client.get_metric_history(c.info.run_id, key)] == [0, 10, 20]
        assert {"loss", "images_seen", "flops", "wall_s", "fid_1step_online"} <= set(c.data.metrics)
        assert_no_duplicate_steps(client, c)
        grids = [a.path for a in client.list_artifacts(c.info.run_id, "samples")]
        assert any(p.endswith(".png") for p in grids), grids

    # Ray's own record of the sweep.
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(project / "ray_results" / "e2e"))
    assert [t.status for t in analysis.trials] == ["TERMINATED"] * 4
    assert all(t.last_result["iteration"] == 20 and "fid_1step" in t.last_result for t in analysis.trials)
    assert all(t.checkpoint is not None for t in analysis.trials)
    assert {t.trial_id for t in analysis.trials} == {c.data.tags["sct.trial_id"] for c in children}

    # The phase one was trained once per distinct pretraining config (2 widths), not once per trial.
    assert len(list(pretrain_cache.glob("*.pt"))) >= 2
    pre = Counter(c.data.tags["sct.pretrain_checkpoint"] for c in children)
    assert sorted(pre.values()) == [2, 2]
    assert all(c.data.tags["sct.path.pretrain.checkpoint"] == c.data.tags["sct.pretrain_checkpoint"] for c in children)
    assert not any("pretrain.checkpoint" in c.data.params for c in children)  # a path: a tag, not a param

    status = subprocess.run([sct_sweep(), "status", "e2e"], env=cli_env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and status.stdout.count("TERMINATED") == 4, status.stdout + status.stderr

    # A trial's last checkpoint samples with any step count.
    grid = tmp_path / "grid.png"
    ckpt = analysis.trials[0].checkpoint.path
    done = subprocess.run([sct_sweep(), "sample", ckpt, "--steps", "2", "--n", "16", "--out", str(grid)],
                          env=cli_env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and grid.read_bytes()[:4] == b"\x89PNG", done.stdout + done.stderr


@pytest.mark.slow
def test_optuna_sweep_with_asha(tmp_path: Path, cli_env: dict[str, str], pretrain_cache: Path) -> None:
    raw = tiny_spec("tpe", pretrain_cache, iterations=30)
    raw["search"] = {"sct.ref_batch": {"choice": [1, 64, "all"]}, "optim.lr": {"loguniform": [1e-4, 1e-3]}}
    raw.update(algorithm="optuna", num_samples=4, max_concurrent_trials=2,
               scheduler={"type": "asha", "grace_period": 10, "reduction_factor": 2})  # fmt: skip
    spec = tmp_path / "tpe.yaml"
    spec.write_text(yaml.safe_dump(raw))
    done = subprocess.run(
        [sct_sweep(), "run", str(spec), "--num-cpus", "2", "--no-report"],
        env=cli_env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    project = Path(cli_env["SCT_PROJECT_DIR"])
    client = tracking.client(f"sqlite:///{project / 'mlruns.db'}")
    exp = client.get_experiment_by_name("tpe")
    children = client.search_runs([exp.experiment_id], "tags.`sct.role` = 'trial'")
    assert len(children) == 4
    for c in children:
        assert c.info.status == "FINISHED", (c.info.run_name, c.info.status)  # early-stopped ones too
        assert 1e-4 <= float(c.data.tags["sct.axis.optim.lr"]) <= 1e-3
        assert c.data.tags["sct.axis.sct.ref_batch"] in ("1", "64", "all")
        assert_no_duplicate_steps(client, c)
    results = project / "ray_results" / "tpe"
    assert list(results.glob("searcher-state-*.pkl")), "Optuna's state is saved for resume"
    from ray.tune import ExperimentAnalysis

    assert [t.status for t in ExperimentAnalysis(str(results)).trials] == ["TERMINATED"] * 4


def test_embedded_ray_workers_start_with_the_trainers_heap_settings(
    ray_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trial's process is started with trainer/heap.py's environment (freed heap kept), and with
    glibc's own arenas (one arena would be shared with Ray's threads; docs/benchmarks.md §2)."""
    import os

    import ray

    from sct_sweeps.session import start_ray, stop_ray
    from trainer.heap import heap_env

    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    keys = [*heap_env(), "MALLOC_ARENA_MAX"]
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")  # a user's own setting wins
    start_ray(None, 1)
    try:
        seen = ray.get(ray.remote(num_cpus=1)(lambda: {k: os.environ.get(k) for k in keys}).remote())
    finally:
        stop_ray()
    assert seen == {**heap_env(), "MALLOC_TRIM_THRESHOLD_": "12345", "MALLOC_ARENA_MAX": None}


def test_embedded_ray_prestarts_no_idle_workers_and_stops_every_process(
    ray_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No idle workers for Tune's actors to ignore; a task still gets a worker; the autoscaler monitor
    ends at once (before `ray.shutdown`, which would wait a second for it); nothing survives `stop_ray`."""
    import os
    import time

    import ray
    from ray._private import worker

    from sct_sweeps.session import EMBEDDED_RAY_ENV, _kill_autoscaler_monitor, start_ray, stop_ray

    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    for key in EMBEDDED_RAY_ENV:
        monkeypatch.delenv(key, raising=False)
    start_ray(None, 2)
    try:
        assert {k: os.environ.get(k) for k in EMBEDDED_RAY_ENV} == EMBEDDED_RAY_ENV
        started = {kind: [i.process for i in infos] for kind, infos in worker._global_node.all_processes.items()}
        assert "monitor" in started, "the autoscaler monitor this test expects Ray to start"
        time.sleep(3)  # Ray forks its prestarted workers while ray.init returns
        raylet = started["raylet"][0].pid
        idle = processes_under("ray::IDLE", parent=raylet)
        task = ray.remote(num_cpus=1)(lambda: os.getpid())
        assert ray.get(task.remote()) != os.getpid()
        seen = ray.remote(num_cpus=1)(lambda: {k: os.environ.get(k) for k in EMBEDDED_RAY_ENV})
        assert ray.get(seen.remote()) == EMBEDDED_RAY_ENV  # Ray's processes inherit the settings
        _kill_autoscaler_monitor()  # what stop_ray does first: the monitor is gone at once, Ray still works
        assert started["monitor"][0].poll() is not None
        assert started["raylet"][0].poll() is None and ray.get(task.remote()) != os.getpid()
    finally:
        stop_ray()
    assert idle == [], f"Ray prestarted idle workers {idle}"
    running = {kind: [p.pid for p in procs if p.poll() is None] for kind, procs in started.items()}
    assert not any(running.values()), f"still running after stop_ray: {running}"
