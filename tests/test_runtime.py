"""Device and precision (issue 12): resolution, validation, bf16 autocast, and the training step on CUDA.

CPU here; `SCT_TEST_DEVICE=cuda` (tests/_device.py) moves the device-generic tests to the GPU, and the
`cuda`-marked tests run only where CUDA is present (bench/gpu_check.sh).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import _device
import pytest
import torch
import yaml
from _device import requires_cuda

import trainer.step
import trainer.train
from trainer.__main__ import main
from trainer.config import LossConfig, NetworkConfig, PrecondConfig, TrainConfig, load_train_config
from trainer.ema import Ema
from trainer.errors import ConfigError, DeviceError
from trainer.loss import consistency_loss
from trainer.networks import build_network
from trainer.precond import ConsistencyModel
from trainer.runtime import autocast, configure_backend, resolve_device
from trainer.target import posterior_weights, sct_x0_offset
from trainer.train import train

REPO = Path(__file__).resolve().parents[1]
NO_CUDA_HERE = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the no-GPU error cannot occur")


@pytest.fixture
def device() -> torch.device:
    """The device of `SCT_TEST_DEVICE` (default cpu), as tests/_device.py's `test_device` fixture gives it."""
    try:
        return _device.device_from_env()
    except (DeviceError, ValueError) as e:
        pytest.fail(f"{_device.ENV}: {str(e).splitlines()[0]}", pytrace=False)


def tiny(tmp_path: Path, device: torch.device | str, **over: Any) -> TrainConfig:
    """A few-step digits run of an 8-channel U-Net: no pretraining, one small evaluation at the end."""
    raw = {
        "method": "sct", "iterations": 4, "device": str(device), "out_dir": str(tmp_path / "run"),
        "network": {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1},
        "pretrain": {"iterations": 0}, "optim": {"batch_size": 32, "lr": 1e-3}, "sct": {"ref_batch": 64},
        "log_every": 2, "checkpoint_every": 100, "sampler": {"steps": [1]},
        "eval": {"every": 100, "fid_samples": 16, "batch_size": 16, "online": False, "save_grid": False,
                 "at_start": False},
        **over,
    }  # fmt: skip
    return TrainConfig.model_validate(raw)


class Collect:
    """A reporter that keeps every metrics row."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def report(self, step: int, metrics: dict[str, float], checkpoint_dir: Path | None = None) -> None:
        self.rows.append(dict(metrics))

    def log_artifact(self, path: Path) -> None:
        pass


@pytest.fixture
def digits_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Private FID cache for a training run on digits (scikit-learn's bundled set)."""
    pytest.importorskip("sklearn", reason="digits data needs scikit-learn")
    monkeypatch.setenv("SCT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


# --- device resolution and validation -----------------------------------------------------------------------
@NO_CUDA_HERE
@pytest.mark.parametrize("device_spec", ["cuda", "cuda:3"])
def test_cuda_without_gpu_is_one_line_device_error(device_spec: str) -> None:
    with pytest.raises(DeviceError) as e:
        resolve_device(device_spec)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"device: {device_spec} ") and "no CUDA GPU" in msg


def test_missing_gpu_index_is_device_error() -> None:
    with pytest.raises(DeviceError, match=r"^device: cuda:99 "):
        resolve_device("cuda:99")


def test_auto_is_cuda_when_present_else_cpu() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@requires_cuda
def test_cuda_device_comes_back_with_its_index() -> None:
    """`cuda` must equal the device tensors report (cuda:0), or the trainer takes a dataset on the GPU
    for one on the host and tries to pin it (seen on an H200 before resolve_device added the index)."""
    on_gpu = torch.zeros(1, device="cuda").device
    assert resolve_device("cuda") == on_gpu and resolve_device("auto") == on_gpu


@pytest.mark.parametrize("spec", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_valid_device_strings_accepted(spec: str) -> None:
    assert TrainConfig(device=spec).device == spec


@pytest.mark.parametrize("spec", ["tpu", "gpu", "CUDA", "cuda:", "cuda:x", "cuda:-1", "cuda:0:1", "cpu:0", "", " cuda"])
def test_invalid_device_strings_rejected_naming_the_field(tmp_path: Path, spec: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"device": spec}))
    with pytest.raises(ConfigError) as e:
        load_train_config(path)
    assert "\n" not in str(e.value) and "device: must be auto, cpu, cuda or cuda:N" in str(e.value)


@pytest.mark.parametrize("precision", ["fp16", "bf32", "float32", ""])
def test_invalid_precision_rejected(tmp_path: Path, precision: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"precision": precision}))
    with pytest.raises(ConfigError, match=r"precision: "):
        load_train_config(path)


@NO_CUDA_HERE
def test_cli_cuda_on_a_machine_without_gpu_exits_2_with_one_line(tmp_path: Path, capsys) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"device": "cuda", "out_dir": str(tmp_path / "run")}))
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: device: cuda requested but no CUDA GPU is available here (use auto or cpu)"]


@NO_CUDA_HERE
@pytest.mark.slow
def test_python_m_trainer_cuda_without_gpu_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"device": "cuda:1", "out_dir": str(tmp_path / "run")}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "trainer", "--config", str(path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: device: cuda:1 requested but no CUDA GPU is available here (use auto or cpu)"]


def test_device_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _device.device_from_env({}) == torch.device("cpu")
    assert _device.device_from_env({_device.ENV: " cpu "}) == torch.device("cpu")
    with pytest.raises(ValueError, match="device"):
        _device.device_from_env({_device.ENV: "tpu"})
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError):
            _device.device_from_env({_device.ENV: "cuda"})


# --- precision ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("precision", "tf32"), [("fp32", False), ("tf32", True), ("bf16", False)])
def test_tf32_only_when_precision_says_so(precision: str, tf32: bool) -> None:
    """`precision: fp32` is true fp32 on CUDA (TF32 off, ECT's default); only `tf32` turns TF32 on. The flags
    are process-wide settings, so this runs without a GPU (and restores them)."""
    assert TrainConfig(precision=precision).precision == precision
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
        configure_backend(torch.device("cuda"), precision)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (tf32, tf32)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_sct_weights_and_loss_stay_fp32_under_bf16_autocast(device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 8, 8, generator=g).to(device) * 2 - 1
    refs = torch.rand(64, 1, 8, 8, generator=g).to(device) * 2 - 1
    eps = torch.randn(16, 1, 8, 8, generator=g).to(device)
    t = torch.full((16,), 0.5, device=device)
    x_t = x + t.reshape(-1, 1, 1, 1) * eps
    valid = torch.ones(16, 64, dtype=torch.bool, device=device)
    expected = posterior_weights(x_t, t, refs, valid)
    with autocast(device, "bf16"):
        assert (x_t.flatten(1) @ refs.flatten(1).T).dtype == torch.bfloat16  # autocast is on here
        w = posterior_weights(x_t, t, refs, valid)
        offset, ess = sct_x0_offset(x, x_t, t, refs, valid)
    assert w.dtype == offset.dtype == ess.dtype == torch.float32
    # Logits ~ ‖x_t − y‖²/(2t²) ≈ 100 here: a bf16 distance matmul would move them by ~1 and w by far more.
    torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-6)

    net = build_network(NetworkConfig(model_channels=8, channel_mult=[1, 2], num_blocks=1), 8, 1, 0)
    model = ConsistencyModel(net, PrecondConfig()).to(device)
    with autocast(device, "bf16"):
        out = consistency_loss(model, x, None, t, 0.9 * t, cfg=LossConfig(), method="sct", refs=refs, valid=valid)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


@pytest.mark.slow
def test_bf16_training_steps_run_under_autocast(digits_run: Path, device: torch.device, monkeypatch) -> None:
    seen: list[tuple[bool, torch.dtype]] = []
    real = trainer.step.consistency_loss

    def loss_spy(*args: Any, **kw: Any):
        seen.append((torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)))
        out = real(*args, **kw)
        assert out.loss.dtype == torch.float32
        return out

    monkeypatch.setattr(trainer.step, "consistency_loss", loss_spy)
    rep = Collect()
    train(tiny(digits_run, device, precision="bf16"), rep)
    losses = [r["loss"] for r in rep.rows if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(v)) for v in losses)
    assert len(seen) == 4 and all(s == (True, torch.bfloat16) for s in seen)
    assert any(k.startswith("ess_t") for r in rep.rows for k in r)


# --- CUDA ---------------------------------------------------------------------------------------------------
class SyncGuardEma(Ema):
    """An Ema whose updates switch CUDA sync errors on after step 0 (which counts FLOPs) and off before the
    update of step `last`: steps 1..last and the EMA updates between them run under
    torch.cuda.set_sync_debug_mode("error"), so any host synchronisation there raises."""

    last = 0

    def update(self, model: torch.nn.Module, iteration: int) -> None:
        if iteration == self.last:
            torch.cuda.set_sync_debug_mode(0)
        super().update(model, iteration)
        if iteration == 0 and self.last > 0:
            torch.cuda.set_sync_debug_mode("error")


def _watch_devices(monkeypatch: pytest.MonkeyPatch, method: str) -> list[tuple[str, torch.device]]:
    """Record where the batch, the dataset, the references and the model are at each training step."""
    seen: list[tuple[str, torch.device]] = []
    real_batch, real_refs = trainer.step.draw_batch, trainer.step.reference_set
    loss_name = "edm_loss" if method == "edm" else "consistency_loss"
    real_loss = getattr(trainer.step, loss_name)

    def batch_spy(data, b, **kw: Any):
        batch = real_batch(data, b, **kw)
        seen.extend([("dataset", data.images.device), ("batch", batch.x.device), ("batch_idx", batch.idx.device)])
        return batch

    def refs_spy(*args: Any, **kw: Any):
        refs, valid, ref_labels = real_refs(*args, **kw)
        seen.extend([("refs", refs.device), ("valid", valid.device)])
        return refs, valid, ref_labels

    def loss_spy(model, x, *args: Any, **kw: Any):
        seen.extend([("model", next(model.parameters()).device), ("x", x.device)])
        out = real_loss(model, x, *args, **kw)
        seen.append(("loss", out.loss.device))
        return out

    monkeypatch.setattr(trainer.step, "draw_batch", batch_spy)
    monkeypatch.setattr(trainer.step, "reference_set", refs_spy)
    monkeypatch.setattr(trainer.step, loss_name, loss_spy)
    return seen


@requires_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method,ref", [("edm", 1), ("ect", 1), ("sct", 16), ("sct", 256), ("ict", 1)])
def test_cuda_steps_stay_on_device_without_host_sync(digits_run: Path, monkeypatch, method, ref, precision) -> None:
    cfg = tiny(digits_run, "cuda", method=method, precision=precision, iterations=5, log_every=5,
               sct={"ref_batch": ref})
    seen = _watch_devices(monkeypatch, method)
    guard = type("Guard", (SyncGuardEma,), {"last": cfg.iterations - 1})
    monkeypatch.setattr(trainer.train, "Ema", guard)
    rep = Collect()
    try:
        train(cfg, rep)  # a host sync in steps 1..4 raises "called a synchronizing CUDA operation"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    losses = [r["loss"] for r in rep.rows if "loss" in r]
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses[0]))
    wheres = {name for name, _ in seen}
    assert {"dataset", "batch", "model", "x", "loss"} <= wheres and ("refs" in wheres) == (method == "sct")
    off = [(name, d) for name, d in seen if d.type != "cuda"]
    assert not off, f"tensors off the GPU in the step: {sorted(set(off), key=str)}"


@requires_cuda
def test_cuda_training_with_dataset_on_host(digits_run: Path, monkeypatch) -> None:
    cfg = tiny(digits_run, "cuda", data={"on_device": False}, iterations=3, log_every=3, sct={"ref_batch": 64})
    seen = _watch_devices(monkeypatch, "sct")
    rep = Collect()
    train(cfg, rep)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rep.rows if "loss" in r)
    assert {d.type for name, d in seen if name == "dataset"} == {"cpu"}
    assert {d.type for name, d in seen if name in ("refs", "model", "loss")} == {"cuda"}


_FAULTS_SCRIPT = """
import resource, sys, torch
from trainer.config import NetworkConfig
from trainer.networks import build_network
from trainer.heap import keep_freed_memory
torch.set_num_threads(1)
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
torch.manual_seed(0)
net = build_network(NetworkConfig(model_channels=16, channel_mult=[1, 2], num_blocks=1), 16, 1, 10)
x, sigma = torch.randn(64, 1, 16, 16), torch.rand(64)
def step():
    net(x, sigma, None).square().mean().backward()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc heap tuning is Linux-only")
def test_cpu_steps_reuse_freed_memory_instead_of_faulting_it_in_again() -> None:
    """After keep_freed_memory a training step's activations come from memory the last step freed."""

    def faults(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True)
        kept, n = out.stdout.split()
        return kept, int(n)

    (kept, with_kept), (_, default) = faults("keep"), faults("default")
    assert kept == "True"
    assert with_kept < default / 4, (with_kept, default)
