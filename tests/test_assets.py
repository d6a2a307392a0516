"""The shipped pretrained Fashion-MNIST diffusion model: loads safely and denoises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer.config import TrainConfig
from trainer.data import load_dataset
from trainer.errors import DataError
from trainer.loss import edm_loss
from trainer.train import load_for_sampling

ASSET = Path(__file__).resolve().parents[1] / "trainer" / "assets" / "fmnist_edm_c20.pt"


def test_shipped_pretrain_loads_with_weights_only():
    state = torch.load(ASSET, map_location="cpu", weights_only=True)
    assert state["kind"] == "pretrain" and state["iteration"] > 0
    cfg = TrainConfig.model_validate_json(state["config"])
    assert cfg.data.name == "fashion_mnist" and cfg.network.model_channels == 20
    info = json.loads(ASSET.with_suffix(".json").read_text())
    assert info["iterations"] == state["iteration"] and ASSET.stat().st_size <= 25 * 2**20


@pytest.mark.fmnist
def test_shipped_pretrain_denoises_fashion_mnist():
    try:
        model, cfg, _ = load_for_sampling(ASSET, "cpu")
        test = load_dataset(cfg.data, "test")
    except DataError as e:
        pytest.skip(f"Fashion-MNIST files not installed: {e}")
    torch.manual_seed(0)
    with torch.no_grad():
        trained = float(edm_loss(model, test.images[:256], None, -1.2, 1.2).loss)
        for p in model.net.conv_out.parameters():  # an untrained output layer: D ≈ c_skip·x
            p.zero_()
        torch.manual_seed(0)
        untrained = float(edm_loss(model, test.images[:256], None, -1.2, 1.2).loss)
    assert trained < 0.5 * untrained


@pytest.mark.fmnist
@pytest.mark.slow
def test_python_m_trainer_tunes_fashion_mnist_from_the_shipped_checkpoint(tmp_path: Path) -> None:
    """experiments/train/fmnist_sct.yaml, shortened: `python -m trainer` trains and logs 1-/2-step FID."""
    import os
    import subprocess
    import sys

    import yaml

    from trainer.config import DataConfig

    try:
        load_dataset(DataConfig(name="fashion_mnist"), "test")
    except DataError as e:
        pytest.skip(f"Fashion-MNIST files not installed: {e}")
    repo = ASSET.parents[2]
    raw = yaml.safe_load((repo / "experiments" / "train" / "fmnist_sct.yaml").read_text())
    raw.update(iterations=4, log_every=2, checkpoint_every=4, out_dir=str(tmp_path / "run"))
    raw["pretrain"]["checkpoint"] = str(ASSET)
    raw["sct"]["ref_batch"] = 128
    raw["eval"].update(every=4, fid_samples=100, batch_size=100)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "trainer", "--config", "run.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "fid_1step" in r]
    assert [r["step"] for r in evals] == [0, 4], evals
    for r in evals:
        assert all(0.0 < r[k] < 1e4 for k in ("fid_1step", "fid_2step", "fid_1step_online", "fid_2step_online")), r
    assert (tmp_path / "run" / "checkpoints").is_dir()
