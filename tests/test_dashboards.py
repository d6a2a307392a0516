"""dashboards: loader, Parquet export, report and its publication, against a real MLflow SQLite store.

The store is filled with a synthetic sweep in exactly the runner's schema (docs/architecture.md):
parent run + nested trial runs with tags, flattened TrainConfig params, metrics by iteration and
sample-grid artifacts. The report is opened in a real headless Chromium.
"""

from __future__ import annotations

import itertools
import math
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from trainer.config import TrainConfig

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
TRUE_B = 0.35  # exponent of the synthetic FID(C)


def flatten(d: Mapping, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, f"{key}.") if isinstance(v, Mapping) else {key: str(v)})
    return out


def synthetic_fid(flops: float, axes: Mapping[str, object], k: int, noise: float) -> float:
    """FID = a·C^(−b) + floor(width); ECT (ref_batch 1) 15% worse; the 2-step sampler 40% better."""
    width = float(axes.get("network.model_channels", 32))
    fid = 4e5 * flops ** -TRUE_B + 2.0 + 160.0 / width
    fid *= 1.15 if axes.get("sct.ref_batch") == 1 else 1.0
    fid *= 0.6 if k == 2 else 1.0
    return fid * math.exp(noise)


def write_sweep(uri: str, root: Path, sweep: str, grid: Mapping[str, Sequence[object]],
                iterations: int = 400, eval_every: int = 100, log_every: int = 50, noise: float = 0.03,
                samples: Callable[[Mapping[str, object]], bool] | None = None) -> str:
    """Log a finished synthetic sweep in the runner's schema; returns the parent run id."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(sweep, artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(exp, run_name=sweep, tags={"sct.sweep": sweep, "sct.role": "parent"}).info.run_id
    spec = root / "spec" / "spec.yaml"
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(yaml.safe_dump({"name": sweep, "grid": {k: list(v) for k, v in grid.items()}}))
    client.log_artifact(parent, str(spec))
    rng = np.random.default_rng(0)
    for i, values in enumerate(itertools.product(*grid.values())):
        axes = dict(zip(grid, values, strict=True))
        cfg = TrainConfig(iterations=iterations).model_dump(mode="json")
        for path, v in axes.items():  # set the dotted path in the nested config
            *head, last = path.split(".")
            node = cfg
            for h in head:
                node = node[h]
            node[last] = v
        tid = f"trial_{i:03d}"
        tags = {"mlflow.parentRunId": parent, "sct.role": "trial", "sct.trial_id": tid,
                **{f"sct.axis.{k}": str(v) for k, v in axes.items()}}
        run = client.create_run(exp, run_name=tid, tags=tags).info.run_id
        params = [Param(k, v) for k, v in flatten(cfg).items()]
        for j in range(0, len(params), 100):
            client.log_batch(run, params=params[j:j + 100])
        width = float(axes.get("network.model_channels", 32))
        n_params = 2000.0 * width**2
        flops_per_it = 6 * n_params * 128
        client.log_metric(run, "n_params", n_params, step=0)
        metrics = []  # one batch per trial: a few SQLite commits instead of one per step
        for step in range(0, iterations + 1, log_every):
            m = {"loss": 1.0 / (1 + step / 100), "images_seen": 128.0 * step, "flops": flops_per_it * step,
                 "wall_s": 0.01 * width * step, "iteration": float(step)}
            if step > 0 and step % eval_every == 0:
                for k in (1, 2):
                    m[f"fid_{k}step"] = synthetic_fid(flops_per_it * step, axes, k, rng.normal(0, noise))
                    m[f"fid_{k}step_online"] = 1.1 * m[f"fid_{k}step"]
            metrics += [Metric(k, v, 1_700_000_000_000 + step, step) for k, v in m.items()]
        client.log_batch(run, metrics=metrics)
        if samples is not None and samples(axes):
            for k in (1, 2, 4):
                for it in (eval_every, iterations):
                    png = root / "grids" / tid / f"grid_{k}step_it{it}.png"
                    png.parent.mkdir(parents=True, exist_ok=True)
                    import matplotlib.image as mpimg

                    mpimg.imsave(png, rng.random((32, 32)) * (it / iterations), cmap="gray")
                    client.log_artifact(run, str(png), "samples")
        client.set_terminated(run, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    return parent


GRID = {"network.model_channels": [16, 32, 64, 128], "sct.ref_batch": [1, 256], "seed": [0, 1]}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"  # root is absolute: four slashes
    write_sweep(uri, root, "synth", GRID, samples=lambda axes: axes["network.model_channels"] == 128)
    write_sweep(uri, root, "tiny", {"seed": [0, 1]}, iterations=200)
    return uri, root


@pytest.fixture(scope="module")
def published(store: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic sweep's report, built and logged to its parent run once for the module."""
    from dashboards.report import publish_report

    return publish_report(store[0], "synth", tmp_path_factory.mktemp("report") / "synth", n_boot=50)


@pytest.mark.slow
def test_loader_round_trip(store: tuple[str, Path]) -> None:
    from dashboards.loader import load_sweep

    uri, _ = store
    res = load_sweep(uri, "synth")
    assert len(res.trials) == 16 and res.fid_steps == [1, 2]
    assert res.axis_names == ["network.model_channels", "sct.ref_batch", "seed"]
    t = res.trials[0]
    assert t.trial_id == "trial_000" and t.status == "FINISHED"
    assert t.axes == {"network.model_channels": 16, "sct.ref_batch": 1, "seed": 0}
    assert t.params["network.model_channels"] == "16" and t.params["method"] == "sct"
    assert res.spec_yaml is not None and "model_channels" in res.spec_yaml
    h = res.history
    assert len(h) == 16 * 9  # steps 0, 50, ..., 400
    assert list(h.columns[:4]) == ["trial_id", "run_name", "run_id", "step"]
    one = h[h.trial_id == "trial_000"].set_index("step")
    assert one.loc[400, "fid_1step"] == pytest.approx(t.final["fid_1step"])
    assert one.loc[400, "flops"] == pytest.approx(6 * 2000.0 * 16**2 * 128 * 400)
    assert math.isnan(one.loc[50, "fid_1step"]) and one.loc[0, "n_params"] == 2000.0 * 16**2
    assert h["network.model_channels"].dtype.kind in "if"  # typed param column
    assert set(h.loc[h.trial_id == "trial_001", "sct.ref_batch"]) == {1}


@pytest.mark.slow
def test_seed_curves_average_each_group_over_its_seeds(store: tuple[str, Path]) -> None:
    from dashboards.loader import load_sweep
    from dashboards.plots import seed_curves

    res = load_sweep(store[0], "synth")
    c = seed_curves(res)
    assert set(c.n) == {2} and len(c) == 8 * 2 * 4  # 8 groups x 2 samplers x evaluations at 100..400
    row = c[(c.group == "model_channels=128, ref_batch=1") & (c.k == 2) & (c.step == 300)].iloc[0]
    h = res.history
    ids = [t.trial_id for t in res.trials if t.axes["network.model_channels"] == 128 and t.axes["sct.ref_batch"] == 1]
    vals = h[h.trial_id.isin(ids) & (h.step == 300)]["fid_2step"]
    assert len(vals) == 2 and vals.iloc[0] != vals.iloc[1]
    assert (row["mean"], row["min"], row["max"]) == pytest.approx((vals.mean(), vals.min(), vals.max()))


@pytest.mark.slow
def test_unknown_sweep_is_a_one_line_error(store: tuple[str, Path]) -> None:
    from dashboards.loader import ResultsError, load_sweep

    with pytest.raises(ResultsError, match="sweep nope: no MLflow experiment"):
        load_sweep(store[0], "nope")


@pytest.mark.slow
def test_export_parquet_equals_loader_frame(store: tuple[str, Path], tmp_path: Path) -> None:
    from dashboards.export import export_parquet
    from dashboards.loader import load_sweep

    uri, _ = store
    out = export_parquet(uri, "synth", tmp_path / "x" / "synth.parquet")
    table = pq.read_table(out)
    df = table.to_pandas()
    assert len(df) == 16 * 9 and not df.duplicated(["trial_id", "step"]).any()
    for col in ("fid_1step", "flops", "network.model_channels", "sct.ref_batch", "sampler.eta", "method"):
        assert col in df.columns
    pd.testing.assert_frame_equal(df, load_sweep(uri, "synth").history)
    assert df.run_name.str.fullmatch(r"trial_\d{3}").all() and df.run_id.str.fullmatch(r"[0-9a-f]{32}").all()
    assert df["data.root"].isna().all() and df["pretrain.checkpoint"].isna().all()  # nulls, not "None"
    assert table.schema.metadata[b"sct.sweep"] == b"synth"


@pytest.mark.slow
def test_report_builds_and_publishes(store: tuple[str, Path], published: Path) -> None:
    from dashboards.loader import load_sweep

    uri, _ = store
    path = published
    page = path.read_text()
    assert path.name == "index.html" and path.parent.name == "synth"
    imgs = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    names = sorted(p.name for p in path.parent.glob("*.png"))
    assert names == ["ablation_network_model_channels.png", "ablation_sct_ref_batch.png", "fid_curves.png",
                     "samples_best.png", "scaling_flops.png", "scaling_images_seen.png", "scaling_n_params.png"]
    assert len(imgs) == len(names) and "src=\"http" not in page  # self-contained
    assert page.count("<tr>") >= 16 and "trial_015" in page and "model_channels" in page
    res = load_sweep(uri, "synth")
    t = res.trials[3]  # its run name, linked to its run in the MLflow UI
    link = f'<a href="http://127.0.0.1:5000/#/experiments/{res.experiment_id}/runs/{t.run_id}"'
    assert f'{link} title="MLflow run {t.run_id}">{t.run_name}</a>' in page

    client = MlflowClient(tracking_uri=uri)
    parent = res.parent_run_id
    arts = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/index.html", "report/scaling_flops.png", "report/fid_curves.png"} <= arts
    run = client.get_run(parent)
    m = run.data.metrics
    for k in (1, 2):
        assert m[f"scaling_{k}step_b_ci_low"] <= m[f"scaling_{k}step_b"] <= m[f"scaling_{k}step_b_ci_high"]
        assert 0 < m[f"scaling_{k}step_r2"] <= 1
    assert m["scaling_1step_b"] == pytest.approx(TRUE_B, rel=0.35)  # the frontier is a lower envelope
    assert run.data.tags["sct.scaling_1step"] == "ok" and run.data.tags["sct.report"] == "report/index.html"


@pytest.mark.slow
def test_report_without_enough_points_says_so(store: tuple[str, Path], tmp_path: Path) -> None:
    from dashboards.loader import load_sweep
    from dashboards.report import publish_report

    uri, _ = store
    page = publish_report(uri, "tiny", tmp_path / "tiny", n_boot=20).read_text()
    publish_report(uri, "tiny", tmp_path / "tiny", n_boot=20)  # publishing again (after a resume) works
    assert "no fit: only 2 distinct flops values on the Pareto frontier of 4 evaluations" in page
    assert not (tmp_path / "tiny" / "samples_best.png").exists()
    tags = MlflowClient(tracking_uri=uri).get_run(load_sweep(uri, "tiny").parent_run_id).data.tags
    assert tags["sct.scaling_1step"].startswith("no fit:")


def _dump_dom(url: str, profile: Path) -> str:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
           "--dump-dom", url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=True).stdout


@pytest.mark.slow
def test_report_renders_in_headless_chromium(published: Path, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: run `bash scripts/install_chromium.sh` (apt-get, needs root)")
    path = published
    dom = _dump_dom(path.as_uri(), tmp_path / "profile")
    total, loaded = re.search(r'data-img-total="(\d+)"', dom), re.search(r'data-img-ok="(\d+)"', dom)
    assert total and loaded, "the page's load script did not run"
    total, loaded = int(total.group(1)), int(loaded.group(1))
    assert total == 7 and loaded == total, f"{loaded}/{total} images loaded"

    dom = _dump_dom(path.as_uri() + "?sort=fid_1step", tmp_path / "profile")  # the table sorts
    tbody = dom.split('id="trials"', 1)[1].split("</tbody>", 1)[0]
    col = re.findall(r'<th data-key="([^"]+)"', dom).index("fid_1step")
    rows = re.findall(r"<tr>(.*?)</tr>", tbody)[1:]
    fids = [float(re.findall(r'<td(?: data-v="([^"]*)")?>', r)[col]) for r in rows]
    assert len(fids) == 16 and fids == sorted(fids)


def test_chromium_installer_is_idempotent() -> None:
    if not CHROMIUM.exists() or shutil.which("bash") is None:
        pytest.skip("chromium not installed here; the installer would run apt-get")
    out = subprocess.run(["bash", "scripts/install_chromium.sh"], capture_output=True, text=True, timeout=30,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stdout == "" and out.stderr == ""


@pytest.mark.slow
def test_fid_curves_one_panel_per_sampler_coloured_by_first_axis(store: tuple[str, Path]) -> None:
    from dashboards.loader import load_sweep
    from dashboards.plots import fid_curves_figure

    res = load_sweep(store[0], "synth")
    fig = fid_curves_figure(res)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["1-step sampler", "2-step sampler"]
    for ax in panels:  # 8 groups (width x ref_batch), each the mean over its 2 seeds with a band
        assert len(ax.get_lines()) == 8 and len(ax.collections) == 8
        colours = {tuple(line.get_color()) for line in ax.get_lines()}
        assert len(colours) == 4  # one per model_channels value
    legends = {lg.get_title().get_text(): [t.get_text() for t in lg.get_texts()] for lg in fig.legends}
    assert legends == {"colour: network.model_channels": [f"model_channels={w}" for w in (16, 32, 64, 128)],
                       "line: sct.ref_batch": ["ref_batch=1", "ref_batch=256"]}
