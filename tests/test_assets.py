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
