"""Shared by the benchmarks: one training step built the way trainer/train.py builds it, and its timing.

Scripts in bench/ import this as `common` (they run as `python bench/<script>.py`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from trainer.config import TrainConfig
from trainer.data import ImageDataset
from trainer.loss import consistency_loss, edm_loss
from trainer.precond import ConsistencyModel
from trainer.runtime import autocast
from trainer.schedule import sample_t_r
from trainer.target import reference_set


def make_step(
    method: str,
    ref: int | str,
    cfg: TrainConfig,
    model: ConsistencyModel,
    data: ImageDataset,
    opt: torch.optim.Optimizer,
    batch: int,
    iteration: int = 0,
) -> Callable[[], torch.Tensor]:
    """One optimiser step of `method` (edm | ect | sct | ict) as in train.py's `step`; returns the detached loss.

    `ref` is SCT's reference-set size. Runs on the device of `data.images` under `cfg.precision`
    autocast, with train.py's non-finite-gradient zeroing; the stage is that of `iteration`.
    """
    device = data.images.device
    tuning = method != "edm"

    def step() -> torch.Tensor:
        idx = torch.randperm(len(data), device=device)[:batch]
        x = data.images[idx]
        with autocast(device, cfg.precision):
            if not tuning:
                out = edm_loss(model, x, None, cfg.pretrain.p_mean, cfg.pretrain.p_std)
            else:
                t, r = sample_t_r(batch, iteration, cfg.iterations, cfg.stage_iters, method, cfg.schedule, cfg.ict,
                                  cfg.precond.sigma_min, cfg.precond.sigma_max, device)
                refs = valid = None
                if method == "sct":
                    refs, valid, _ = reference_set(x, idx, data.images, ref)
                out = consistency_loss(model, x, None, t, r, cfg.loss, method, refs, valid, cfg.precond.sigma_min)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        for p in model.parameters():  # non-finite gradients become 0 before the step (ECT), as train.py
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
        opt.step()
        return out.loss.detach()

    return step


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int = 2,
    block_s: float = 0.5,
    blocks: int = 3,
    max_iters: int = 200,
) -> dict[str, float]:
    """Seconds per call of `fn`: one untimed first call, `warmup` calls to size the blocks, then
    `blocks` timed blocks of k calls each (about `block_s` seconds), synchronised at each block's ends.

    Returns the median seconds per call, the spread (max − min) / median over blocks, and the calls timed.
    """
    fn()
    synchronize(device)
    k = 1
    if warmup > 0:
        t0 = time.perf_counter()
        for _ in range(warmup):
            fn()
        synchronize(device)
        est = (time.perf_counter() - t0) / warmup
        k = max(1, min(max_iters, round(block_s / max(est, 1e-6))))
    per_call = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        synchronize(device)
        per_call.append((time.perf_counter() - t0) / k)
    med = statistics.median(per_call)
    return {"s": med, "spread": (max(per_call) - min(per_call)) / med if med > 0 else 0.0, "calls": k * blocks}
