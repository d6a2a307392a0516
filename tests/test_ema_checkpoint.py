"""trainer.ema (docs/algorithms.md §3 step 7, §8) and trainer.checkpoint (atomic, sha256, weights_only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from trainer.checkpoint import load_checkpoint, load_latest, save_checkpoint
from trainer.ema import Ema
from trainer.errors import CheckpointError


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def test_ema_decay_warmup_formula() -> None:
    ema = Ema(_net(), beta=0.999, warmup=True)
    for i in (0, 1, 5, 100, 10_000, 10**6):
        assert ema.decay(i) == pytest.approx(min(0.999, (1 + i) / (10 + i)), rel=1e-12)
    assert ema.decay(0) == pytest.approx(0.1)
    assert Ema(_net(), beta=0.9993, warmup=False).decay(0) == 0.9993


def test_ema_update_is_a_lerp_and_copies_buffers() -> None:
    model = _net(0)
    ema = Ema(model, beta=0.9, warmup=True)
    before = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model[1].running_mean.add_(3.0)
    ema.update(model, 20)
    beta = min(0.9, 21 / 30)
    for e, b, m in zip(ema.model.parameters(), before, model.parameters(), strict=True):
        torch.testing.assert_close(e, beta * b + (1 - beta) * m.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ema.model[1].running_mean, model[1].running_mean)
    # The EMA copy is separate storage, frozen and in eval mode.
    assert all(not p.requires_grad for p in ema.model.parameters()) and not ema.model.training
    assert all(e.data_ptr() != m.data_ptr() for e, m in zip(ema.model.parameters(), model.parameters(), strict=True))


def test_ema_snapshot_is_a_frozen_copy() -> None:
    model = _net(0)
    ema = Ema(model, beta=0.5, warmup=False)
    snap = ema.snapshot()
    frozen = [p.clone() for p in snap.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, 0)
    for s, f, e in zip(snap.parameters(), frozen, ema.model.parameters(), strict=True):
        assert torch.equal(s, f) and not torch.equal(s, e)
        assert not s.requires_grad


def _state(seed: int = 0) -> dict:
    net = _net(seed)
    return {"model": net.state_dict(), "iteration": 12, "cost": {"kimg": 1.5, "flops": 3.0e9},
            "snapshots": {"0.5": {k: v.clone() for k, v in net.state_dict().items()}},
            "rng": torch.get_rng_state(), "name": "ect", "steps": [1, 2]}


def _assert_same(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    else:
        assert a == b


def test_checkpoint_round_trip_weights_only(tmp_path: Path) -> None:
    state = _state()
    path = save_checkpoint(tmp_path / "ck" / "ckpt.pt", state)
    _assert_same(load_checkpoint(path), state)
    _assert_same(torch.load(path, weights_only=True), state)  # loadable by plain weights_only too
    assert (tmp_path / "ck" / "ckpt.pt.sha256").is_file()
    assert not list((tmp_path / "ck").glob("*.tmp"))


def test_truncated_checkpoint_raises(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "ckpt.pt", _state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="ckpt.pt"):
        load_checkpoint(path)
    (tmp_path / "ckpt.pt.sha256").unlink()  # without the sidecar the torch.load failure is caught too
    with pytest.raises(CheckpointError, match="ckpt.pt"):
        load_checkpoint(path)


def test_sha_mismatch_raises(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "ckpt.pt", _state())
    (tmp_path / "ckpt.pt.sha256").write_text("0" * 64)
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_load_latest_falls_back(tmp_path: Path) -> None:
    old = save_checkpoint(tmp_path / "ckpt_100.pt", _state(0))
    new = save_checkpoint(tmp_path / "ckpt_200.pt", _state(1))
    new.write_bytes(new.read_bytes()[:100])  # the newest is truncated
    path, state = load_latest([new, tmp_path / "ckpt_300.pt", old])
    assert path == old
    _assert_same(state, _state(0))
    with pytest.raises(CheckpointError):
        load_latest([new])
    with pytest.raises(CheckpointError):
        load_latest([])


def test_overwrite_is_atomic_and_leaves_no_tmp(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "ckpt.pt", _state(0))
    save_checkpoint(path, _state(1))
    _assert_same(load_checkpoint(path), _state(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "ckpt.pt.sha256"]
    # A save that fails mid-write leaves the previous good checkpoint loadable.
    with pytest.raises(Exception):  # noqa: B017
        save_checkpoint(path, {"bad": lambda: 0})
    _assert_same(load_checkpoint(path), _state(1))


def test_failed_save_leaves_no_tmp(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "ckpt.pt", _state(0))
    with pytest.raises(Exception):  # noqa: B017
        save_checkpoint(path, {"bad": lambda: 0})
    assert not list(tmp_path.glob("*.tmp"))
