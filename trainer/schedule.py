"""Noise levels for training: ECT's lognormal t, mapping r(t) and stage curriculum; iCT's grid.

docs/algorithms.md §3 (ECT), §4.2 (SCT smooth stages), §4.3 (phase edges), §6 (iCT).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from trainer.config import IctConfig, ScheduleConfig


def sample_lognormal(n: int, p_mean: float, p_std: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """t = exp(P_mean + P_std·n), n ~ N(0, 1)  (docs/algorithms.md §2, §3 step 1)."""
    return (p_mean + p_std * torch.randn(n, device=device)).exp()


def stage(iteration: int, stage_iters: int, smooth: bool = False) -> float:
    """ECT stage s = floor(i / stage_iters); SCT [R] smooth: s = i / stage_iters (docs/algorithms.md §3, §4.2)."""
    s = iteration / stage_iters
    return s if smooth else float(math.floor(s))


class NoisePair(NamedTuple):
    """The noise levels of one consistency step: t, r < t, and Δt = t − r computed without cancellation."""

    t: torch.Tensor
    r: torch.Tensor
    dt: torch.Tensor


def ect_dt(t: torch.Tensor, s: float, cfg: ScheduleConfig) -> torch.Tensor:
    """Δt = t − r(t) of ECT's mapping at stage s (docs/algorithms.md §3 step 2; the code's q^(s+1)), at most t (r ≥ 0).

    sigmoid: Δt = t·q^{−(s+1)}·(1 + k·sigmoid(−b·t));  const: Δt = t·q^{−(s+1)}. Computed directly, not as
    t − t·(1 − …): that difference cancels in fp32 once q^{−(s+1)} nears the rounding of 1 (ECT's q = 256).
    """
    decay = cfg.q ** -(s + 1.0)
    if cfg.mapping == "sigmoid":
        dt = t * decay * (1.0 + cfg.k * torch.sigmoid(-cfg.b * t))
    else:
        dt = t * decay
    return torch.minimum(dt, t)


def ect_r(t: torch.Tensor, s: float, cfg: ScheduleConfig) -> torch.Tensor:
    """ECT mapping r(t) = t − Δt at stage s, r ≥ 0: sigmoid r = t·(1 − q^{−(s+1)}·(1 + k·sigmoid(−b·t))),
    const r = t·(1 − q^{−(s+1)})  (docs/algorithms.md §3 step 2)."""
    return t - ect_dt(t, s, cfg)


def karras_sigmas(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """EDM/Karras grid of n levels, increasing: σ_i = (σ_min^{1/ρ} + i/(n−1)·(σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ."""
    if n == 1:
        return torch.full((1,), sigma_max, dtype=torch.float64, device=device)
    i = torch.arange(n, dtype=torch.float64, device=device)  # built where it is used: no host-to-device copy
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + i / (n - 1) * (hi - lo)) ** rho


def phase_edges(phases: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Edges 0 = s_0 < s_1 < ... < s_M = t_max: s_1..s_M are levels 1..M of an (M+1)-level ρ grid
    from σ_min (so the bottom phase is not the degenerate (0, σ_min]) (docs/algorithms.md §4.3 [R])."""
    if phases <= 1:
        return torch.tensor([0.0, sigma_max])
    inner = karras_sigmas(phases + 1, sigma_min, sigma_max, rho)[1:].float()
    return torch.cat([torch.zeros(1), inner])


def ict_num_scales(iteration: int, total_iters: int, cfg: IctConfig) -> int:
    """N(k) = min(s0·2^⌊k/K'⌋, s1) + 1 with K' = ⌊K / (log2⌊s1/s0⌋ + 1)⌋  (iCT, docs/algorithms.md §6)."""
    k_prime = max(1, math.floor(total_iters / (math.log2(math.floor(cfg.s1 / cfg.s0)) + 1)))
    return min(cfg.s0 * 2 ** (iteration // k_prime), cfg.s1) + 1


def ict_sample_pair(
    n: int, num_scales: int, *, p_mean: float, p_std: float, sigma_min: float, sigma_max: float, rho: float,
    device: torch.device | str = "cpu",
) -> NoisePair:
    """Draw (t, r) = (σ_{i+1}, σ_i) with p(i) ∝ erf((ln σ_{i+1} − P_mean)/(√2 P_std)) − erf((ln σ_i − ...));
    Δt = σ_{i+1} − σ_i is taken in float64 before the cast."""
    sig = karras_sigmas(num_scales, sigma_min, sigma_max, rho, device)
    cdf = torch.erf((sig.log() - p_mean) / (math.sqrt(2.0) * p_std))
    probs = (cdf[1:] - cdf[:-1]).clamp_min(0.0)
    i = torch.multinomial(probs / probs.sum(), n, replacement=True)  # on the device: no host sync
    return NoisePair(sig[i + 1].float(), sig[i].float(), (sig[i + 1] - sig[i]).float())


def sample_t_r(
    n: int, iteration: int, *, total_iters: int, stage_iters: int, method: str,
    sched: ScheduleConfig, ict: IctConfig, sigma_min: float, sigma_max: float,
    device: torch.device | str = "cpu",
) -> NoisePair:
    """The (t, r, Δt) of one consistency training step for `method` in {ect, sct, ict}."""
    if method == "ict":
        n_scales = ict_num_scales(iteration, total_iters, ict)
        return ict_sample_pair(n, n_scales, p_mean=sched.p_mean, p_std=sched.p_std, sigma_min=sigma_min,
                               sigma_max=sigma_max, rho=ict.rho, device=device)
    t = sample_lognormal(n, sched.p_mean, sched.p_std, device)
    if sched.clamp_t:
        t = t.clamp(sigma_min, sigma_max)
    dt = ect_dt(t, stage(iteration, stage_iters, sched.smooth), sched)
    return NoisePair(t, t - dt, dt)
