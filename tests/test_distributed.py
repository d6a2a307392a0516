"""Data-parallel training (trainer/distributed.py): N gloo processes at global batch B take exactly the
steps one process takes at batch B (dropout 0, same seed), evaluate together, and only rank 0 writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from trainer.checkpoint import load_checkpoint
from trainer.config import TrainConfig
from trainer.distributed import World, spawn
from trainer.train import train, train_rank

pytestmark = pytest.mark.slow


def _cfg(out: Path, method: str) -> TrainConfig:
    return TrainConfig.model_validate({
        "method": method, "iterations": 5, "seed": 3, "device": "cpu", "out_dir": str(out),
        "network": {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "dropout": 0.0},
        "pretrain": {"iterations": 0}, "optim": {"batch_size": 64, "lr": 1e-3},
        "sct": {"ref_batch": 128}, "log_every": 1, "checkpoint_every": 5,
        "eval": {"every": 5, "fid_samples": 64, "batch_size": 32, "online": False, "at_start": False,
                 "save_grid": True},
    })


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("method", ["ect", "sct"])
def test_two_workers_take_the_same_steps_as_one(tmp_path: Path, method: str) -> None:
    one, two = _cfg(tmp_path / "one", method), _cfg(tmp_path / "two", method)
    train(one)
    spawn(train_rank, (two.model_dump_json(),), workers=2, backend="gloo")
    assert len(_losses(tmp_path / "two")) == 5  # only rank 0 reported: one line per step
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "two")), torch.tensor(_losses(tmp_path / "one")),
                               rtol=1e-5, atol=1e-6)
    a = load_checkpoint(tmp_path / "one" / "checkpoints" / "it0000005" / "state.pt")
    b = load_checkpoint(tmp_path / "two" / "checkpoints" / "it0000005" / "state.pt")
    for key in ("model", "ema"):
        for name, w in a[key].items():
            torch.testing.assert_close(b[key][name], w, rtol=1e-4, atol=1e-5, msg=f"{key}.{name}")
    assert b["cost"]["flops"] == pytest.approx(a["cost"]["flops"], rel=1e-6)  # both ranks' work, counted once
    fid = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()][-1]["fid_1step"]
    assert fid > 0  # features of both ranks' samples gathered, scored once
    assert len(list((tmp_path / "two" / "samples").glob("*.png"))) == 2  # rank 0's grids only


def test_shard_and_world_of_one() -> None:
    assert World().shard(64) == slice(0, 64)
    assert World(1, 2).shard(64) == slice(32, 64)
    assert World().is_main and not World(1, 2).is_main


def test_cli_workers_option(tmp_path: Path) -> None:
    """`python -m trainer --workers 2` runs phase one in the parent, then tunes on two gloo processes."""
    cfg = _cfg(tmp_path / "cli", "ect").model_dump(mode="json")
    cfg["pretrain"] = {"iterations": 5, "batch_size": 32}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "trainer", "--config", str(path), "--workers", "2"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fid_1step" in out.stdout and (tmp_path / "cli" / "pretrain.pt").is_file()
    bad = subprocess.run([sys.executable, "-m", "trainer", "--config", str(path), "--workers", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--workers" in bad.stderr


def test_global_batch_must_divide_over_the_workers(tmp_path: Path) -> None:
    from trainer.errors import ConfigError
    from trainer.train import _check_world

    cfg = _cfg(tmp_path, "ect")
    cfg.optim.batch_size = 63
    with pytest.raises(ConfigError, match="optim.batch_size: 63"):
        _check_world(cfg, World(0, 2), pretraining=False)
    cfg.optim.batch_size = 64
    with pytest.raises(ConfigError, match="pretrain.checkpoint"):
        _check_world(cfg, World(0, 2), pretraining=True)
    _check_world(cfg, World(0, 2), pretraining=False)
