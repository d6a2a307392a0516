"""Where the stores are (sct_sweeps.stores): flag > environment > spec > sweep record > project default."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sct_sweeps.cli import app
from sct_sweeps.config import parse_spec
from sct_sweeps.errors import SweepNotFoundError
from sct_sweeps.record import SweepRecord
from sct_sweeps.stores import resolve_stores

RAW = {"name": "tiny", "base": {"iterations": 20}, "search": {"seed": {"grid": [0, 1]}}}


def _record(results: Path, uri: str, cache: Path) -> None:
    SweepRecord(name="tiny", spec_yaml=yaml.safe_dump(RAW), tracking_uri=uri, experiment_id="1",
                parent_run_id="p", pretrain_cache=str(cache), results_dir=str(results / "tiny"),
                created=time.time()).save()  # fmt: skip


def test_project_defaults_follow_the_environment(project: Path) -> None:
    stores = resolve_stores(spec=parse_spec(RAW))
    assert stores.project == project and stores.results == project / "ray_results"
    assert stores.tracking_uri == f"sqlite:///{project / 'mlruns.db'}"
    assert stores.artifact_root == project / "mlartifacts"
    assert stores.pretrain_cache == project / ".cache" / "pretrain"
    assert stores.sweep_dir("tiny") == project / "ray_results" / "tiny" and stores.reports == project / "reports"


def test_spec_beats_defaults_and_flags_beat_the_spec(project: Path, tmp_path: Path) -> None:
    given = {"storage": str(tmp_path / "r"), "tracking_uri": f"sqlite:///{tmp_path / 's.db'}",
             "artifact_root": str(tmp_path / "a"), "pretrain_cache": str(tmp_path / "c")}  # fmt: skip
    spec = parse_spec({**RAW, **given})
    stores = resolve_stores(spec=spec)
    assert (stores.results, stores.tracking_uri) == (tmp_path / "r", given["tracking_uri"])
    assert (stores.artifact_root, stores.pretrain_cache) == (tmp_path / "a", tmp_path / "c")
    flagged = resolve_stores(spec=spec, storage=tmp_path / "f", tracking_uri="http://127.0.0.1:1")
    assert (flagged.results, flagged.tracking_uri) == (tmp_path / "f", "http://127.0.0.1:1")
    assert flagged.artifact_root is None  # a tracking server keeps its own artifacts


def test_a_named_sweep_uses_its_record_unless_flagged(project: Path, tmp_path: Path) -> None:
    with pytest.raises(SweepNotFoundError, match="tiny: no sweep results and no MLflow store"):
        resolve_stores(name="tiny")
    recorded = f"sqlite:///{tmp_path / 'run.db'}"
    _record(project / "ray_results", recorded, tmp_path / "cache")
    stores = resolve_stores(name="tiny")
    assert (stores.tracking_uri, stores.pretrain_cache) == (recorded, tmp_path / "cache")
    assert resolve_stores(name="tiny", tracking_uri="http://127.0.0.1:1").tracking_uri == "http://127.0.0.1:1"
    assert resolve_stores(name="other", tracking_uri="sqlite:///rel.db").tracking_uri.startswith("sqlite:////")


def test_cli_flag_beats_environment_beats_spec(project: Path, tmp_path: Path) -> None:
    # `run` prints the store it resolved, then refuses: a sweep of that name exists in the spec's storage.
    spec_uri, env_uri, flag_uri = (f"sqlite:///{tmp_path / n}.db" for n in ("spec", "env", "flag"))
    (tmp_path / "r" / "tiny").mkdir(parents=True)
    (tmp_path / "r" / "tiny" / "sct_sweep.json").write_text(json.dumps({}))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**RAW, "storage": str(tmp_path / "r"), "tracking_uri": spec_uri}))
    runs = {
        spec_uri: CliRunner().invoke(app, ["run", str(path)]),
        env_uri: CliRunner().invoke(app, ["run", str(path)], env={"MLFLOW_TRACKING_URI": env_uri}),
        flag_uri: CliRunner().invoke(
            app, ["run", str(path), "--tracking-uri", flag_uri], env={"MLFLOW_TRACKING_URI": env_uri}
        ),
    }
    for uri, result in runs.items():
        assert result.exit_code == 2 and f"MLflow {uri})" in result.output, result.output
        assert "tiny: a sweep with this name exists" in result.output
