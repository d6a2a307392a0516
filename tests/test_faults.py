"""Faults a sweep survives: a trial that raises (NaN loss), a SIGKILLed trial worker, a corrupt checkpoint.

One sweep carries all three (each sweep costs a Ray start and worker start-ups): trial `lr=1e30`
diverges on every attempt; trial `lr=1e-3` has its worker SIGKILLed mid-run right after its newest
checkpoint was truncated, so Ray restarts it and the trial falls back to the previous good checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from conftest import assert_no_duplicate_steps, child_runs, driver_process, processes_under, sct_sweep, tiny_spec

from sct_sweeps import tracking
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.config import TrainConfig
from trainer.errors import CheckpointError

ITERATIONS = 60  # evaluations (and checkpoints) every 10: the kill lands between two of them


def trial_worker(ray_tmp: Path, trial_id: str) -> int | None:
    """PID of the Ray worker running trial `trial_id` (Ray moves its cwd to `.../working_dirs/<trial_id>`)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            title = (entry / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if cwd.startswith(str(ray_tmp)) and cwd.endswith(f"/{trial_id}") and title.startswith(b"ray::"):
            return int(entry.name)
    return None


def listening_addresses(pids: list[int]) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} write them) of the TCP sockets `pids` listen on."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                found.add(cols[1].rsplit(":", 1)[0])
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def _steps(client: object, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def _kill_after_truncating_newest_checkpoint(
    client: object, run: object, results: Path, ray_tmp: Path
) -> tuple[int, int]:
    """Freeze the trial's worker where Ray has registered its newest checkpoint, truncate that checkpoint,
    SIGKILL the worker. Returns (step of the truncated checkpoint, step of the previous one)."""
    trial_id = run.data.tags["sct.trial_id"]
    pid = trial_worker(ray_tmp, trial_id)
    assert pid is not None, f"no worker process for trial {trial_id}"
    os.kill(pid, signal.SIGSTOP)
    # FID at step F is logged just before checkpoint F is handed to Ray; loss at F + 5 only after Ray
    # took it (reports are synchronous). So with the worker frozen at loss >= F + 5, checkpoint F is
    # Ray's newest one and no later one exists.
    try:
        fid, loss = max(_steps(client, run.info.run_id, "fid_1step")), max(_steps(client, run.info.run_id, "loss"))
    except Exception:  # e.g. frozen in the middle of an SQLite write: try again a moment later
        fid = loss = -1
    if fid < 10 or loss < fid + 5 or fid >= ITERATIONS - 10:
        os.kill(pid, signal.SIGCONT)
        return -1, -1
    try:
        by_step = {}
        for d in (results / trial_id).glob("checkpoint_*"):
            meta = d / "sct_run.json"
            if meta.is_file():
                by_step[json.loads(meta.read_text())["step"]] = d
        assert fid in by_step and fid - 10 in by_step, (fid, sorted(by_step))
        state = by_step[fid] / "state.pt"
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
        # Security on the way: every socket the embedded Ray listens on is on loopback.
        addrs = listening_addresses(processes_under(str(ray_tmp)) + [pid])
        assert addrs and addrs <= LOOPBACK, addrs
    finally:
        os.kill(pid, signal.SIGKILL)  # never leave a frozen worker behind
    return fid, fid - 10


@pytest.mark.slow
def test_trial_faults_do_not_stop_the_sweep(
    tmp_path: Path, cli_env: dict[str, str], ray_tmp: Path, pretrain_cache: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    raw = tiny_spec("faults", pretrain_cache, iterations=ITERATIONS)
    raw["base"]["optim"] = {"batch_size": 64, "name": "adam"}
    raw["search"] = {"optim.lr": {"grid": [1e-3, 1e30]}}  # 1e30: the loss is NaN within 5 iterations
    raw["max_failures"] = 1
    raw["mlflow_flush_s"] = 0  # every report in MLflow at once: the kill below is timed by what MLflow shows
    spec = tmp_path / "faults.yaml"
    spec.write_text(yaml.safe_dump(raw))
    results = Path(cli_env["SCT_PROJECT_DIR"]) / "ray_results" / "faults"
    cmd = [sct_sweep(), "run", str(spec), "--tracking-uri", uri, "--num-cpus", "2", "--no-report"]
    with driver_process(cmd, cli_env, tmp_path / "driver.log") as driver:
        deadline, killed = time.time() + 300, (-1, -1)
        while time.time() < deadline and driver.poll() is None and killed[0] < 0:
            if not (results / "sct_sweep.json").exists():  # the driver creates the store first: no race
                time.sleep(1)
                continue
            client = tracking.client(uri)
            good = [r for r in child_runs(uri, "faults") if float(r.data.tags["sct.axis.optim.lr"]) == 1e-3]
            if good and good[0].info.status == "RUNNING" and good[0].data.metrics.get("iteration", 0) >= 15:
                killed = _kill_after_truncating_newest_checkpoint(client, good[0], results, ray_tmp)
            time.sleep(0.1)
        assert killed[0] > 0, "the trial was never caught mid-run:\n" + (tmp_path / "driver.log").read_text()[-3000:]
        driver.wait(timeout=400)
    out = (tmp_path / "driver.log").read_text()
    assert driver.returncode == 0, out[-3000:]  # one failed trial of two: the sweep still reports
    assert "sweep faults: 2 trials, 1 failed" in out and "sct-sweep status faults" in out, out[-3000:]

    client = tracking.client(uri)
    runs = child_runs(uri, "faults")
    assert len(runs) == 2, [r.info.run_name for r in runs]  # retries and restarts reuse their run
    good = next(r for r in runs if float(r.data.tags["sct.axis.optim.lr"]) == 1e-3)
    bad = next(r for r in runs if float(r.data.tags["sct.axis.optim.lr"]) == 1e30)

    # The killed trial: restarted by Ray, past the truncated checkpoint, in the same MLflow run.
    assert good.info.status == "FINISHED", good.data.tags.get("sct.error")
    assert good.data.tags["sct.attempts"] == "2"
    assert good.data.tags["sct.resumed_from"] == str(killed[1])  # the previous good checkpoint
    assert "checksum mismatch" in good.data.tags["sct.skipped_checkpoints"]
    assert _steps(client, good.info.run_id, "fid_1step") == list(range(0, ITERATIONS + 10, 10))
    assert_no_duplicate_steps(client, good)

    # The diverging trial: FAILED with the reason, never a NaN curve. Divergence recurs from the same checkpoint,
    # so Ray's retry (max_failures) ended at once without training again.
    assert bad.info.status == "FAILED"
    assert bad.data.tags["sct.attempts"] == "2" and "sct.not_retried" in bad.data.tags
    assert bad.data.tags["sct.recurring_error"].startswith("DivergenceError")
    assert_no_duplicate_steps(client, bad)  # the retry logged nothing
    error = bad.data.tags["sct.error"]
    assert error.startswith("DivergenceError: sct loss became") and "lower optim.lr" in error, error
    assert all(math.isfinite(m.value) for m in client.get_metric_history(bad.info.run_id, "loss"))
    details = Path(client.download_artifacts(bad.info.run_id, "error.txt", str(tmp_path))).read_text()
    assert "Traceback" in details and "DivergenceError" in details
    parent = client.get_run(bad.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED" and parent.data.tags["sct.failed_trials"] == "1"

    from ray.tune import ExperimentAnalysis

    trials = {t.trial_id: t for t in ExperimentAnalysis(str(results)).trials}
    ray_good, ray_bad = trials[good.data.tags["sct.trial_id"]], trials[bad.data.tags["sct.trial_id"]]
    assert (ray_good.status, ray_good.num_failures) == ("TERMINATED", 1)
    assert (ray_bad.status, ray_bad.num_failures) == ("ERROR", 2)  # first try + max_failures retries

    from sct_sweeps.status import trial_rows

    rows = {row[0]: row for row in trial_rows("faults")[1]}
    assert rows[ray_bad.trial_id][3] == "ERROR" and "DivergenceError" in rows[ray_bad.trial_id][7]

    # A run of a trial Ray never recorded (started after the last state snapshot of a driver that then
    # died) is retired when the sweep resumes: Ray reruns that configuration as a new trial.
    from mlflow.entities import ViewType

    from sct_sweeps.books import retire_orphans
    from sct_sweeps.record import load_record
    from sct_sweeps.stores import resolve_stores

    tags = {**{k: v for k, v in good.data.tags.items() if k != "mlflow.runName"}, "sct.trial_id": "lost_00009"}
    lost = client.create_run(good.info.experiment_id, tags=tags, run_name="lost").info.run_id
    assert retire_orphans(load_record("faults", resolve_stores().results)) == [lost]
    assert {r.info.run_id for r in child_runs(uri, "faults")} == {good.info.run_id, bad.info.run_id}
    trash = client.search_runs([good.info.experiment_id], run_view_type=ViewType.DELETED_ONLY)
    assert [(r.info.run_id, r.info.status) for r in trash] == [(lost, "KILLED")]
    assert "rerun as a new trial" in trash[0].data.tags["sct.orphaned"]


def _tiny_cfg(tmp_path: Path) -> TrainConfig:
    return TrainConfig.model_validate({
        "method": "ect", "iterations": 10, "device": "cpu", "out_dir": str(tmp_path / "run"),
        "network": {"model_channels": 8, "channel_mult": [1], "num_blocks": 1},
        "pretrain": {"iterations": 0}, "optim": {"batch_size": 16},
        "eval": {"at_start": False, "every": 100, "fid_samples": 32, "batch_size": 32},
    })  # fmt: skip


@pytest.mark.parametrize("damage", ["truncated", "flipped-byte", "empty"])
def test_trainer_refuses_a_damaged_resume_checkpoint(tmp_path: Path, damage: str) -> None:
    from trainer.train import train

    ckpt = tmp_path / "ckpt" / "it0000010"
    state = save_checkpoint(ckpt / "state.pt", {"iteration": 10, "model": {}})
    data = bytearray(state.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "flipped-byte":
        data[len(data) // 2] ^= 0xFF
    else:
        data = bytearray()
    state.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:  # detected: never a silent restart from scratch
        train(_tiny_cfg(tmp_path), resume_from=ckpt)
    msg = str(info.value)
    assert str(state) in msg and "\n" not in msg and "checksum mismatch" in msg
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained, nothing reported
    if damage != "flipped-byte":  # without the sidecar, torch's own load error is caught and named too
        state.with_name("state.pt.sha256").unlink()
        with pytest.raises(CheckpointError, match=f"{state}: cannot load checkpoint"):
            load_checkpoint(state)


def test_ray_checkpoints_are_pruned_only_where_no_snapshot_can_name_them(tmp_path: Path) -> None:
    """Ray keeps every checkpoint (num_to_keep=None: with a limit it could delete the one its last
    experiment-state snapshot names); a trial prunes its own: every checkpoint newer than the newest
    snapshot stays, and the newest three from before it."""
    from sct_sweeps.trial_checkpoints import prune_ray_checkpoints

    trial = tmp_path / "exp" / "trial_0"
    for i in range(8):
        d = trial / f"checkpoint_{i:06d}"
        d.mkdir(parents=True)
        os.utime(d, (1000 + 10 * i, 1000 + 10 * i))
    assert prune_ray_checkpoints(trial) == []  # no snapshot yet: nothing may go
    snapshot = tmp_path / "exp" / "experiment_state-2026-12-06_05-00-00.json"
    snapshot.write_text("{}")
    os.utime(snapshot, (1045, 1045))  # after checkpoints 0-4, before 5-7
    gone = prune_ray_checkpoints(trial)
    assert [d.name for d in gone] == ["checkpoint_000000", "checkpoint_000001"]
    assert sorted(d.name for d in trial.iterdir()) == [f"checkpoint_{i:06d}" for i in range(2, 8)]


@pytest.mark.slow
def test_a_trial_killed_between_evaluations_resumes_from_its_latest_checkpoint(
    tmp_path: Path, cli_env: dict[str, str], ray_tmp: Path, pretrain_cache: Path
) -> None:
    """`checkpoint_every` checkpoints reach Ray: a worker SIGKILLed at iteration >= 25 with checkpoints every 10
    and one evaluation at the end resumes from iteration 20 or later, not from the start."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    raw = tiny_spec("between", pretrain_cache, seeds=[0], iterations=40)
    raw["base"]["eval"].update({"every": 40, "at_start": False})
    raw["base"]["checkpoint_every"] = 10
    raw["mlflow_flush_s"] = 0
    spec = tmp_path / "between.yaml"
    spec.write_text(yaml.safe_dump(raw))
    results = Path(cli_env["SCT_PROJECT_DIR"]) / "ray_results" / "between"
    cmd = [sct_sweep(), "run", str(spec), "--tracking-uri", uri, "--num-cpus", "2", "--no-report"]
    with driver_process(cmd, cli_env, tmp_path / "driver.log") as driver:
        deadline, killed_at = time.time() + 300, None
        while time.time() < deadline and driver.poll() is None and killed_at is None:
            runs = child_runs(uri, "between") if (results / "sct_sweep.json").exists() else []
            if runs and runs[0].info.status == "RUNNING" and 25 <= runs[0].data.metrics.get("iteration", 0) < 35:
                pid = trial_worker(ray_tmp, runs[0].data.tags["sct.trial_id"])
                if pid is not None:
                    killed_at = int(runs[0].data.metrics["iteration"])
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        log = (tmp_path / "driver.log").read_text()
        assert killed_at is not None, "the trial was never caught mid-run:\n" + log[-3000:]
        driver.wait(timeout=300)
    assert driver.returncode == 0, (tmp_path / "driver.log").read_text()[-3000:]
    client = tracking.client(uri)
    (run,) = child_runs(uri, "between")
    assert run.info.status == "FINISHED" and run.data.tags["sct.attempts"] == "2", run.data.tags
    resumed = int(run.data.tags["sct.resumed_from"])
    assert 20 <= resumed <= killed_at and resumed % 10 == 0, (resumed, killed_at)
    assert _steps(client, run.info.run_id, "fid_1step") == [40]
    assert_no_duplicate_steps(client, run)
