"""Bad input refused clearly, and the security rules of the code base.

`sct-sweep run` on a malformed spec and `python -m trainer` on a malformed config exit 2 with one
line naming the field and what to do, before any Ray, MLflow store or run exists. (Spec validation
itself, field by field, is in test_sweep_config.py; `validate` and other commands in test_cli.py.)
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, one_error_line, processes_under, sct_sweep
from typer.testing import CliRunner

from sct_sweeps.cli import app
from sct_sweeps.config import check_name, load_spec
from sct_sweeps.errors import SpecError

GOOD = {
    "name": "bad",
    "base": {"iterations": 20, "network": {"model_channels": 8}},
    "search": {"seed": {"grid": [0, 1]}},
}


def _replaced(base: dict, path: str, value: object) -> dict:
    """A deep copy of `base` with the setting at slash-separated `path` replaced."""
    raw = yaml.safe_load(yaml.safe_dump(base))
    *parents, leaf = path.split("/")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return raw


def _with(path: str, value: object) -> str:
    """GOOD as YAML text with the setting at slash-separated `path` replaced."""
    return yaml.safe_dump(_replaced(GOOD, path, value))


def _axis_data_root(roots: list[str]) -> str:
    """A Fashion-MNIST sweep over data directories (the first exists)."""
    raw = yaml.safe_load(_with("base/data", {"name": "fashion_mnist", "root": roots[0]}))
    raw["search"] = {"data.root": {"grid": roots}}
    return yaml.safe_dump(raw)


# (case id, spec file content, substrings of the one error line: the field, and the fix)
RUN_CASES = [
    ("yaml-unclosed-bracket", "name: x\nsearch: {seed: {grid: [0, 1]\n", ["invalid YAML (line 3", "indentation"]),
    ("yaml-tab-indent", "name: x\nsearch:\n\tseed: {grid: [0]}\n", ["invalid YAML (line", "quoting"]),
    ("empty-file", "", ["top level must be a mapping"]),
    ("not-utf8", b"name: \xff\xfe\n", ["not a UTF-8 text file"]),
    ("base-not-mapping", _with("base", 5), ["base:", "valid dictionary"]),
    ("search-is-a-list", _with("search", ["seed"]), ["search:", "valid dictionary"]),
    ("unknown-nested-key", _with("base/optim", {"learning_rate": 0.1}), ["base.optim.learning_rate: unknown key"]),
    ("wrong-type-bool", _with("base/data", {"conditional": "maybe"}), ["base.data.conditional:", "valid boolean"]),
    ("negative-batch", _with("base/optim", {"batch_size": -64}), ["base.optim.batch_size:", "greater than 0"]),
    ("zero-fid-samples", _with("base/eval", {"fid_samples": 0}), ["base.eval.fid_samples:", "greater than 0"]),
    ("eta-negative", _with("base/sampler", {"eta": -0.1}), ["base.sampler.eta:", "greater than or equal to 0"]),
    ("eta-axis-above-1", _with("search", {"sampler.eta": {"choice": [0.5, 2]}}),
     ["search.sampler.eta.choice[1]:", "less than or equal to 1"]),
    ("empty-search-space", _with("search", {}), ["search: empty search space", "add at least one axis"]),
    ("eval-variants-axis", _with("search", {"eval.variants": {"grid": [[]]}}),
     ["search.eval.variants: the sweep sets it from the evaluation-only axes"]),
    ("variant-of-a-training-setting", _with("base/eval", {"variants": [{"optim.lr": 0.1}]}),
     ["base.eval.variants:", "optim.lr is not an evaluation-only setting"]),
    ("missing-data-path", _with("base/data", {"name": "fashion_mnist", "root": "/nonexistent/fm"}),
     ["base.data.root: /nonexistent/fm: directory not found"]),
    ("unknown-dataset", _with("base/data", {"name": "imagenet"}), ["base.data.name:", "'digits'"]),
    ("cifar-without-inception", _with("base/data", {"name": "cifar10", "root": "/tmp"}),
     ["eval.inception_weights: cifar10 FID needs", "set its local path"]),
    ("inception-file-missing", _with("base/eval", {"inception_weights": "/nonexistent/inc.pth"}),
     ["base.eval.inception_weights: /nonexistent/inc.pth: file not found"]),
    ("gpu-where-none", _with("resources", {"gpu": 0.5}), ["resources.gpu: 0.5 GPU per trial", "no CUDA GPU"]),
    ("tracking-uri-no-scheme", _with("tracking_uri", "mlruns"), ["tracking_uri: 'mlruns' needs a scheme"]),
    ("max-failures-below-minus-1", _with("max_failures", -2), ["max_failures:", "greater than or equal to -1"]),
    ("negative-mlflow-flush", _with("mlflow_flush_s", -1), ["mlflow_flush_s:", "greater than or equal to 0"]),
    ("ref-batch-word", _with("base/sct", {"ref_batch": "many"}), ["base.sct.ref_batch"]),
    ("sampler-steps-zero", _with("base/sampler", {"steps": [1, 0]}), ["base.sampler.steps:", ">= 1"]),
    ("dropout-one", _with("base/network", {"dropout": 1.0}), ["base.network.dropout:", "less than 1"]),
    ("data-path-missing-for-one-axis-value", _axis_data_root(["/tmp", "/nonexistent/d2"]),
     ["search.data.root.grid[1]: data.root: /nonexistent/d2: directory not found"]),
]  # fmt: skip


@pytest.mark.parametrize("case,text,expected", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_run_refuses_malformed_spec_before_starting_anything(
    case: str, text: str | bytes, expected: list[str], tmp_path: Path, project: Path
) -> None:
    if case == "gpu-where-none":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    path = tmp_path / "spec.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    line = one_error_line(CliRunner().invoke(app, ["run", str(path)]))
    for part in expected:
        assert part in line, (part, line)
    # Nothing was started or written: no store, no results, no Ray.
    assert not (project / "mlruns.db").exists() and not (project / "ray_results").exists()
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    assert not processes_under(str(project))


@pytest.mark.slow
def test_resources_beyond_the_cluster_leave_no_ray_and_no_run(
    tmp_path: Path, cli_env: dict[str, str], project: Path
) -> None:
    """Checked only once Ray is up (it needs the cluster's nodes): exit 2, Ray stopped, no MLflow run."""
    path = tmp_path / "spec.yaml"
    path.write_text(_with("resources", {"cpu": 3}))
    done = subprocess.run(
        [sct_sweep(), "run", str(path), "--num-cpus", "2"], env=cli_env, capture_output=True, text=True, timeout=120
    )
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "error: resources.cpu: 3 CPUs per trial, but the largest Ray node has 2" in lines[0]
    from sct_sweeps import tracking

    client = tracking.client(f"sqlite:///{project / 'mlruns.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(experiments), "an MLflow run was left behind"
    # Ray processes of this run are gone: the ray_tmp fixture fails the test otherwise.


# -- python -m trainer -------------------------------------------------------------------------

TRAIN_OK = {
    "method": "ect", "iterations": 2, "device": "cpu",
    "network": {"model_channels": 8, "channel_mult": [1], "num_blocks": 1},
    "pretrain": {"iterations": 0}, "optim": {"batch_size": 16},
    "eval": {"at_start": False, "every": 100, "fid_samples": 16, "batch_size": 16},
}  # fmt: skip


def _train_with(path: str, value: object) -> dict:
    return _replaced(TRAIN_OK, path, value)


TRAIN_CASES = [
    ("yaml-syntax", "method: sct\noptim: {lr: 1e-3\n", ["invalid YAML (line"]),
    ("top-level-list", "- method\n- sct\n", ["top level must be a mapping"]),
    ("unknown-key", _train_with("optim/lrr", 0.1), ["optim.lrr: unknown key"]),
    ("wrong-type", _train_with("iterations", "many"), ["iterations:", "valid integer"]),
    ("negative-width", _train_with("network/model_channels", -8), ["network.model_channels:", "greater than 0"]),
    ("eta-outside", _train_with("sampler/eta", 2.0), ["sampler.eta:", "less than or equal to 1"]),
    ("unknown-method", _train_with("method", "lcm"), ["method:", "'sct'"]),
    ("unknown-dataset", _train_with("data/name", "mnist"), ["data.name:", "'fashion_mnist'"]),
    ("classic-cfg-unconditional", _train_with("guidance/mode", "classic"), ["classic needs data.conditional: true"]),
    ("missing-data-path", _train_with("data", {"name": "fashion_mnist", "root": "/nonexistent/fm"}),
     ["/nonexistent/fm/train-images-idx3-ubyte.gz: file not found", "install with"]),
    ("missing-pretrain-checkpoint", _train_with("pretrain/checkpoint", "/nonexistent/pre.pt"),
     ["/nonexistent/pre.pt: checkpoint not found"]),
    ("ref-batch-larger-than-dataset", {**TRAIN_OK, "method": "sct", "sct": {"ref_batch": 5000}},
     ["sct.ref_batch: 5000 is larger than the digits training set", "'all'"]),
]  # fmt: skip


@pytest.mark.parametrize("case,content,expected", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_trainer_cli_refuses_malformed_config(
    case: str, content: str | dict, expected: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from trainer.__main__ import main

    if isinstance(content, dict):
        content = yaml.safe_dump({**content, "out_dir": str(tmp_path / "run")})
    path = tmp_path / "train.yaml"
    path.write_text(content)
    assert main(["--config", str(path)]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for part in expected:
        assert part in lines[0], (part, lines[0])
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# -- security ----------------------------------------------------------------------------------

SOURCE_DIRS = ("sct_sweeps", "trainer", "dashboards", "scripts", "bench")


def _python_files() -> list[Path]:
    files = [p for d in SOURCE_DIRS for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 20, files
    return files


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _unsafe_calls(tree: ast.AST) -> list[str]:
    """Calls that load untrusted data unsafely or hand strings to a shell."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        where = f"line {node.lineno}: {name}"
        if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
            found.append(where)
        if name == "torch.load":
            wo = kw.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                found.append(f"{where} without weights_only=True")
        if name in ("pickle.load", "pickle.loads", "os.system", "os.popen", "eval", "exec"):
            found.append(where)
        pickles = kw.get("allow_pickle")
        if name in ("np.load", "numpy.load") and isinstance(pickles, ast.Constant) and pickles.value is True:
            found.append(f"{where} with allow_pickle=True")
        shell = kw.get("shell")
        if (
            name.startswith("subprocess.")
            and shell is not None
            and not (isinstance(shell, ast.Constant) and shell.value is False)
        ):
            found.append(f"{where} with shell=")
        if name.startswith("subprocess.") and node.args and isinstance(node.args[0], (ast.JoinedStr, ast.BinOp)):
            found.append(f"{where} with a command string built from values")
    return found


def test_no_unsafe_loads_or_shell_strings_in_the_code_base() -> None:
    bad = {}
    for path in _python_files():
        rel = str(path.relative_to(REPO))
        calls = _unsafe_calls(ast.parse(path.read_text(), rel))
        if calls:
            bad[rel] = calls
    assert not bad, bad


class _CodeInPickle:
    """A pickle that makes a directory when loaded: what a hostile data file could do instead."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        import os

        return os.mkdir, (str(self.path),)


def test_cifar_batch_cannot_run_code(tmp_path: Path) -> None:
    import pickle

    from trainer.config import DataConfig
    from trainer.data import load_dataset
    from trainer.errors import DataError

    root, marker = tmp_path / "cifar", tmp_path / "code-ran"
    root.mkdir()
    (root / "data_batch_1").write_bytes(pickle.dumps(_CodeInPickle(marker)))
    with pytest.raises(DataError):
        load_dataset(DataConfig(name="cifar10", root=root), "train")
    assert not marker.exists(), "loading a data file ran code from it"


def test_the_security_scan_catches_what_it_looks_for() -> None:
    code = (
        "import yaml, torch, subprocess, os\n"
        "yaml.load(open('x'))\ntorch.load('a.pt')\ntorch.load('a.pt', weights_only=False)\n"
        "subprocess.run(f'sct-sweep run {name}', shell=True)\nos.system('ls')\n"
        "torch.load('ok.pt', weights_only=True)\nyaml.safe_load('a: 1')\nsubprocess.run(['ls'])\n"
    )
    found = _unsafe_calls(ast.parse(code))
    assert len(found) == 6, found  # the last line's three calls are safe


def test_shell_scripts_do_not_eval_strings() -> None:
    for path in [p for d in ("scripts", "bench") for p in sorted((REPO / d).glob("*.sh"))]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            assert not re.search(r"(^|[;&|(]\s*)eval\s", code), f"{path.name}:{n}: {line}"
            assert not re.search(r"\b(ba)?sh -c\s", code), f"{path.name}:{n}: {line}"


@pytest.mark.parametrize(
    "name", ["../etc", "a/b", ".hidden", "..", "my sweep", "it's", "a`b", "x\ny", "é", "a" * 101, "", "-x;rm"]
)
def test_unsafe_sweep_names_are_refused(name: str) -> None:
    with pytest.raises(SpecError, match="not a valid sweep name"):
        check_name(name, "--name")


def test_sweep_name_from_a_file_name_is_sanitized(tmp_path: Path) -> None:
    path = tmp_path / "my sweep;$(rm -rf x)'.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in GOOD.items() if k != "name"}))
    name = load_spec(path).name
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", name) and check_name(name) == name, name
