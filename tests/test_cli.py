"""`sct-sweep` commands without a sweep running: help, validate, status, refusals (exit 2, one line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO, free_port, one_error_line, processes_under, sct_sweep
from typer.testing import CliRunner

from sct_sweeps.cli import app

TINY = {
    "name": "tiny",
    "base": {"iterations": 20, "network": {"model_channels": 8}},
    "search": {"seed": {"grid": [0, 1]}},
}
COMMANDS = ["run", "resume", "status", "validate", "sample", "ui", "export", "report", "scaling", "import-edm"]


def invoke(*args: str) -> object:
    return CliRunner().invoke(app, list(args))


def write_spec(tmp_path: Path, **changes: object) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    return path


@pytest.mark.parametrize("command", COMMANDS)
def test_help_explains_every_option(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    for opt in {"run": ["--address", "--tracking-uri", "--name", "--num-cpus"],
                "sample": ["--steps", "--eta", "--guidance", "--out"], "export": ["--out"],
                "status": ["--json"], "validate": ["--json"], "scaling": ["--json"],
                "ui": ["--host", "--port"]}.get(command, []):  # fmt: skip
        assert opt in result.output, (command, opt)


def test_validate_default_sweep_prints_plan(project: Path) -> None:
    result = invoke("validate", str(REPO / "experiments" / "scaling.yaml"), "--num-cpus", "2")
    assert result.exit_code == 0, result.output
    assert "valid sweep scaling" in result.output
    assert "trainings: " in result.output and "evaluated variants: " in result.output and "estimate" in result.output
    assert not (project / "ray_results").exists() and not (project / "mlruns.db").exists()


def test_status_without_sweeps(project: Path) -> None:
    result = invoke("status")
    assert result.exit_code == 0 and "no sweeps yet" in result.output


@pytest.mark.parametrize(
    "args,expected",
    [
        (["status", "nosuch"], "nosuch: no sweep at"),
        (["resume", "nosuch"], "nosuch: no sweep at"),
        (["resume", "../x"], "not a valid sweep name"),
        (["sample", "/nonexistent/state.pt"], "checkpoint not found"),
        (["validate", "/nonexistent/spec.yaml"], "sweep file not found"),
        (["export", "nosuch", "--out", "/tmp/x.parquet"], "nosuch"),
    ],
)
def test_user_errors_exit_2(project: Path, args: list[str], expected: str) -> None:
    assert expected in one_error_line(invoke(*args))


def test_run_refuses_gpu_where_none(project: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    line = one_error_line(invoke("run", str(write_spec(tmp_path, resources={"cpu": 1, "gpu": 1}))))
    assert "resources.gpu: 1 GPU per trial requested" in line
    assert not (project / "ray_results").exists() and not (project / "mlruns.db").exists()
    assert not processes_under(str(project))


def test_run_refuses_existing_sweep(project: Path, tmp_path: Path) -> None:
    out = project / "ray_results" / "tiny"
    out.mkdir(parents=True)
    (out / "sct_sweep.json").write_text(json.dumps({}))
    line = one_error_line(invoke("run", str(write_spec(tmp_path))))
    assert "tiny: a sweep with this name exists" in line and "sct-sweep resume tiny" in line
    line = one_error_line(invoke("run", str(write_spec(tmp_path)), "--name", "bad name"))
    assert "--name: 'bad name' is not a valid sweep name" in line


def test_run_refuses_unreachable_tracking_server(project: Path, tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    line = one_error_line(invoke("run", str(write_spec(tmp_path)), "--tracking-uri", uri))
    assert f"tracking_uri {uri}: MLflow server not reachable" in line
    assert not (project / "ray_results").exists()


def test_version_short_help_and_completion() -> None:
    from importlib.metadata import version

    res = invoke("--version")
    assert res.exit_code == 0 and res.output.strip() == f"sct-sweep {version('sct-sweeps')}"
    for args in (["-h"], ["--help"], ["status", "-h"], ["run", "-h"]):
        res = invoke(*args)
        assert res.exit_code == 0 and "Usage:" in res.output, args
    res = invoke("--help")
    assert "--install-completion" in res.output and "--show-completion" in res.output


def test_validate_and_status_json_parse(project: Path) -> None:
    """`--json` output is JSON (`python -m json.tool` accepts it) with the plan's numbers."""
    import subprocess
    import sys

    res = invoke("validate", str(REPO / "experiments" / "scaling.yaml"), "--num-cpus", "2", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["valid"] and data["name"] == "scaling" and data["plan"]["trials"] == 18
    tool = subprocess.run([sys.executable, "-m", "json.tool"], input=res.output, capture_output=True, text=True)
    assert tool.returncode == 0
    res = invoke("status", "--json")
    assert res.exit_code == 0 and json.loads(res.output) == []


def test_piped_tables_are_not_cut_at_80_columns(project: Path) -> None:
    """A table printed to a pipe keeps every character of a long cell (rich would lay it out for 80 columns)."""
    import subprocess
    import sys

    long_name = "w" * 150
    out = subprocess.run([sys.executable, "-c",
                          "from rich.table import Table; from sct_sweeps.console import out; "
                          f"t = Table('sweep', 'store'); t.add_row('{long_name}', 'x'); out.print(t)"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and long_name in out.stdout, out.stdout


@pytest.mark.parametrize(
    ("changes", "suggestion"),
    [({"base": {"sct": {"ref_bach": 4}}}, "did you mean 'ref_batch'?"),
     ({"search": {"sampler.etta": {"grid": [0.1, 0.2]}}}, "did you mean 'eta'?"),
     ({"base": {"iteratons": 20}}, "did you mean 'iterations'?")],
)
def test_a_mistyped_setting_gets_a_suggestion(project: Path, tmp_path: Path, changes: dict, suggestion: str) -> None:
    line = one_error_line(invoke("validate", str(write_spec(tmp_path, **changes))))
    assert suggestion in line, line


def test_command_line_overrides_are_validated_like_the_yaml(project: Path) -> None:
    from sct_sweeps.config import load_spec, spec_yaml

    scaling = str(REPO / "experiments" / "scaling.yaml")
    res = invoke("validate", scaling, "search.seed.grid=[0,1,2]", "max_concurrent_trials=1", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["plan"]["trials"] == 27 and data["plan"]["concurrency"] == 1  # 3 widths x 3 budgets x 3 seeds
    spec = load_spec(Path(scaling), ["base.optim.lr=3e-4", "search.sampler.eta.grid=[0.1,0.2]"])
    logged = yaml.safe_load(spec_yaml(spec))  # what run records: the spec with the overrides in it
    assert logged["base"]["optim"]["lr"] == 3e-4 and logged["search"]["sampler.eta"]["grid"] == [0.1, 0.2]
    assert "base.optim.lr: Input should be greater than 0" in one_error_line(invoke("validate", scaling,
                                                                                   "base.optim.lr=-1"))
    assert "expected KEY=VALUE" in one_error_line(invoke("validate", scaling, "lr"))


@pytest.mark.slow
def test_a_long_command_shows_a_spinner_on_a_terminal(project: Path, tmp_path: Path) -> None:
    """`sample` (seconds: loading the model and the data, sampling) shows what it is doing on a terminal."""
    import os
    import pty
    import select
    import subprocess

    from trainer.config import TrainConfig
    from trainer.train import train

    cfg = TrainConfig.model_validate({
        "method": "ect", "iterations": 2, "device": "cpu", "out_dir": str(tmp_path / "run"),
        "network": {"model_channels": 8, "channel_mult": [1], "num_blocks": 1}, "pretrain": {"iterations": 0},
        "optim": {"batch_size": 16}, "eval": {"every": 2, "fid_samples": 32, "batch_size": 32, "at_start": False},
    })
    ckpt = train(cfg).checkpoint_dir
    master, slave = pty.openpty()
    proc = subprocess.Popen([sct_sweep(), "sample", str(ckpt), "--n", "4",
                             "--out", str(tmp_path / "g.png")], stdout=slave, stderr=slave, env={**os.environ})
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        try:
            chunk = os.read(master, 4096) if ready else b""
        except OSError:  # the terminal closed: the command ended
            chunk = b""
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=120) == 0, seen.decode(errors="replace")[-2000:]
    assert b"sampling 4 images" in seen and (tmp_path / "g.png").is_file()
