"""Resume: one MLflow run per trial for its whole life, and a SIGKILLed driver resumed by `sct-sweep resume`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import (
    assert_continued_or_finished_first,
    assert_no_duplicate_steps,
    child_runs,
    driver_process,
    sct_sweep,
    tiny_spec,
    with_env,
)

from sct_sweeps import tracking
from sct_sweeps.trial_tracker import TrialTracker


def test_tracker_reattaches_to_its_run_without_duplicate_steps(sqlite_uri: str, tmp_path: Path) -> None:
    client = tracking.client(sqlite_uri)
    exp = tracking.ensure_experiment(client, "reattach", tmp_path / "art")
    parent = tracking.start_parent_run(client, exp, "reattach", {}, "name: reattach\n", tmp_path)

    def tracker(trial: str) -> TrialTracker:
        return TrialTracker(uri=sqlite_uri, experiment_id=exp, parent_run_id=parent, sweep="reattach",
                                     trial_id=trial, run_name=f"r-{trial}", tags={}, params={"seed": "0"})

    first = tracker("t0")
    first.start()
    for step in range(0, 60, 10):
        first.log_metrics({"loss": float(step), "iteration": step}, step)
    # The process dies here (no finish). The trial restarts from its checkpoint at step 30:
    second = tracker("t0")
    assert second.start() == first.run_id and second.reattached
    for step in range(30, 90, 10):
        second.log_metrics({"loss": 1000.0 + step, "iteration": step}, step)
    second.log_metrics({"loss": -1.0}, 80)  # a second report at a logged step is dropped too
    assert second.finish() == 0
    other = tracker("t1")
    assert other.start() != first.run_id
    other.finish()

    history = client.get_metric_history(first.run_id, "loss")
    assert [m.step for m in history] == list(range(0, 90, 10))
    assert [m.value for m in history][:6] == [float(s) for s in range(0, 60, 10)]  # first attempt's values kept
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["sct.attempts"] == "2"
    runs = client.search_runs([exp], "tags.`sct.trial_id` = 't0'")
    assert len(runs) == 1


def test_tracker_sends_metrics_in_batches(sqlite_uri: str, tmp_path: Path) -> None:
    client = tracking.client(sqlite_uri)
    exp = tracking.ensure_experiment(client, "batched", tmp_path / "art")
    parent = tracking.start_parent_run(client, exp, "batched", {}, "name: batched\n", tmp_path)
    tracker = TrialTracker(uri=sqlite_uri, experiment_id=exp, parent_run_id=parent, sweep="batched",
                                    trial_id="t0", run_name="r", tags={}, params={}, flush_every_s=3600.0)
    tracker.start()

    def logged() -> list[int]:
        return [m.step for m in client.get_metric_history(tracker.run_id, "loss")]

    for step in range(3):
        tracker.log_metrics({"loss": float(step)}, step)
    assert logged() == [] and tracker.pending == 3  # start() sent the run; metrics wait for the interval
    tracker.set_tag("sct.note", "x")  # tags go at once, and take the waiting metrics along
    assert logged() == [0, 1, 2] and tracker.pending == 0
    tracker.log_metrics({"loss": 3.0}, 3)
    assert logged() == [0, 1, 2]
    assert tracker.flush() and logged() == [0, 1, 2, 3]
    tracker.log_metrics({"loss": 4.0}, 4)
    assert tracker.finish() == 0 and logged() == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_sigkilled_driver_resumes_without_rerunning_finished_trials(
    tmp_path: Path, cli_env: dict[str, str], ray_tmp: Path, pretrain_cache: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    raw = tiny_spec("killed", pretrain_cache, seeds=[0, 1, 2, 3], iterations=60)
    raw["max_concurrent_trials"] = 1  # one trial at a time: the kill lands between "finished" and "not yet"
    spec = tmp_path / "killed.yaml"
    spec.write_text(yaml.safe_dump(raw))
    cmd = [sct_sweep(), "run", str(spec), "--tracking-uri", uri, "--num-cpus", "2", "--no-report"]
    with driver_process(cmd, cli_env, tmp_path / "driver.log") as driver:
        deadline = time.time() + 400
        finished: dict[str, tuple[str, int]] = {}
        interrupted = None
        record = Path(cli_env["SCT_PROJECT_DIR"]) / "ray_results" / "killed" / "sct_sweep.json"
        while time.time() < deadline and driver.poll() is None:
            if not record.exists():  # the driver creates the SQLite store first: do not race its migration
                time.sleep(1)
                continue
            runs = child_runs(uri, "killed")
            finished = {r.info.run_id: (r.data.tags["sct.trial_id"], r.info.end_time)
                        for r in runs if r.info.status == "FINISHED"}  # fmt: skip
            # Mid-trial, past two checkpoints (10, 20: Ray then snapshots its state, so it knows them).
            running = [r for r in runs if r.info.status == "RUNNING" and 25 <= r.data.metrics.get("iteration", 0) <= 40]
            if finished and running:
                interrupted = running[0].info.run_id
                break
            time.sleep(1)
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        assert finished, "no trial finished in time"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    # The embedded Ray dies with its driver, all of it: Ray's agents (titled ray::DashboardAgent, ...) used to
    # outlive it by a minute; the driver's watchdog (sct_sweeps/watchdog.py) now ends them at once.
    deadline = time.time() + 15
    while with_env(f"RAY_TMPDIR={ray_tmp}") and time.time() < deadline:
        time.sleep(0.5)
    left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120]
            for pid in with_env(f"RAY_TMPDIR={ray_tmp}")}  # fmt: skip
    assert not left, f"Ray processes outlived the SIGKILLed driver: {left}"
    # `sct-sweep status` shows what the driver last saved: the interrupted trial as RUNNING (not PENDING).
    from sct_sweeps.status import trial_states

    assert "RUNNING" in trial_states(str(record.parent)).values(), trial_states(str(record.parent))

    resumed_at = int(time.time() * 1000)
    done = subprocess.run(
        [sct_sweep(), "resume", "killed", "--num-cpus", "2", "--no-report"],
        env=cli_env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The bar counts the trials that had ended before the kill; the efficiency counts this session's trials only.
    assert re.search(r"trials\b.*\b4/4\b", done.stdout), done.stdout[-2000:]
    efficiency = int(re.search(r"trial phase efficiency (\d+)%", done.stdout).group(1))
    assert 0 < efficiency <= 100, done.stdout[-2000:]

    runs = child_runs(uri, "killed")
    per_trial = Counter(r.data.tags["sct.trial_id"] for r in runs)
    assert len(per_trial) == 4 and set(per_trial.values()) == {1}, per_trial  # one run per trial
    client = tracking.client(uri)
    for r in runs:
        assert r.info.status == "FINISHED", (r.info.run_name, r.info.status)
        assert_no_duplicate_steps(client, r)
        fid = [m.step for m in client.get_metric_history(r.info.run_id, "fid_1step")]
        assert fid == list(range(0, 70, 10)), fid  # continuous, to the end
        if r.info.run_id in finished:  # finished before the kill: untouched by the resume
            assert r.data.tags["sct.attempts"] == "1"
            assert r.info.end_time == finished[r.info.run_id][1]
    # The trial the kill interrupted went on in its own run (second attempt), not in a new one.
    assert_continued_or_finished_first(next(r for r in runs if r.info.run_id == interrupted), resumed_at)
    parent = client.search_runs([runs[0].info.experiment_id], "tags.`sct.role` = 'parent'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    record = json.loads((Path(cli_env["SCT_PROJECT_DIR"]) / "ray_results" / "killed" / "sct_sweep.json").read_text())
    assert record["parent_run_id"] == parent[0].info.run_id
