"""Sweep YAML validation: every malformed spec is refused with one line naming the field (exit 2)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sct_sweeps.cli import app
from sct_sweeps.config import SweepSpec, load_spec, parse_spec
from sct_sweeps.errors import SpecError
from sct_sweeps.stores import resolve_stores

GOOD = {
    "name": "t",
    "base": {"iterations": 20, "network": {"model_channels": 8}},
    "search": {"seed": {"grid": [0, 1]}},
}


def spec_with(**changes: object) -> dict:
    """GOOD with dotted-key changes; a value None deletes the key."""
    raw = copy.deepcopy(GOOD)
    for path, value in changes.items():
        node = raw
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return raw


BAD = [
    # (case id, spec changes, substring the one-line message must contain)
    ("unknown-top-key", {"searhc": {}}, "searhc: unknown key"),
    ("unknown-base-key", {"base/sct": {"ref_bach": 4}}, "base.sct.ref_bach: unknown key"),
    ("negative-iterations", {"base/iterations": -5}, "base.iterations:"),
    ("wrong-type-width", {"base/network": {"model_channels": "wide"}}, "base.network.model_channels:"),
    ("eta-above-1", {"base/sampler": {"eta": 1.5}}, "base.sampler.eta:"),
    ("unknown-dataset", {"base/data": {"name": "mnist"}}, "base.data.name:"),
    ("empty-search", {"search": {}}, "search: empty search space"),
    ("ref-batch-zero-in-grid", {"search": {"sct.ref_batch": {"grid": [1, 64, 0]}}}, "search.sct.ref_batch.grid[2]"),
    ("eta-out-of-range-axis", {"search": {"sampler.eta": {"uniform": [0.0, 1.5]}}}, "search.sampler.eta.uniform[1]"),
    ("unknown-axis-path", {"search": {"sct.ref_bach": {"grid": [1]}}}, "search.sct.ref_bach: unknown setting"),
    ("axis-on-section", {"search": {"sct": {"grid": [1]}}}, "search.sct: sct is a section"),
    ("axis-two-kinds", {"search": {"seed": {"grid": [0], "choice": [1]}}}, "search.seed"),
    ("axis-no-kind", {"search": {"seed": {}}}, "search.seed"),
    ("axis-unknown-kind", {"search": {"seed": {"range": [0, 3]}}}, "search.seed.range: unknown key"),
    ("axis-empty-grid", {"search": {"seed": {"grid": []}}}, "grid: must list at least one value"),
    ("uniform-reversed", {"search": {"optim.lr": {"uniform": [0.1, 0.01]}}}, "needs lo < hi"),
    ("loguniform-zero", {"search": {"optim.lr": {"loguniform": [0.0, 0.01]}}}, "loguniform: needs lo > 0"),
    (
        "width-negative-axis",
        {"search": {"network.model_channels": {"grid": [16, -8]}}},
        "search.network.model_channels.grid[1]",
    ),
    (
        "mapping-unknown",
        {"search": {"schedule.mapping": {"choice": ["sigmoid", "cosine"]}}},
        "search.schedule.mapping.choice[1]",
    ),
    ("q-not-above-1", {"search": {"schedule.q": {"grid": [2, 1]}}}, "search.schedule.q.grid[1]"),
    ("iterations-uniform", {"search": {"iterations": {"uniform": [10, 20]}}}, "iterations takes integers"),
    ("optuna-with-grid", {"algorithm": "optuna"}, "Optuna cannot search a grid"),
    ("unknown-algorithm", {"algorithm": "bayes"}, "algorithm:"),
    ("bad-name", {"name": "../etc"}, "name:"),
    ("name-with-space", {"name": "my sweep"}, "name:"),
    ("num-samples-zero", {"num_samples": 0}, "num_samples:"),
    ("negative-cpu", {"resources": {"cpu": -1}}, "resources.cpu:"),
    ("negative-gpu", {"resources": {"gpu": -0.5}}, "resources.gpu:"),
    ("zero-workers", {"resources": {"workers": 0}}, "resources.workers:"),
    ("unknown-placement", {"resources": {"workers": 2, "placement": "strict"}}, "resources.placement:"),
    ("batch-not-split", {"resources": {"workers": 3}}, "does not split evenly over resources.workers = 3"),
    ("worker-gpu-fraction", {"resources": {"workers": 2, "gpu": 0.5}}, "resources.gpu: 0.5 GPU per worker"),
    (
        "batch-axis-not-split",
        {"resources": {"workers": 4}, "search": {"optim.batch_size": {"grid": [64, 96, 102]}}},
        "search.optim.batch_size.grid[2]: the global batch 102",
    ),
    ("metric-not-reported", {"metric": "fid_4step"}, "metric: 'fid_4step' is not reported"),
    ("unknown-scheduler", {"scheduler": "hyperband"}, "scheduler.type:"),
    ("grace-beyond-budget", {"scheduler": {"type": "asha", "grace_period": 500}}, "scheduler.grace_period: 500"),
    ("missing-data-root", {"base/data": {"name": "folder", "root": "/nonexistent/sct-data"}}, "data.root"),
    ("folder-without-root", {"base/data": {"name": "folder"}}, "data.root: the folder dataset"),
    (
        "cifar-without-inception",
        {"base/data": {"name": "cifar10", "root": "/tmp"}},
        "eval.inception_weights: cifar10 FID needs",
    ),
    (
        "missing-pretrain-checkpoint",
        {"base/pretrain": {"checkpoint": "/nonexistent/pre.pt"}},
        "pretrain.checkpoint: /nonexistent/pre.pt: file not found",
    ),
    ("classic-cfg-unconditional", {"base/guidance": {"mode": "classic"}}, "classic needs data.conditional"),
    ("bad-device", {"base/device": "tpu"}, "base.device:"),
    ("missing-search", {"search": None}, "search:"),
]


@pytest.mark.parametrize("case,changes,expected", BAD, ids=[b[0] for b in BAD])
def test_malformed_spec_is_one_line_naming_the_field(case: str, changes: dict, expected: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec_with(**changes), "s.yaml")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("s.yaml: ")
    assert expected in msg, msg


def test_good_spec_and_defaults(project: Path) -> None:
    spec = parse_spec(spec_with(), "s.yaml")
    assert spec.base.iterations == 20 and spec.algorithm == "grid"
    assert resolve_stores(spec=spec).results == project / "ray_results"
    assert resolve_stores(spec=spec).tracking_uri == f"sqlite:///{project / 'mlruns.db'}"
    assert resolve_stores(spec=spec, tracking_uri="sqlite:///rel.db").tracking_uri.startswith("sqlite:////")
    with pytest.raises(SpecError, match="tracking_uri"):
        resolve_stores(spec=spec, tracking_uri="just/a/path")


def test_relative_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pre.pt").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    spec = parse_spec(spec_with(**{"base/pretrain": {"checkpoint": "pre.pt"}}), "s.yaml")
    assert spec.base.pretrain.checkpoint == tmp_path / "pre.pt"
    assert spec.base.out_dir.is_absolute()


def test_optuna_choices_accepted() -> None:
    raw = spec_with(
        algorithm="optuna", num_samples=3, search={"sampler.eta": {"uniform": [0.0, 0.5]}, "seed": {"choice": [0, 1]}}
    )
    spec = parse_spec(raw)
    assert spec.search["sampler.eta"].kind == "uniform"


def test_file_level_errors(tmp_path: Path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: x\nsearch: {seed: {grid: [0, 1]\n")
    with pytest.raises(SpecError, match=r"bad.yaml: invalid YAML \(line"):
        load_spec(bad_yaml)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="top level must be a mapping"):
        load_spec(listing)
    with pytest.raises(SpecError, match="sweep file not found"):
        load_spec(tmp_path / "missing.yaml")
    named = tmp_path / "my-sweep.yaml"
    named.write_text(yaml.safe_dump({k: v for k, v in GOOD.items() if k != "name"}))
    assert load_spec(named).name == "my-sweep"


@pytest.mark.parametrize("case,changes,expected", BAD[:8] + BAD[-6:], ids=[b[0] for b in BAD[:8] + BAD[-6:]])
def test_cli_validate_exits_2_with_one_line(
    case: str, changes: dict, expected: str, tmp_path: Path, project: Path
) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec_with(**changes)))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert not (project / "mlruns.db").exists() and not (project / "ray_results").exists()


EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SWEEP_FILES = sorted(p for p in EXPERIMENTS.glob("*.yaml") if p.name != "fmnist_pretrain.yaml")


def _load_here(path: Path) -> SweepSpec | None:
    """The validated spec; None where only the data (or Inception weights) are missing on this machine."""
    try:
        return load_spec(path)
    except SpecError as e:
        if "data.root" in str(e) or "inception" in str(e).lower():
            return None
        raise


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_every_shipped_sweep_validates(path: Path) -> None:
    from sct_sweeps.space import plan

    spec = _load_here(path)
    if spec is None:  # paper targets: the dataset (or the Inception weights) is not on this machine
        assert path.stem.startswith(("cifar10", "imagenet64")), path
        return
    assert spec.name == path.stem and plan(spec, 2).trials >= 1


@pytest.mark.parametrize("path", [p for p in SWEEP_FILES if p.stem.startswith("fmnist_")], ids=lambda p: p.stem)
def test_fashion_mnist_reproductions_plan_at_most_two_hours_on_two_cores(path: Path) -> None:
    from sct_sweeps.space import plan

    spec = _load_here(path)
    if spec is None:
        pytest.skip("Fashion-MNIST files not installed here (make install installs them)")
    est = plan(spec, 2).est_wall_s
    assert est is not None and est <= 2 * 3600, est


TRAIN_FILES = sorted((EXPERIMENTS / "train").glob("*.yaml")) + [EXPERIMENTS / "fmnist_pretrain.yaml"]


@pytest.mark.parametrize("path", TRAIN_FILES, ids=lambda p: p.stem)
def test_every_shipped_training_config_validates(path: Path) -> None:
    from trainer.config import load_train_config

    assert load_train_config(path).iterations >= 1
