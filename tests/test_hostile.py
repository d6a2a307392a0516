"""Hostile input and races, round two: each class refused at its root, before anything starts.

Non-finite and oversize numbers (every float and int field of every settings model, walked
programmatically), duplicate YAML keys, oversize files and grids, networks that cannot fit in
memory, a missing store directory, an `--address` where nothing listens; and two processes racing
for a sweep name or for the creation of one SQLite store. Real processes throughout.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import one_error_line, processes_under, sct_sweep
from pydantic import BaseModel, ValidationError
from typer.testing import CliRunner

from sct_sweeps.cli import app
from sct_sweeps.config import SweepSpec
from trainer.config import TrainConfig, format_validation_error

GOOD = {
    "name": "hostile",
    "base": {"iterations": 20, "network": {"model_channels": 8, "channel_mult": [1], "num_blocks": 1}},
    "search": {"seed": {"grid": [0, 1]}},
}


# -- every float and int field, walked ------------------------------------------------------------


def _leaves(ann: Any) -> set[type]:
    """The scalar types an annotation admits (through Optional, unions, lists, tuples)."""
    origin = typing.get_origin(ann)
    if origin is None:
        return {ann} if isinstance(ann, type) else set()
    if origin is typing.Literal:
        return set()
    return set().union(*(_leaves(a) for a in typing.get_args(ann) if a is not Ellipsis))


def _container(ann: Any) -> str:
    """'list', 'tuple' or '' (a scalar, possibly inside a union)."""
    for a in (ann, *typing.get_args(ann)):
        origin = typing.get_origin(a)
        if origin in (list, tuple):
            return origin.__name__
    return ""


def _fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, annotation) of every leaf setting of `model` and its sections."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        path = f"{prefix}{name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _fields(ann, f"{path}.")
        elif typing.get_origin(ann) in (typing.Union, types.UnionType) and any(
            isinstance(a, type) and issubclass(a, BaseModel) for a in typing.get_args(ann)
        ):
            sub = next(a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel))
            out += _fields(sub, f"{path}.")
        else:
            out.append((path, ann))
    return out


def _set(raw: dict, path: str, value: Any) -> dict:
    node = raw
    *parents, leaf = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return raw


def _sweep_raw() -> dict:
    raw = yaml.safe_load(yaml.safe_dump(GOOD))
    raw["estimate"] = {"it_per_s": 1.0}  # so the walk reaches the Estimate section too
    return raw


def _bad_value(ann: Any, value: Any) -> Any:
    kind = _container(ann)
    return [value] if kind == "list" else [value, value] if kind == "tuple" else value


def _cases(scalar: type, value: Any) -> list[tuple[str, str, Any]]:
    """(model, dotted path, bad value) for every field of TrainConfig and SweepSpec admitting `scalar`."""
    cases = [("train", p, _bad_value(a, value)) for p, a in _fields(TrainConfig) if scalar in _leaves(a)]
    sweep = [(p, a) for p, a in _fields(SweepSpec) if not p.startswith("base.") and scalar in _leaves(a)]
    return cases + [("sweep", p, _bad_value(a, value)) for p, a in sweep]


def _refusal(model: str, path: str, value: Any) -> str:
    """The one-line message validating `value` at `path` gives (the test fails if it is accepted)."""
    raw = _set({} if model == "train" else _sweep_raw(), path, value)
    cls = TrainConfig if model == "train" else SweepSpec
    with pytest.raises(ValidationError) as err:
        cls.model_validate(raw)
    return format_validation_error(err.value)


FLOATS = _cases(float, math.inf)
INTS = [c for c in _cases(int, 2**70)]


def test_the_walk_finds_the_fields_it_must() -> None:
    paths = {p for _, p, _ in FLOATS}
    assert {"optim.lr", "optim.betas", "precond.sigma_max", "schedule.p_mean", "sampler.t_mid"} <= paths
    assert {"resources.gpu", "resources.cpu", "guidance.snapshot_fractions", "estimate.it_per_s"} <= paths
    assert {"seed", "network.model_channels", "network.channel_mult", "sct.ref_batch", "num_samples"} <= {
        p for _, p, _ in INTS
    }
    assert len(FLOATS) > 30 and len(INTS) > 25, (len(FLOATS), len(INTS))


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("model,path,bad", FLOATS, ids=[f"{m}:{p}" for m, p, _ in FLOATS])
def test_every_float_field_refuses_non_finite_numbers(model: str, path: str, bad: Any, value: float) -> None:
    bad = [value] * len(bad) if isinstance(bad, list) else value
    line = _refusal(model, path, bad)
    assert line.startswith(path) and "finite number" in line and "\n" not in line, line


@pytest.mark.parametrize("model,path,bad", INTS, ids=[f"{m}:{p}" for m, p, _ in INTS])
def test_every_int_field_refuses_a_value_that_cannot_fit(model: str, path: str, bad: Any) -> None:
    line = _refusal(model, path, bad)
    assert line.startswith(path) and "\n" not in line, line


def test_seed_range_is_what_torch_and_numpy_accept() -> None:
    import numpy as np
    import torch

    from trainer.config import MAX_SEED

    TrainConfig(seed=MAX_SEED)
    torch.manual_seed(MAX_SEED * 1000 + 2)  # the evaluation's noise seed (trainer/evaluate.py)
    np.random.RandomState(MAX_SEED)
    for seed in (-1, MAX_SEED + 1):
        with pytest.raises(ValidationError):
            TrainConfig(seed=seed)


# -- the CLI: refused at once, nothing started ----------------------------------------------------


def _spec_with(path: str, value: Any) -> dict:
    return _set(yaml.safe_load(yaml.safe_dump(GOOD)), path, value)


def _grid(n: int) -> dict:
    return _spec_with("search", {"seed": {"grid": list(range(n))}})


SPEC_CASES = [
    ("lr-inf", _spec_with("base.optim", {"lr": math.inf}), ["base.optim.lr:", "finite number"]),
    ("sigma-max-inf", _spec_with("base.precond", {"sigma_max": math.inf}), ["base.precond.sigma_max:", "finite"]),
    ("p-mean-nan", _spec_with("base.schedule", {"p_mean": math.nan}), ["base.schedule.p_mean:", "finite"]),
    ("t-mid-inf", _spec_with("base.sampler", {"t_mid": math.inf}), ["base.sampler.t_mid:", "finite"]),
    ("gpu-nan", _spec_with("resources", {"gpu": math.nan}), ["resources.gpu: Input should be a finite number"]),
    ("grid-value-inf", _spec_with("search", {"optim.lr": {"grid": [1e-3, math.inf]}}),
     ["search.optim.lr: grid[1]: inf is not a finite number"]),
    ("choice-value-nan", _spec_with("search", {"schedule.p_mean": {"choice": [math.nan]}}),
     ["search.schedule.p_mean: choice[0]: nan is not a finite number"]),
    ("uniform-bound-inf", _spec_with("search", {"optim.lr": {"loguniform": [1e-4, math.inf]}}),
     ["search.optim.lr.loguniform[1]", "finite number"]),
    ("seed-2-to-70", _spec_with("base.seed", 2**70), ["base.seed:", "less than or equal to 4294967295"]),
    ("seed-axis-2-to-70", _spec_with("search", {"seed": {"grid": [0, 2**70]}}),
     ["search.seed.grid[1]:", "less than or equal to"]),
    ("width-a-million", _spec_with("base.network.model_channels", 1_000_000), ["base.network.model_channels:"]),
    ("network-does-not-fit", _spec_with("search", {"network.model_channels": {"grid": [8, 16384]}}),
     ["search.network.model_channels.grid[1]: network:", "parameters", "do not fit in the"]),
    ("too-many-trials", _grid(10_001), ["search: 10,001 trials", "raise SCT_MAX_TRIALS"]),
]  # fmt: skip
DUPLICATE = "name: dup\nsearch:\n  seed: {grid: [0, 1]}\n  seed: {grid: [2]}\n"


def _write(tmp_path: Path, content: dict | str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


def _nothing_started(project: Path) -> None:
    """No MLflow store, no results (so no sweep name taken), no Ray."""
    assert not (project / "mlruns.db").exists() and not (project / "ray_results").exists()
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    assert not processes_under(str(project))


@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize("case,content,expected", SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_bad_numbers_are_refused_before_anything_starts(
    case: str, content: dict, expected: list[str], command: str, tmp_path: Path, project: Path
) -> None:
    line = one_error_line(CliRunner().invoke(app, [command, str(_write(tmp_path, content))]))
    for part in expected:
        assert part in line, (part, line)
    _nothing_started(project)


@pytest.mark.parametrize("command", ["run", "validate"])
def test_duplicate_key_is_refused_with_its_line(command: str, tmp_path: Path, project: Path) -> None:
    line = one_error_line(CliRunner().invoke(app, [command, str(_write(tmp_path, DUPLICATE))]))
    assert "line 4: duplicate key 'seed' (first on line 3); give each key once" in line, line
    _nothing_started(project)


def test_yaml_loader_refuses_duplicates_at_any_depth_and_keeps_merges() -> None:
    from trainer.yaml_io import parse_yaml

    for text in ("a: 1\na: 2\n", "x: {a: 1, a: 2}\n", "s:\n  - {b: 1}\n  - {b: 1, b: 2}\n"):
        with pytest.raises(yaml.YAMLError, match="duplicate key"):
            parse_yaml(text)
    merged = parse_yaml("d: &d {lr: 1, bs: 2}\ne:\n  <<: *d\n  lr: 3\n")
    assert merged["e"] == {"lr": 3, "bs": 2}


def test_trainer_refuses_duplicate_keys_and_a_network_that_cannot_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from trainer.__main__ import main

    path = tmp_path / "train.yaml"
    for content, expected in [
        ("method: ect\niterations: 2\niterations: 3\n", "line 3: duplicate key 'iterations' (first on line 2)"),
        (f"out_dir: {tmp_path / 'run'}\nnetwork: {{model_channels: 16384}}\n", "network: 2.5e+11 parameters"),
    ]:
        path.write_text(content)
        assert main(["--config", str(path)]) == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and expected in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_limits_can_be_raised(tmp_path: Path, project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SCT_MAX_TRIALS and SCT_MAX_YAML_BYTES bound a sweep; each names itself when it refuses."""
    monkeypatch.setenv("SCT_MAX_TRIALS", "4")
    line = one_error_line(CliRunner().invoke(app, ["validate", str(_write(tmp_path, _grid(5)))]))
    assert "search: 5 trials (5 x 1) is more than the 4 a sweep may have (raise SCT_MAX_TRIALS" in line
    monkeypatch.setenv("SCT_MAX_TRIALS", "5")
    assert CliRunner().invoke(app, ["validate", str(_write(tmp_path, _grid(5)))]).exit_code == 0
    size = len(yaml.safe_dump(_grid(5)))
    monkeypatch.setenv("SCT_MAX_YAML_BYTES", str(size - 1))
    line = one_error_line(CliRunner().invoke(app, ["run", str(_write(tmp_path, _grid(5)))]))
    assert f"{size} bytes is larger than the {size - 1} a settings file may have (raise SCT_MAX_YAML_BYTES" in line
    _nothing_started(project)


def test_a_huge_spec_file_is_refused_before_it_is_parsed(tmp_path: Path, project: Path) -> None:
    path = tmp_path / "spec.yaml"
    with open(path, "w") as f:  # 50 MB of grid: parsing it took minutes and gigabytes
        f.write("name: big\nsearch:\n  seed:\n    grid:\n")
        f.writelines(f"      - {i}\n" for i in range(5_000_000))
    line = one_error_line(CliRunner().invoke(app, ["validate", str(path)]))
    assert "bytes is larger than the 1,000,000 a settings file may have" in line, line


def test_parameter_count_on_meta_device_matches_the_real_network() -> None:
    from trainer.footprint import check_fits, parameter_count
    from trainer.networks import build_network, count_parameters

    for raw, shape in [
        ({"network": {"model_channels": 8, "channel_mult": [1, 2]}}, (8, 1, 0)),
        ({"data": {"conditional": True}, "network": {"attn_resolutions": [4]}}, (8, 1, 10)),
        ({"data": {"name": "fashion_mnist", "resolution": 16}, "network": {"embedding": "fourier"}}, (16, 1, 0)),
    ]:
        cfg = TrainConfig.model_validate(raw)
        assert parameter_count(cfg) == count_parameters(build_network(cfg.network, *shape)), raw
    cfg = TrainConfig()
    n = parameter_count(cfg)
    assert check_fits(cfg, memory=n * 20) == n
    with pytest.raises(Exception, match=r"network: .* parameters .* do not fit in the 0 GiB of memory here"):
        check_fits(cfg, memory=n * 20 - 1)


# -- stores -----------------------------------------------------------------------------------------


def test_sqlite_store_in_a_missing_directory_is_refused(tmp_path: Path, project: Path) -> None:
    missing = tmp_path / "nonexistent" / "dir"
    uri = f"sqlite:///{missing / 'x.db'}"
    spec = _write(tmp_path, GOOD)
    for args in (
        ["run", str(spec), "--tracking-uri", uri],
        ["ui", "--tracking-uri", uri],
        ["export", "x", "--out", "o.pq", "--tracking-uri", uri],
    ):
        line = one_error_line(CliRunner().invoke(app, args))
        assert f"directory {missing} does not exist; create it first" in line, line
    assert not (tmp_path / "nonexistent").exists()
    _nothing_started(project)


def test_the_projects_own_store_directory_is_made(tmp_path: Path) -> None:
    from sct_sweeps.tracking import check_store_dir

    own = tmp_path / "new-project"
    check_store_dir(f"sqlite:///{own / 'mlruns.db'}", own)
    assert own.is_dir()


def _open_store(uri: str, barrier: Any) -> str:
    """In a fresh process: wait for the others, then open the store and use it."""
    from sct_sweeps import tracking

    barrier.wait()
    client = tracking.client(uri)
    return tracking.ensure_experiment(client, f"exp-{os.getpid()}", None)


@pytest.mark.slow
def test_processes_creating_one_new_sqlite_store_at_once_all_succeed(tmp_path: Path) -> None:
    """Today's collision ("duplicate column name", "Online migration expected") needs two first openers."""
    n = 4
    ctx = multiprocessing.get_context("spawn")
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    with ctx.Manager() as manager:
        barrier = manager.Barrier(n)
        with ctx.Pool(n) as pool:
            ids = pool.starmap(_open_store, [(uri, barrier)] * n)
    assert len(set(ids)) == n
    assert (tmp_path / "fresh.db.lock").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ui_and_clients_opening_one_new_store_at_once_all_work(project: Path) -> None:
    """`sct-sweep ui` creates the store under its lock before `mlflow server` opens it."""
    from conftest import free_port, kill_pids, stop_pid, wait_healthy

    n, port = 3, free_port()
    uri = f"sqlite:///{project / 'mlruns.db'}"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(n + 1)
        with ctx.Pool(n) as pool:
            pending = pool.starmap_async(_open_store, [(uri, barrier)] * n)
            barrier.wait()
            ui = subprocess.Popen([sct_sweep(), "ui", "--port", str(port)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)  # fmt: skip
            try:
                assert len(set(pending.get(timeout=240))) == n
                wait_healthy(f"http://127.0.0.1:{port}", ui)
            finally:
                stop_pid(ui, timeout=30)  # the CLI exec'd into the server: this PID is the server
                kill_pids(processes_under(str(project / "mlruns.db")))


# -- the sweep name ---------------------------------------------------------------------------------

_HOLD = """
import sys
from pathlib import Path
from sct_sweeps.record import NameClaim
claim = NameClaim(Path(sys.argv[1]), "race")
print("claimed", flush=True)
sys.stdin.read()
"""


def test_a_sweep_name_is_claimed_by_one_process_at_a_time(tmp_path: Path) -> None:
    from sct_sweeps.errors import SweepExistsError
    from sct_sweeps.record import RECORD, NameClaim

    out = tmp_path / "race"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"claimed"
        with pytest.raises(SweepExistsError, match="another `sct-sweep run` is starting a sweep of this name"):
            NameClaim(out, "race")
    finally:
        holder.kill()  # a holder that dies gives the name back: the kernel drops its lock
        holder.wait()
    claim = NameClaim(out, "race")
    (out / RECORD).write_text("{}")  # what run_sweep writes before it releases
    claim.release()
    with pytest.raises(SweepExistsError, match="a sweep with this name exists"):
        NameClaim(out, "race")


def test_a_released_claim_without_a_record_leaves_nothing(tmp_path: Path) -> None:
    from sct_sweeps.record import NameClaim

    out = tmp_path / "results" / "gone"
    NameClaim(out, "gone").release()
    assert not out.exists()
    NameClaim(out, "gone").release()  # and the name is free again


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_runs_of_one_sweep_at_once_one_goes_ahead(
    tmp_path: Path, cli_env: dict[str, str], project: Path, pretrain_cache: Path
) -> None:
    from conftest import tiny_spec

    raw = tiny_spec("twice", pretrain_cache, seeds=[0], iterations=10)
    spec = _write(tmp_path, raw)
    cmd = [sct_sweep(), "run", str(spec), "--num-cpus", "1", "--no-report"]
    procs = [subprocess.Popen(cmd, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    done = [(p.wait(timeout=280), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in done)
    assert codes == [0, 2], done
    refused = next(err for rc, _, err in done if rc == 2)
    lines = [ln for ln in refused.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: twice: "), refused


# -- the cluster address ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_address_where_nothing_listens_is_refused_at_once(tmp_path: Path, project: Path) -> None:
    from conftest import free_port

    address = f"127.0.0.1:{free_port()}"
    line = one_error_line(CliRunner().invoke(app, ["run", str(_write(tmp_path, GOOD)), "--address", address]))
    assert f"--address {address}: no Ray cluster answers there" in line, line
    _nothing_started(project)
