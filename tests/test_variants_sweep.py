"""Evaluation-only axes in a sweep (sct_sweeps/variants.py): one training per distinct model, one MLflow run
per evaluated variant — through a SIGKILLed driver and `sct-sweep resume` — and `sct-sweep evaluate`
adding variants to the finished sweep without training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import assert_no_duplicate_steps, child_runs, driver_process, processes_under, sct_sweep, tiny_spec
from typer.testing import CliRunner

from dashboards.loader import load_sweep
from sct_sweeps import schema, tracking
from sct_sweeps.cli import app
from sct_sweeps.config import parse_spec
from sct_sweeps.run_group import RunGroup
from sct_sweeps.space import plan
from sct_sweeps.trainable import TuneReporter
from sct_sweeps.trial_tracker import TrialTracker


def _spec(pretrain_cache: Path) -> dict:
    raw = tiny_spec("evsweep", pretrain_cache, seeds=[0, 1], iterations=60)
    raw["base"]["sampler"] = {"steps": [1, 4], "edge_skip_mode": "ddim_skip"}
    raw["search"].update({"sampler.eta": {"grid": [0.0, 0.5]}, "guidance.strength": {"grid": [1.0, 1.5]}})
    raw["metric"] = "fid_4step"
    raw["max_concurrent_trials"] = 1  # one training at a time: the kill lands between "finished" and "not yet"
    return raw


def test_plan_counts_trainings_and_variants(pretrain_cache: Path) -> None:
    spec = parse_spec(_spec(pretrain_cache))
    p = plan(spec, 2)
    assert (p.trials, p.variants) == (2, 4)
    assert p.lines()[0] == "trainings: 2, evaluated variants: 8"
    alone = parse_spec({**_spec(pretrain_cache), "share_training": False})
    assert plan(alone, 2).lines()[0] == "trainings: 8, evaluated variants: 8"
    optuna = parse_spec({**_spec(pretrain_cache), "algorithm": "optuna", "num_samples": 3,
                         "search": {**_spec(pretrain_cache)["search"], "seed": {"choice": [0, 1]}}})
    assert plan(optuna, 2).lines()[0] == "trainings: 3, evaluated variants: 12"  # Optuna trials x the eval grid


def test_evaluate_refuses_a_training_setting(project: Path) -> None:
    result = CliRunner().invoke(app, ["evaluate", "nosuch", "--set", "optim.lr=0.1"])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --set optim.lr: a training setting"), lines


def _kill_mid_second_training(cmd: list[str], env: dict[str, str], log: Path, uri: str) -> set[str]:
    """Run the sweep, SIGKILL the driver once the first training's runs finished and the second is midway;
    the run ids finished before the kill."""
    with driver_process(cmd, env, log) as driver:
        deadline, finished = time.time() + 400, set()
        record = Path(env["SCT_PROJECT_DIR"]) / "ray_results" / "evsweep" / "sct_sweep.json"
        while time.time() < deadline and driver.poll() is None:
            if record.exists():
                runs = child_runs(uri, "evsweep")
                finished = {r.info.run_id for r in runs if r.info.status == "FINISHED"}
                midway = [r for r in runs
                          if r.info.status == "RUNNING" and 25 <= r.data.metrics.get("iteration", 0) <= 40]
                if len(finished) == 4 and midway:
                    break
            time.sleep(1)
        assert driver.poll() is None and len(finished) == 4, log.read_text()[-3000:]
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    return finished


@pytest.mark.slow
def test_variant_sweep_resumed_after_a_kill_then_evaluated(
    tmp_path: Path, cli_env: dict[str, str], ray_tmp: Path, pretrain_cache: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    spec = tmp_path / "evsweep.yaml"
    spec.write_text(yaml.safe_dump(_spec(pretrain_cache)))
    cmd = [sct_sweep(), "run", str(spec), "--tracking-uri", uri, "--num-cpus", "2", "--no-report"]
    finished = _kill_mid_second_training(cmd, cli_env, tmp_path / "driver.log", uri)
    deadline = time.time() + 60
    while processes_under(str(ray_tmp)) and time.time() < deadline:
        time.sleep(1)
    done = subprocess.run([sct_sweep(), "resume", "evsweep", "--num-cpus", "2", "--no-report"],
                          env=cli_env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    client = tracking.client(uri)
    runs = child_runs(uri, "evsweep")
    ids = Counter((r.data.tags[schema.TRAINING], r.data.tags[schema.VARIANT]) for r in runs)
    assert len(runs) == 8 and set(ids.values()) == {1}, ids  # one run per variant, none doubled by the resume
    assert len({t for t, _ in ids}) == 2 and len({v for _, v in ids}) == 4  # 2 trainings x 4 variants
    losses: dict[str, set[tuple]] = {}
    for r in runs:
        assert r.info.status == "FINISHED", (r.info.run_name, r.info.status)
        assert_no_duplicate_steps(client, r)
        assert [m.step for m in client.get_metric_history(r.info.run_id, "fid_4step")] == list(range(0, 70, 10))
        loss = tuple(m.value for m in client.get_metric_history(r.info.run_id, "loss"))
        losses.setdefault(r.data.tags[schema.TRAINING], set()).add(loss)
        if r.info.run_id in finished:
            assert r.data.tags[schema.ATTEMPTS] == "1"
    assert all(len(v) == 1 for v in losses.values())  # the variants of a training share its one loss curve
    # Paired: η does not act on 1-step sampling, so variants differing only in η have the same fid_1step.
    by = {(r.data.tags[schema.TRAINING], r.data.tags[schema.VARIANT]): r.data.metrics for r in runs}
    for (training, key), m in by.items():
        twin = key.replace("sampler.eta=0.0", "sampler.eta=0.5")
        assert m["fid_1step"] == by[(training, twin)]["fid_1step"]

    # `status` and the dashboards: a variant is a trial of its own there.
    st = subprocess.run([sct_sweep(), "status", "evsweep", "--json"], env=cli_env, capture_output=True, text=True,
                        timeout=120)  # fmt: skip
    rows = json.loads(st.stdout)["trials"]
    assert len(rows) == 8 and len({r["run_name"] for r in rows}) == 8 and all(r["best_fid_4step"] != "-" for r in rows)
    assert len(load_sweep(uri, "evsweep").trials) == 8

    # `evaluate`: a new η on both trainings, at every checkpoint their trials kept; no training.
    env = {**cli_env, "MLFLOW_TRACKING_URI": uri}
    ev = [sct_sweep(), "evaluate", "evsweep", "--set", "sampler.eta=0.2"]
    done = subprocess.run(ev, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    new = [r for r in child_runs(uri, "evsweep") if r.data.tags.get(schema.EVALUATED_AFTER)]
    assert len(new) == 2 and {r.data.tags[schema.VARIANT] for r in new} == {"guidance.strength=1.0,sampler.eta=0.2"}
    for r in new:
        assert "loss" not in r.data.metrics and r.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(r.info.run_id, "fid_4step")] == [50, 60]  # kept ckpts
        assert r.data.metrics["iteration"] == 60 and r.data.metrics["flops"] > 0  # the training's cost, copied
    again = subprocess.run(ev, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("already done") == 2, again.stdout
    assert len(child_runs(uri, "evsweep")) == 10
    # A variant evaluated afterwards scores exactly what the sweep's own evaluation did (same weights, noise).
    gone = next(r for r in runs if r.data.tags[schema.VARIANT] == "guidance.strength=1.5,sampler.eta=0.5")
    client.delete_run(gone.info.run_id)
    ev2 = [sct_sweep(), "evaluate", "evsweep", "--set", "sampler.eta=0.5", "--set", "guidance.strength=1.5"]
    done = subprocess.run(ev2, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    redo = next(r for r in child_runs(uri, "evsweep") if r.data.tags.get(schema.EVALUATED_AFTER)
                and r.data.tags[schema.TRAINING] == gone.data.tags[schema.TRAINING]
                and r.data.tags[schema.VARIANT] == gone.data.tags[schema.VARIANT])
    for key in ("fid_1step", "fid_4step"):
        was = {m.step: m.value for m in client.get_metric_history(gone.info.run_id, key)}
        now = {m.step: m.value for m in client.get_metric_history(redo.info.run_id, key)}
        # Equal but for float summation order: this process runs torch on 2 threads, the trial ran on 1.
        assert now == pytest.approx({s: was[s] for s in (50, 60)}, rel=1e-8), (key, was, now)


class _Captured(TuneReporter):
    """A TuneReporter whose Ray side is a list (what it would hand `tune.report`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[tuple[dict, Path | None]] = []

    def send(self, result: dict, checkpoint_dir: Path | None) -> None:
        self.sent.append((result, checkpoint_dir))


def test_reporter_routes_variant_metrics_and_gives_ray_the_best_variant(sqlite_uri: str, tmp_path: Path) -> None:
    """Training metrics reach every variant's run, `v<k>/...` only run k (as `...`), grids under samples/v<k>/
    only run k; Ray gets the best variant's value of the sweep's metric (what ASHA and Optuna rank), and the
    checkpoint names every variant's run."""
    client = tracking.client(sqlite_uri)
    exp = tracking.ensure_experiment(client, "route", tmp_path / "art")
    parent = tracking.start_parent_run(client, exp, "route", {}, "name: route\n", tmp_path)
    trackers = [TrialTracker(uri=sqlite_uri, experiment_id=exp, parent_run_id=parent, sweep="route", trial_id="t0",
                             run_name=f"v{k}", tags={}, params={}, variant=f"sampler.eta={k / 2}")
                for k in range(2)]  # fmt: skip
    runs = RunGroup(trackers)
    rep = _Captured(runs, {"node_id": "n"}, metric="fid_4step", mode="min")
    rep.report(5, {"loss": 1.5, "iteration": 5})
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    rep.report(10, {"v0/fid_4step": 30.0, "v1/fid_4step": 20.0, "v0/fid_1step": 50.0, "v1/fid_1step": 50.0,
                    "eval_s": 1.0}, ckpt)  # fmt: skip
    grid = tmp_path / "samples" / "v1" / "grid_4step_it10.png"
    grid.parent.mkdir(parents=True)
    from PIL import Image

    Image.new("L", (8, 8)).save(grid)
    rep.log_artifact(grid)
    assert runs.finish() == 0
    (result, sent_ckpt), = rep.sent
    assert result["fid_4step"] == 20.0 and result["v0/fid_4step"] == 30.0 and sent_ckpt == ckpt
    assert json.loads((ckpt / "sct_run.json").read_text())["run_ids"] == runs.run_ids
    for k, tracker in enumerate(trackers):
        run = client.get_run(tracker.run_id)
        assert run.data.metrics["loss"] == 1.5 and run.data.metrics["fid_4step"] == [30.0, 20.0][k]
        assert run.data.tags[schema.VARIANT] == f"sampler.eta={k / 2}" and run.data.tags[schema.TRAINING] == "t0"
        assert not any("/" in key for key in run.data.metrics)
        grids = [a.path for a in client.list_artifacts(tracker.run_id, "samples")]
        assert grids == (["samples/grid_4step_it10.png"] if k == 1 else [])


@pytest.mark.slow
def test_optuna_and_asha_search_trainings_and_rank_each_by_its_best_variant(
    tmp_path: Path, cli_env: dict[str, str], ray_tmp: Path, pretrain_cache: Path
) -> None:
    """Optuna samples the training axis (lr), every trial evaluates the η grid, and ASHA / Optuna see for the
    sweep's metric the trial's best variant."""
    raw = tiny_spec("optev", pretrain_cache, iterations=20)
    raw["base"]["sampler"] = {"steps": [1, 4], "edge_skip_mode": "ddim_skip"}
    raw["search"] = {"sampler.eta": {"grid": [0.0, 0.5]}, "optim.lr": {"loguniform": [5e-4, 2e-3]}}
    raw.update(algorithm="optuna", num_samples=3, scheduler={"type": "asha", "grace_period": 10},
               metric="fid_4step")  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    spec = tmp_path / "optev.yaml"
    spec.write_text(yaml.safe_dump(raw))
    done = subprocess.run([sct_sweep(), "run", str(spec), "--tracking-uri", uri, "--num-cpus", "2", "--no-report"],
                          env=cli_env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0 and "trainings: 3, evaluated variants: 6" in done.stdout, done.stdout[-3000:]
    runs = child_runs(uri, "optev")
    by_training: dict[str, list] = {}
    for r in runs:
        by_training.setdefault(r.data.tags[schema.TRAINING], []).append(r)
    assert len(by_training) == 3 and all(len(v) == 2 for v in by_training.values())
    from ray.tune import ExperimentAnalysis

    results = Path(cli_env["SCT_PROJECT_DIR"]) / "ray_results" / "optev"
    for trial in ExperimentAnalysis(str(results)).trials:
        variants = by_training[trial.trial_id]
        assert len({r.data.tags["sct.axis.optim.lr"] for r in variants}) == 1  # one training, two η
        assert trial.last_result["fid_4step"] == min(r.data.metrics["fid_4step"] for r in variants)
