"""Exponential moving average of the weights (docs/algorithms.md §3 step 7, §8).

β_i = min(β, (1 + i)/(10 + i)) with warm-up on (sizes the EMA to short runs), else β.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class Ema:
    """An EMA copy of a module; `update(i)` after each optimiser step."""

    def __init__(self, model: nn.Module, beta: float, warmup: bool = True):
        self.beta = beta
        self.warmup = warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay(self, iteration: int) -> float:
        """β_i for optimiser step i (0-based)."""
        return min(self.beta, (1.0 + iteration) / (10.0 + iteration)) if self.warmup else self.beta

    @torch.no_grad()
    def update(self, model: nn.Module, iteration: int) -> None:
        """θ_ema ← β_i·θ_ema + (1 − β_i)·θ, in float32; buffers are copied."""
        beta = self.decay(iteration)
        ema_p = list(self.model.parameters())
        src_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - beta)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def snapshot(self) -> nn.Module:
        """A frozen copy of the current EMA weights (SCT guidance's "bad model", docs/algorithms.md §4.5)."""
        return copy.deepcopy(self.model)
