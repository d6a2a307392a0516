"""Where and how tensors run: device resolution and mixed precision (issue 12)."""

from __future__ import annotations

import contextlib

import torch

from trainer.errors import DeviceError
from trainer.heap import keep_freed_memory


def resolve_device(device_spec: str) -> torch.device:
    """`auto` = CUDA when present, else CPU; `cuda`/`cuda:N` must exist (DeviceError otherwise).

    Inside a Ray trial, Ray's GPU assignment sets CUDA_VISIBLE_DEVICES, so `cuda` is that GPU.
    A CUDA device always comes back with its index (`cuda` -> `cuda:0`), as tensors report theirs,
    so `tensor.device == device` holds for a tensor already there.
    """
    if device_spec == "auto":
        device_spec = "cuda" if torch.cuda.is_available() else "cpu"
    if device_spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device: {device_spec} requested but no CUDA GPU is available here (use auto or cpu)")
        dev = torch.device(device_spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device: {device_spec} does not exist ({torch.cuda.device_count()} GPU(s) visible)")
        return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    return torch.device(device_spec)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for network forward passes (CPU or CUDA); a no-op for fp32."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def configure_backend(device: torch.device, precision: str) -> None:
    """CPU: reuse freed tensor memory between steps (trainer/heap.py). CUDA: TF32 matmuls and
    convolutions only for `precision: tf32` — `fp32` is true fp32, as in ECT's code, where TF32 would move
    x̂₀ by ~1e-4 relative and break SCT(n = 1) ≡ ECT for 8-bit data (docs/algorithms.md §3)."""
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
