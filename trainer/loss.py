"""Training losses: EDM denoising (phase one) and consistency tuning (ECT / SCT / iCT).

docs/algorithms.md §2 (EDM), §3 steps 3-6 (ECT), §4.1 and §4.3 (SCT, phases), §6 (iCT).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from trainer.config import LossConfig
from trainer.networks import same_dropout
from trainer.precond import ConsistencyModel
from trainer.target import sct_x0_offset, target_point


@dataclass
class LossOutput:
    """The scalar loss to backpropagate and detached per-sample diagnostics."""

    loss: torch.Tensor
    t: torch.Tensor
    ess: torch.Tensor | None = None


def edm_loss(
    model: ConsistencyModel, x: torch.Tensor, labels: torch.Tensor | None, p_mean: float, p_std: float,
    *, sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None,
) -> LossOutput:
    """λ(σ)·‖D_θ(x + σε; σ) − x‖², ln σ ~ N(P_mean, P_std²), λ = (σ² + σd²)/(σ·σd)²  (EDM eq. 2, 8).

    `sigma` [N] and `noise` (ε, like x) are drawn here unless given (a data-parallel rank passes its rows
    of the global batch's draws)."""
    if sigma is None:
        sigma = (p_mean + p_std * torch.randn(x.shape[0], device=x.device)).exp()
    sigma = sigma.reshape(-1, 1, 1, 1)
    noise = torch.randn_like(x) if noise is None else noise
    sd = model.sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    denoised = model.denoise(x + sigma * noise, sigma, labels)
    return LossOutput(loss=(weight * (denoised - x).square()).mean(), t=sigma.flatten())


def default_c(method: str, dim: int) -> float:
    """Pseudo-Huber c: iCT 0.00054·√d; ECT/SCT ~0 (1e-8 keeps the gradient finite at L = 0)."""
    return 0.00054 * math.sqrt(dim) if method == "ict" else 1e-8


def distance(pred: torch.Tensor, target: torch.Tensor, kind: str, c: float) -> torch.Tensor:
    """Per-sample L = Σ_pixels (pred − target)²; pseudo-Huber √(L + c²) − c (docs/algorithms.md §3 step 5)."""
    sq = (pred - target).square().flatten(1).sum(1)
    return (sq + c**2).sqrt() - c if kind == "pseudo_huber" else sq


def weighting(t: torch.Tensor, dt: torch.Tensor, kind: str, sigma_data: float) -> torch.Tensor:
    """inv_dt: 1/Δt = 1/(t − r) (iCT, ECT CIFAR, SCT); snrpk: 1/t² + 1/σd² (ECT ImageNet).

    docs/algorithms.md §3 step 6. Δt comes from the schedule (`NoisePair.dt`), computed without the
    cancellation of t − r."""
    if kind == "inv_dt":
        return 1.0 / dt
    return 1.0 / t**2 + 1.0 / sigma_data**2


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def replays_dropout(device: torch.device, compiled: bool) -> bool:
    """Whether the target pass reuses the recorded dropout masks: on the CPU, where drawing them costs
    6-9% of a step (docs/benchmarks.md §1). CUDA's fused dropout draws a mask at little cost and keeps
    it in 1 byte per element (the tape would keep 4); a compiled graph cannot hold the Python tape."""
    return device.type == "cpu" and not compiled


@contextmanager
def _one_dropout_mask(model: ConsistencyModel, device: torch.device, replay: bool) -> Iterator[Callable[[], None]]:
    """Two passes, one dropout mask (docs/algorithms.md §3 step 4). Yields what to call between the passes: replay
    the first pass's recorded masks, or (`replay=False`) restore the RNG state so that the second
    pass draws the same masks again."""
    if replay and hasattr(model.net, "tape"):  # a network that reads the tape (all of ours)
        with same_dropout(model.net) as tape:
            yield tape.replay
        return
    rng = _rng_state(device)
    yield lambda: _set_rng_state(rng, device)


def consistency_loss(
    model: ConsistencyModel,
    x: torch.Tensor,
    labels: torch.Tensor | None,
    t: torch.Tensor,
    r: torch.Tensor,
    *,
    cfg: LossConfig,
    method: str,
    refs: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    sigma_min: float = 0.002,
    replay_dropout: bool | None = None,
    dt: torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
) -> LossOutput:
    """ECT/SCT/iCT consistency loss for one minibatch at noise pairs (t, r) (docs/algorithms.md §3, §4.1, §4.3).

    The prediction f_θ(x_t, t) has gradient; the target f_θ(x_r', r') uses the same weights with no
    gradient and the same dropout mask. r' = max(r, s_j) for a phased model; where r' is the lower
    phase edge (r' = 0 for one phase) the target is the point x_r' itself. `refs`/`valid` turn on
    SCT's variance-reduced target. `replay_dropout` (default: `replays_dropout` for `x`'s device, not
    compiled) False draws the target's masks again from the restored RNG state instead of reusing
    the recorded ones: the same masks either way. `dt` = t − r from the schedule (`NoisePair.dt`, exact
    where t − r would cancel); None computes t − r here. `eps` (ε, like x) is drawn here unless given.
    """
    t4, r4 = t.reshape(-1, 1, 1, 1), r.reshape(-1, 1, 1, 1)
    eps = torch.randn_like(x) if eps is None else eps
    x_t = x + t4 * eps
    edge = model.lower_edge(t4)
    dt4 = (t4 - r4) if dt is None else dt.reshape(-1, 1, 1, 1)
    dt4 = torch.where(r4 < edge, t4 - edge, dt4)  # phased: r' = max(r, s_j), Δt' = t − s_j
    r4 = torch.maximum(r4, edge)
    ess = None
    x0_offset = None
    if refs is not None:
        x0_offset, ess = sct_x0_offset(x, x_t, t, refs, valid)
    x_r = target_point(x, eps, t4, r4, x0_offset)

    shift: bool | float = sigma_min if method == "ict" else False  # iCT: boundary at σ_min (docs/algorithms.md §6)
    if replay_dropout is None:
        replay_dropout = replays_dropout(x.device, compiled=False)
    with _one_dropout_mask(model, x.device, replay_dropout) as second_pass:
        pred = model(x_t, t4, labels, shift=shift)
        second_pass()  # same dropout mask for the target pass (docs/algorithms.md §3 step 4)
        with torch.no_grad():
            on_edge = r4 <= edge
            f_r = model(x_r, torch.where(on_edge, torch.ones_like(r4), r4), labels, shift=shift)
    target = torch.where(on_edge, x_r, torch.nan_to_num(f_r, nan=0.0, posinf=0.0, neginf=0.0))

    c = cfg.c if cfg.c is not None else default_c(method, x[0].numel())
    per_sample = distance(pred, target, cfg.distance, c) * weighting(t, dt4.flatten(), cfg.weighting, model.sigma_data)
    return LossOutput(loss=per_sample.mean(), t=t.detach(), ess=ess)
