"""Samplers: 1-step, 2-step and N-step with edge-skipping η, plus guidance (docs/algorithms.md §4.4, §4.5, §5).

Every sampler is written in terms of the model's x0 estimate at (x, τ): for a one-phase model that
is f_θ(x, τ); for a phased model it is D_θ(x, τ), from which f_θ(x, τ) = x0 + s_j·(x − x0)/τ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainer.config import PrecondConfig, SamplerConfig
from trainer.precond import ConsistencyModel
from trainer.schedule import karras_sigmas

X0Fn = Callable[[torch.Tensor, float, torch.Tensor | None], torch.Tensor]


@dataclass
class Guidance:
    """SCT guidance: f_w = f_bad + w·(f_good − f_bad) (docs/algorithms.md §4.5). w = 1 is no guidance.

    `mode="auto"` guides with `bad`, a weaker EMA snapshot of the same model; `mode="classic"` with
    the same model given the null label `null_label` (label-dropout CFG, optional extension).
    """

    strength: float = 1.0
    mode: str = "auto"
    bad: ConsistencyModel | None = None
    null_label: int = -1  # classic mode: the network's null class index (= num_classes); must be set


def x0_fn(model: ConsistencyModel, guidance: Guidance | None = None, shift: bool | float = True) -> X0Fn:
    """The (guided) x0 estimate used by every sampler, in eval mode with the boundary at σ_min = `shift`
    (True: ECT's eval shift precond.sigma_min_shift; a float: that σ_min; 0 or False: plain EDM)."""

    def single(m: ConsistencyModel, x: torch.Tensor, tau: float, labels: torch.Tensor | None) -> torch.Tensor:
        if m.phase_edges.numel() > 0:
            return m.denoise(x, tau, labels)
        return m(x, tau, labels, shift=shift)

    def f(x: torch.Tensor, tau: float, labels: torch.Tensor | None) -> torch.Tensor:
        good = single(model, x, tau, labels)
        if guidance is None or guidance.strength == 1.0:
            return good
        if guidance.mode == "classic":
            if guidance.null_label < 0:
                raise ValueError("classic guidance needs null_label = the network's num_classes")
            null = torch.full((x.shape[0],), guidance.null_label, dtype=torch.long, device=x.device)
            bad = single(model, x, tau, null)
        else:
            if guidance.bad is None:
                raise ValueError("guidance.mode auto needs an EMA snapshot to guide with")
            bad = single(guidance.bad, x, tau, labels)
        return bad + guidance.strength * (good - bad)

    return f


def time_list(
    steps: int, sampler: SamplerConfig, precond: PrecondConfig, model: ConsistencyModel | None = None
) -> list[float]:
    """Descending sampling times τ_0 = t_max > ... > τ_{N−1} > 0.

    1 step: [t_max]; 2 steps: [t_max, t_mid] (docs/algorithms.md §5); N steps: the model's phase edges when it
    has N phases, else the EDM ρ-spaced grid of N + 1 levels without its lowest (t_min).
    """
    t_max = precond.sigma_max
    if model is not None and model.phase_edges.numel() == steps + 1:
        return model.phase_edges.flip(0)[:-1].tolist()
    if steps == 1:
        return [t_max]
    if steps == 2:
        return [t_max, sampler.t_mid]
    return karras_sigmas(steps + 1, precond.sigma_min, t_max, sampler.rho).flip(0)[:-1].tolist()


@torch.no_grad()
def sample_renoise(
    f: X0Fn, z: torch.Tensor, times: list[float], eta: float, labels: torch.Tensor | None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Stochastic multistep (docs/algorithms.md §4.4 `renoise`): x ← x̂0 + s·ε̂ + √(τ_{i+1}² − s²)·z, s = (1 − η)·τ_{i+1}.

    η = 1 is the standard consistency-model multistep sampler (2 steps: docs/algorithms.md §5).
    """
    x = times[0] * z
    for i, tau in enumerate(times):
        x0 = f(x, tau, labels)
        if i == len(times) - 1:
            return x0
        nxt = times[i + 1]
        eps_hat = (x - x0) / tau
        s = (1.0 - eta) * nxt
        noise = torch.randn(x.shape, generator=generator, device=x.device) if eta > 0 else 0.0
        x = x0 + s * eps_hat + (nxt**2 - s**2) ** 0.5 * noise
    return x


@torch.no_grad()
def sample_ddim_skip(
    f: X0Fn, z: torch.Tensor, times: list[float], eta: float, labels: torch.Tensor | None
) -> torch.Tensor:
    """Deterministic edge-skipping (docs/algorithms.md §4.4 `ddim_skip`): from τ, jump past the edge s_j to
    τ' = s_j − η·(s_j − s_{j−1}) along ε̂ = (x − x̂0)/τ; the last segment jumps to 0. η = 0: edge to edge.
    """
    edges = [*times[1:], 0.0]
    x, tau = times[0] * z, times[0]
    for j, s in enumerate(edges):
        x0 = f(x, tau, labels)
        if s == 0.0:
            return x0
        s_next = edges[j + 1]
        tau_new = s - eta * (s - s_next)
        if tau_new <= 0.0:  # η = 1 on the last segment jumps to 0: x̂_0 is the sample (f at τ = 0 is undefined)
            return x0
        x = x0 + tau_new * (x - x0) / tau
        tau = tau_new
    return x


def sample(
    model: ConsistencyModel,
    n: int,
    steps: int,
    sampler: SamplerConfig,
    precond: PrecondConfig,
    shape: tuple[int, ...],
    *,
    labels: torch.Tensor | None = None,
    guidance: Guidance | None = None,
    generator: torch.Generator | None = None,
    eta: float | None = None,
    mode: str | None = None,
    boundary: float | None = None,
) -> torch.Tensor:
    """Draw n images with a `steps`-step sampler; deterministic under `generator`'s seed.

    `boundary` is the σ_min where f(x, σ_min) = x: the one the model was trained with
    (`TrainConfig.eval_boundary`: iCT's precond.sigma_min); None = ECT's eval shift precond.sigma_min_shift.

    1 and 2 steps use the standard stochastic sampler (η = 1, docs/algorithms.md §5) unless `eta`/`mode` are
    given; N > 2 steps use `sampler.edge_skip_mode` with `sampler.eta`.
    """
    device = next(model.parameters()).device
    z = torch.randn((n, *shape), generator=generator, device=device)
    times = time_list(steps, sampler, precond, model)
    if mode is None:
        mode = sampler.edge_skip_mode if steps > 2 else "renoise"
    if eta is None:
        eta = sampler.eta if steps > 2 else 1.0
    was_training = model.training
    model.eval()
    f = x0_fn(model, guidance, shift=precond.sigma_min_shift if boundary is None else boundary)
    try:
        if mode == "ddim_skip":
            return sample_ddim_skip(f, z, times, eta, labels)
        return sample_renoise(f, z, times, eta, labels, generator)
    finally:
        model.train(was_training)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats to uint8 pixels: x·127.5 + 128, clamped to [0, 255] (docs/algorithms.md §5)."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def sample_edm_heun(
    model: ConsistencyModel, z: torch.Tensor, steps: int, precond: PrecondConfig, rho: float = 7.0,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """EDM's deterministic Heun sampler on D_θ (EDM Algorithm 1): 2·steps − 1 evaluations.

    Used to score a pretrained diffusion model (phase one), not the consistency model.
    """
    sig = karras_sigmas(steps, precond.sigma_min, precond.sigma_max, rho).flip(0).tolist() + [0.0]
    x = z * sig[0]
    for t_cur, t_next in zip(sig[:-1], sig[1:], strict=True):
        d = (x - model.denoise(x, t_cur, labels)) / t_cur
        x_next = x + (t_next - t_cur) * d
        if t_next > 0:  # 2nd-order correction (EDM Algorithm 1, line 8)
            d2 = (x_next - model.denoise(x_next, t_next, labels)) / t_next
            x_next = x + (t_next - t_cur) * 0.5 * (d + d2)
        x = x_next
    return x
