"""What one real tiny sweep leaves in MLflow, read back through the client, the CLI and a browser.

One sweep (two trials on a SQLite store) is run once for the module; every test reads it. The runs page
is opened in headless Chromium through `sct-sweep ui`'s own `mlflow server`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import typing
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import (
    alive,
    descendants,
    free_port,
    kill_pids,
    listening,
    processes_under,
    sct_sweep,
    stop_pid,
    tiny_spec,
)
from pydantic import BaseModel
from typer.testing import CliRunner

from sct_sweeps import schema, tracking
from sct_sweeps.cli import app
from sct_sweeps.config import PATH_FIELDS
from trainer.config import TrainConfig

CHROMIUM = Path("/usr/bin/chromium")
DESCRIPTION = "Reference batch 1 (ECT-like) against the whole batch (SCT), one seed."


@dataclass(frozen=True)
class Sweep:
    project: Path
    uri: str
    env: dict[str, str]
    experiment_id: str
    parent: object
    children: list


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, pretrain_cache: Path) -> Iterator[Sweep]:
    """`sct-sweep run` of a 2-trial sweep over sct.ref_batch, with a description; SQLite store."""
    project = tmp_path_factory.mktemp("ident")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    raw = tiny_spec("ident", pretrain_cache)
    raw["search"] = {"sct.ref_batch": {"grid": [1, "all"]}}
    raw["description"] = DESCRIPTION
    spec = project / "ident.yaml"
    spec.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(SCT_PROJECT_DIR=str(project), RAY_TMPDIR=str(ray_tmp), PYTHONUNBUFFERED="1")
    try:
        done = subprocess.run([sct_sweep(), "run", str(spec), "--num-cpus", "2"], env=env, capture_output=True,
                              text=True, timeout=400)  # fmt: skip
    finally:
        kill_pids(processes_under(str(ray_tmp)))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    uri = f"sqlite:///{project / 'mlruns.db'}"
    client = tracking.client(uri)
    exp = client.get_experiment_by_name("ident")
    parent = client.search_runs([exp.experiment_id], "tags.`sct.role` = 'parent'")[0]
    children = client.search_runs([exp.experiment_id], "tags.`sct.role` = 'trial'", order_by=["attributes.run_name"])
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    yield Sweep(project, uri, env, exp.experiment_id, parent, children)


def _path_fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    found = set()
    for name, info in model.model_fields.items():
        kinds = typing.get_args(info.annotation) or (info.annotation,)
        for kind in kinds:
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                found |= _path_fields(kind, f"{prefix}{name}.")
            elif isinstance(kind, type) and issubclass(kind, PurePath):
                found.add(prefix + name)
    return found


def test_every_path_setting_is_logged_as_a_tag() -> None:
    """A TrainConfig field typed as a path is a tag `sct.path.<field>`, never a param."""
    assert _path_fields(TrainConfig) == set(PATH_FIELDS)
    cfg = TrainConfig.model_validate({"data": {"root": "/d"}, "pretrain": {"checkpoint": "/p.pt"}})
    params, tags = tracking.flatten(cfg)
    assert tags == {"sct.path.out_dir": "runs/default", "sct.path.data.root": "/d",
                    "sct.path.pretrain.checkpoint": "/p.pt"}
    assert not set(PATH_FIELDS) & set(params) and params["method"] == "sct" and params["loss.c"] == "None"


@pytest.mark.slow
def test_paths_are_tags_and_params_show_real_differences(sweep: Sweep) -> None:
    for c in sweep.children:
        params, tags = c.data.params, c.data.tags
        assert not set(PATH_FIELDS) & set(params), sorted(set(PATH_FIELDS) & set(params))
        assert Path(tags["sct.path.out_dir"]).is_absolute() and Path(tags["sct.path.pretrain.checkpoint"]).is_file()
        assert tags["sct.path.pretrain.checkpoint"] == tags["sct.pretrain_checkpoint"]
        assert "sct.path.data.root" not in tags and "sct.path.eval.inception_weights" not in tags  # unset: no tag
    a, b = (c.data.params for c in sweep.children)
    assert {k for k in a if a[k] != b.get(k)} == {"sct.ref_batch"}  # Compare's "show diff only"


@pytest.mark.slow
def test_trial_run_has_its_config_checkpoint_and_n_params(sweep: Sweep, tmp_path: Path) -> None:
    client = tracking.client(sweep.uri)
    for c in sweep.children:
        run_id = c.info.run_id
        cfg = TrainConfig.model_validate(yaml.safe_load(
            Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path / run_id))).read_text()))
        assert str(cfg.sct.ref_batch) == c.data.tags["sct.axis.sct.ref_batch"] == c.data.params["sct.ref_batch"]
        assert str(cfg.out_dir) == c.data.tags["sct.path.out_dir"] and cfg.iterations == 20
        ckpt = Path(c.data.tags[schema.CHECKPOINT])
        assert (ckpt / "state.pt").is_file() and ckpt.is_relative_to(sweep.project / "ray_results" / "ident")
        assert "checkpoint" not in [a.path for a in client.list_artifacts(run_id)]  # local store: no upload
        assert c.data.metrics["n_params"] > 0 and "params" not in c.data.metrics


@pytest.mark.slow
def test_sample_grids_are_mlflow_images_with_their_step(sweep: Sweep) -> None:
    client = tracking.client(sweep.uri)
    for c in sweep.children:
        names = [Path(a.path).name for a in client.list_artifacts(c.info.run_id, "images")]
        for k in (1, 2):
            pattern = rf"samples_{k}step\+step\+(\d+)\+.*\.png"
            steps = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(pattern, n)))
            assert steps == [0, 10, 20], names
        assert c.data.tags["mlflow.loggedImages"] == "True"


@pytest.mark.slow
def test_experiment_and_parent_run_carry_the_description(sweep: Sweep) -> None:
    client = tracking.client(sweep.uri)
    assert client.get_experiment(sweep.experiment_id).tags[schema.NOTE] == DESCRIPTION
    assert sweep.parent.data.tags[schema.NOTE] == DESCRIPTION


@pytest.mark.slow
def test_export_has_run_name_and_id_and_nulls(sweep: Sweep, tmp_path: Path) -> None:
    out = tmp_path / "ident.parquet"
    res = CliRunner().invoke(app, ["export", "ident", "--out", str(out), "--tracking-uri", sweep.uri])
    assert res.exit_code == 0, res.output
    df = pq.read_table(out).to_pandas()
    names = {c.info.run_id: c.info.run_name for c in sweep.children}
    assert set(df.run_id) == set(names) and all(df.run_name == df.run_id.map(names))
    assert df["optim.grad_clip"].isna().all() and "None" not in set(df["loss.c"].astype(str))
    assert not any(c.startswith("sct.path") or c == "out_dir" for c in df.columns)


@pytest.mark.slow
def test_status_shows_run_names_and_swept_values(sweep: Sweep) -> None:
    res = CliRunner().invoke(app, ["status", "ident", "--storage", str(sweep.project / "ray_results")],
                             env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    for c in sweep.children:  # run name and state, then the trial id, then the swept values
        i = next(i for i, ln in enumerate(lines) if f" {c.info.run_name} " in ln)
        assert "TERMINATED" in lines[i] and c.data.tags["sct.trial_id"] in lines[i + 1], lines[i : i + 3]
        assert f"sct.ref_batch={c.data.tags['sct.axis.sct.ref_batch']}" in lines[i + 2], lines[i : i + 3]


@pytest.mark.slow
def test_sample_by_run_name_and_by_run_id(sweep: Sweep, tmp_path: Path) -> None:
    c = sweep.children[0]
    for ref in (c.info.run_name, c.info.run_id):
        grid = tmp_path / f"{ref}.png"
        res = CliRunner().invoke(app, ["sample", ref, "--n", "4", "--out", str(grid), "--tracking-uri", sweep.uri])
        assert res.exit_code == 0 and grid.read_bytes()[:4] == b"\x89PNG", res.output
    res = CliRunner().invoke(app, ["sample", "no-such-run", "--tracking-uri", sweep.uri])
    assert res.exit_code == 2 and "neither a checkpoint path nor a trial run name or id" in res.stderr


def _dump_dom(url: str, profile: Path) -> str:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=20000",
           "--window-size=1600,1000", "--dump-dom", url]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.slow
def test_ui_prints_the_runs_page_which_lists_the_trial_runs(sweep: Sweep, tmp_path: Path) -> None:
    """`sct-sweep ui`: prints the sweep's runs page, serves it on 127.0.0.1 only, the page lists every trial
    run (headless Chromium), and SIGTERM stops the MLflow server with every worker it started."""
    port = free_port()
    proc = subprocess.Popen([sct_sweep(), "ui", "ident", "--port", str(port)], env=sweep.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        first = proc.stdout.readline()
        page = f"http://127.0.0.1:{port}/#/experiments/{sweep.experiment_id}/runs"
        assert first.strip() == f"ident: {page}", first
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        assert listening(port) and set(listening(port)) <= {"0100007F"}, listening(port)  # 127.0.0.1 only
        if CHROMIUM.exists():
            dom = _dump_dom(page, tmp_path / "profile")  # the parent run, its trials nested (collapsed) under it
            assert "ident-sweep" in dom and re.search(r"<strong>3</strong>\s*matching runs", dom), dom[-3000:]
            dom = _dump_dom(f"{page}?orderByKey=attributes.run_name&orderByAsc=true", tmp_path / "profile")
            for c in sweep.children:  # sorted by name, every trial run is listed
                assert c.info.run_name in dom, f"{c.info.run_name} not on the runs page"
        server = descendants(proc.pid)
        assert len(server) >= 2, server  # the MLflow server and its workers
        proc.send_signal(signal.SIGTERM)  # before, `ui` exec'd into the server and its workers outlived this
        assert proc.wait(timeout=30) == 0
        deadline = time.time() + 10
        while alive(server) and time.time() < deadline:
            time.sleep(0.2)
        assert not alive(server), f"MLflow processes outlived SIGTERM to sct-sweep ui: {alive(server)}"
        if not CHROMIUM.exists():
            pytest.skip("runs page not rendered: no /usr/bin/chromium (`bash scripts/install_chromium.sh`, root)")
    finally:
        stop_pid(proc, timeout=30)
        kill_pids(processes_under(str(sweep.project / "mlruns.db")))


@pytest.mark.slow
def test_status_and_scaling_json(sweep: Sweep) -> None:
    """`status --json` and `scaling --json` print JSON with the trials and the fits (one per sampler and cost)."""
    import json

    res = CliRunner().invoke(app, ["status", "ident", "--storage", str(sweep.project / "ray_results"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    names = {c.info.run_name for c in sweep.children}
    assert {t["run_name"] for t in data["trials"]} == names and all(t["state"] for t in data["trials"])
    res = CliRunner().invoke(app, ["scaling", "ident", "--tracking-uri", sweep.uri, "--json", "--n-boot", "10"])
    assert res.exit_code == 0, res.output
    fits = json.loads(res.output)["fits"]
    assert fits and all({"fid_steps", "vs", "points", "b"} <= f.keys() for f in fits)
