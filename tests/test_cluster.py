"""The same sweep on a real two-node Ray cluster (all on 127.0.0.1) with a shared MLflow server.

One test, one cluster: `ray start --head` and a second `ray start --address` node (each with one CPU,
in their own process groups, stopped by PID), a real `mlflow server`, and an Optuna sweep of four
trials run with `sct-sweep run --address --tracking-uri`. Its driver is SIGKILLed mid-sweep and
`sct-sweep resume --address` finishes it. Checked: trials ran on both nodes, one MLflow run per trial
nested under the sweep's parent, continuous metric histories, artifacts in the server's store, the
Optuna searcher's history restored, and `sct-sweep status`. A second test submits a sweep with `ray job
submit` to a head's job server (the route README's "As a Ray job" describes).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import (
    VENV_BIN,
    MlflowServer,
    assert_continued_or_finished_first,
    assert_no_duplicate_steps,
    child_runs,
    driver_process,
    free_port,
    kill_pids,
    processes_under,
    sct_sweep,
    tiny_spec,
    with_env,
)

from sct_sweeps import tracking

ITERATIONS = 80  # long enough that the trial interrupted at iteration >= 25 cannot finish before its actor dies


def _group(pgid: int) -> list[int]:
    """Live PIDs of process group `pgid` (a `ray start --block` we started and what it spawned)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


class RayNode:
    """One `ray start --block` node in its own session: its PID is the process group we stop."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, cpus: int = 1) -> None:
        self.log = log
        with open(log, "wb") as f:
            cmd = [str(VENV_BIN / "ray"), "start", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
                   f"--dashboard-agent-listen-port={free_port()}", "--object-store-memory=100000000", "--block",
                   *args]  # fmt: skip
            self.proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_started(self, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while "Ray runtime started" not in self.log.read_text(errors="replace"):
            assert self.proc.poll() is None and time.time() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGKILL the node's process group (its SIGTERM handler drains the node for tens of seconds)."""
        pgid = self.proc.pid
        deadline = time.time() + 15
        while _group(pgid) and time.time() < deadline:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            time.sleep(0.2)
        kill_pids(_group(pgid))
        self.proc.wait(timeout=10)


def _left_behind(ray_tmp: Path, grace_s: float = 10.0) -> dict[int, str]:
    """Processes of the cluster (by its RAY_TMPDIR) still alive `grace_s` after the nodes stopped, with their
    command lines; killed before returning."""
    deadline = time.time() + grace_s
    while (left := with_env(f"RAY_TMPDIR={ray_tmp}")) and time.time() < deadline:
        time.sleep(0.5)
    named = {}
    for pid in left:
        try:
            named[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
        except OSError:
            named[pid] = "?"
    kill_pids(left)
    return named


def _raylet_node_ids(ray_tmp: Path) -> set[str]:
    ids = set()
    for pid in processes_under(str(ray_tmp)):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args[0].endswith(b"/raylet"):
            ids |= {a.split(b"=", 1)[1].decode() for a in args if a.startswith(b"--node_id=")}
    return ids


def _optuna_study(results: Path) -> object:
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch()
    searcher.restore_from_dir(str(results))  # the newest searcher-state-*.pkl
    return searcher._ot_study


@pytest.mark.slow
def test_sweep_on_a_two_node_cluster_survives_a_driver_kill(
    tmp_path: Path, cluster_env: dict[str, str], ray_tmp: Path, pretrain_cache: Path
) -> None:
    server = MlflowServer(tmp_path)
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = RayNode(
        ["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={ray_tmp}"],
        cluster_env, tmp_path / "head.log",
    )  # fmt: skip
    nodes = [head]
    try:
        server.start()
        head.wait_started()
        nodes.append(RayNode([f"--address={address}"], cluster_env, tmp_path / "worker.log"))
        nodes[1].wait_started()
        node_ids = _raylet_node_ids(ray_tmp)
        assert len(node_ids) == 2, node_ids

        raw = tiny_spec("cluster", pretrain_cache, iterations=ITERATIONS)
        raw["search"] = {"optim.lr": {"loguniform": [5e-4, 2e-3]}}
        raw.update(algorithm="optuna", num_samples=4, max_concurrent_trials=2)
        spec = tmp_path / "cluster.yaml"
        spec.write_text(yaml.safe_dump(raw))
        project = Path(cluster_env["SCT_PROJECT_DIR"])
        results = project / "ray_results" / "cluster"

        # Run; SIGKILL the driver once a trial finished and another is mid-run past two checkpoints (and
        # far from its end: the driver's death reaches a worker node's actors only after a moment).
        cmd = [sct_sweep(), "run", str(spec), "--address", address, "--tracking-uri", server.url, "--no-report"]
        finished: dict[str, int] = {}
        interrupted = None
        with driver_process(cmd, cluster_env, tmp_path / "driver.log") as driver:
            deadline = time.time() + 400
            while time.time() < deadline and driver.poll() is None and interrupted is None:
                runs = child_runs(server.url, "cluster") if (results / "sct_sweep.json").exists() else []
                finished = {r.info.run_id: r.info.end_time for r in runs if r.info.status == "FINISHED"}
                mid = [r for r in runs if r.info.status == "RUNNING" and 25 <= r.data.metrics.get("iteration", 0) <= 45]
                if finished and mid:
                    interrupted = mid[0].info.run_id
                time.sleep(0.5)
            assert interrupted and driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            os.kill(driver.pid, signal.SIGKILL)
            driver.wait(timeout=30)

        resumed_at = int(time.time() * 1000)
        done = subprocess.run(
            [sct_sweep(), "resume", "cluster", "--address", address, "--no-report"],
            env=cluster_env, capture_output=True, text=True, timeout=400,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "sweep cluster: 4 trials, 0 failed" in done.stdout, done.stdout[-3000:]

        # MLflow server: one parent, one finished run per trial nested under it, continuous histories.
        client = tracking.client(server.url)
        exp = client.get_experiment_by_name("cluster")
        parents = client.search_runs([exp.experiment_id], "tags.`sct.role` = 'parent'")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert parents[0].data.params["ray.address"] == address
        runs = child_runs(server.url, "cluster")
        per_trial = Counter(r.data.tags["sct.trial_id"] for r in runs)
        assert len(per_trial) == 4 and set(per_trial.values()) == {1}, per_trial
        artifacts = server.store / "artifacts"
        for r in runs:
            assert r.info.status == "FINISHED", (r.info.run_name, r.info.status)
            assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
            steps = [m.step for m in client.get_metric_history(r.info.run_id, "fid_1step")]
            assert steps == list(range(0, ITERATIONS + 10, 10)), steps
            assert_no_duplicate_steps(client, r)
            grids = [a.path for a in client.list_artifacts(r.info.run_id, "samples")]
            assert grids and all(p.endswith(".png") for p in grids), grids
            assert list(artifacts.rglob(f"{r.info.run_id}/artifacts/samples/*.png")), "not in the server's store"
            if r.info.run_id in finished:  # finished before the kill: untouched by the resume
                assert r.data.tags["sct.attempts"] == "1" and r.info.end_time == finished[r.info.run_id]
        from mlflow.entities import ViewType

        lost = client.search_runs([exp.experiment_id], "tags.`sct.role` = 'trial'", run_view_type=ViewType.DELETED_ONLY)
        for r in lost:  # trials Ray forgot with the driver (started after its last snapshot): rerun, not kept
            assert "sct.orphaned" in r.data.tags and r.info.status != "RUNNING", r.data.tags
        assert_continued_or_finished_first(next(r for r in runs if r.info.run_id == interrupted), resumed_at)
        assert {r.data.tags["sct.node_id"] for r in runs} == node_ids  # trials ran on both nodes
        assert len({r.data.tags["sct.pretrain_checkpoint"] for r in runs}) == 1  # one shared phase one

        # The Optuna searcher came back with its history: 4 trials told their final FIDs, no fresh start.
        from ray.tune import ExperimentAnalysis

        trials = ExperimentAnalysis(str(results)).trials
        assert [t.status for t in trials] == ["TERMINATED"] * 4
        assert {t.trial_id for t in trials} == set(per_trial)
        study = _optuna_study(results)
        assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
        told = sorted(t.value for t in study.trials)
        final = sorted(t.last_result["fid_1step"] for t in trials)
        assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(told, final, strict=True)), (told, final)

        # `sct-sweep status` reads the shared results storage: trials, state, node, best FID.
        from typer.testing import CliRunner

        from sct_sweeps.cli import app
        from sct_sweeps.status import trial_rows

        shown = CliRunner().invoke(app, ["status", "cluster"])
        assert shown.exit_code == 0 and shown.output.count("TERMINATED") == 4, shown.output
        metric, rows = trial_rows("cluster")
        assert metric == "fid_1step" and {row[3] for row in rows} == {"TERMINATED"}
        assert {row[4] for row in rows} == {n[:12] for n in node_ids} and all(row[6] != "-" for row in rows)
    finally:
        for node in reversed(nodes):
            node.stop()
        server.stop(graceful=False)
    left = _left_behind(ray_tmp)  # any process of this cluster, workers included
    assert not left, f"processes of the cluster left running: {left}"


@pytest.mark.slow
def test_ray_job_submit_runs_the_sweep_on_the_cluster(
    tmp_path: Path, cluster_env: dict[str, str], ray_tmp: Path, pretrain_cache: Path
) -> None:
    """README's "As a Ray job" route: `ray job submit -- sct-sweep run x.yaml` against a head's job server,
    with two-worker trials spread over the cluster's two nodes (`resources.placement: spread`).

    The driver then runs on the cluster (RAY_ADDRESS set by Ray), so `sct-sweep run` needs no --address.
    Each node has 2 CPUs: packed, a trial's two 1-CPU workers would share a node.
    """
    port, dashboard = free_port(), free_port()
    head = RayNode(
        ["--head", f"--port={port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--temp-dir={ray_tmp}"],
        cluster_env, tmp_path / "head.log", cpus=2,
    )  # fmt: skip
    nodes = [head]
    try:
        head.wait_started()
        nodes.append(RayNode([f"--address=127.0.0.1:{port}"], cluster_env, tmp_path / "worker.log", cpus=2))
        nodes[1].wait_started()
        node_ids = _raylet_node_ids(ray_tmp)
        assert len(node_ids) == 2, node_ids
        spec = tmp_path / "job.yaml"
        raw = tiny_spec("job", pretrain_cache, iterations=20)
        raw["search"] = {"seed": {"grid": [0, 1]}}
        raw["resources"] = {"cpu": 1, "gpu": 0, "workers": 2, "placement": "spread"}
        spec.write_text(yaml.safe_dump(raw))
        store = f"sqlite:///{tmp_path / 'mlflow.db'}"
        ray = str(VENV_BIN / "ray")
        job = f"http://127.0.0.1:{dashboard}"
        submit = subprocess.run(
            [ray, "job", "submit", "--address", job, "--submission-id", "sct-job", "--",
             sct_sweep(), "run", str(spec), "--tracking-uri", store, "--no-report"],
            env=cluster_env, capture_output=True, text=True, timeout=400,
        )  # fmt: skip
        out = submit.stdout + submit.stderr
        assert submit.returncode == 0, out[-3000:]
        assert "sweep job: 2 trials, 0 failed" in out, out[-3000:]
        from ray.job_submission import JobStatus, JobSubmissionClient

        assert JobSubmissionClient(job).get_job_status("sct-job") == JobStatus.SUCCEEDED

        client = tracking.client(store)
        exp = client.get_experiment_by_name("job")
        parents = client.search_runs([exp.experiment_id], "tags.`sct.role` = 'parent'")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert parents[0].data.params["ray.address"] != "embedded"  # the job's driver joined the cluster
        runs = child_runs(store, "job")
        assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
        assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parents[0].info.run_id}
        for r in runs:  # spread: one rank on each node (rank 0's node first)
            assert r.data.tags["sct.world_size"] == "2" and set(r.data.tags["sct.nodes"].split(",")) == node_ids
            assert [m.step for m in client.get_metric_history(r.info.run_id, "fid_1step")] == [0, 10, 20]
    finally:
        for node in reversed(nodes):
            node.stop()
    left = _left_behind(ray_tmp)
    assert not left, f"processes of the cluster left running: {left}"
