"""EDM preconditioning and the consistency function f_θ (docs/algorithms.md §1, §4.3).

    f_θ(x_t, t, c) = c_skip(t)·x_t + c_out(t)·F_θ(c_in(t)·x_t, c_noise(t), c)

The same network is the EDM denoiser D_θ during pretraining (plain c_skip / c_out). In eval mode the
consistency function uses ECT's σ_min-shifted coefficients so that f(x, σ_min) = x exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.config import PrecondConfig


def c_skip(t: torch.Tensor, sigma_data: float, sigma_min: float = 0.0) -> torch.Tensor:
    """σd² / ((t − σ_min)² + σd²)  (EDM Table 1; shifted form: ECT eval)."""
    return sigma_data**2 / ((t - sigma_min) ** 2 + sigma_data**2)


def c_out(t: torch.Tensor, sigma_data: float, sigma_min: float = 0.0) -> torch.Tensor:
    """(t − σ_min)·σd / √(t² + σd²)  (EDM Table 1; shifted form: ECT eval)."""
    return (t - sigma_min) * sigma_data / (t**2 + sigma_data**2).sqrt()


def c_in(t: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """1 / √(t² + σd²)  (EDM Table 1)."""
    return 1.0 / (t**2 + sigma_data**2).sqrt()


def c_noise(t: torch.Tensor) -> torch.Tensor:
    """ln(t) / 4  (EDM Table 1)."""
    return t.log() / 4.0


def _bcast(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Noise level as a tensor of shape [N, 1, 1, 1] matching x (float32)."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t.reshape(-1, *([1] * (x.ndim - 1)))


class ConsistencyModel(nn.Module):
    """Wraps a U-Net F_θ with EDM preconditioning: `.denoise` is D_θ, `forward` is f_θ."""

    def __init__(self, net: nn.Module, cfg: PrecondConfig, phase_edges: torch.Tensor | None = None):
        super().__init__()
        self.net = net
        self.sigma_data = cfg.sigma_data
        self.sigma_min_shift = cfg.sigma_min_shift
        # Phased model (docs/algorithms.md §4.3): segment edges 0 = s_0 < ... < s_M; None = one phase.
        # Derived from the config, not learned: not saved, and ignored when loading (so a one-phase
        # pretrain initialises a phased model and vice versa).
        edges = phase_edges if phase_edges is not None else torch.empty(0)
        self.register_buffer("phase_edges", edges, persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        state_dict.pop(prefix + "phase_edges", None)  # written by older checkpoints
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _raw(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """F_θ(c_in·x, c_noise, c) in float32."""
        out = self.net(c_in(t, self.sigma_data) * x, c_noise(t).flatten(), labels)
        return out.float()

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None = None):
        """EDM denoiser D_θ(x; σ) with the plain coefficients (EDM eq. 7)."""
        sigma = _bcast(sigma, x)
        sd = self.sigma_data
        return c_skip(sigma, sd) * x + c_out(sigma, sd) * self._raw(x, sigma, labels)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        labels: torch.Tensor | None = None,
        shift: bool | float = False,
    ) -> torch.Tensor:
        """Consistency function f_θ(x_t, t, c).

        `shift`: True = ECT eval-mode boundary shift by `precond.sigma_min_shift` (docs/algorithms.md §1); a float =
        shift by that σ_min (iCT puts the boundary at the grid minimum, docs/algorithms.md §6); False = plain EDM.
        """
        t = _bcast(t, x)
        sd = self.sigma_data
        if self.phase_edges.numel() > 0:
            # Phased model: f = (s_j/t)·x_t + (1 − s_j/t)·D_θ(x_t, t), s_j = lower edge (docs/algorithms.md §4.3).
            s_j = self.lower_edge(t)
            return (s_j / t) * x + (1.0 - s_j / t) * self.denoise(x, t, labels)
        s_min = float(shift) if not isinstance(shift, bool) else (self.sigma_min_shift if shift else 0.0)
        return c_skip(t, sd, s_min) * x + c_out(t, sd, s_min) * self._raw(x, t, labels)

    def lower_edge(self, t: torch.Tensor) -> torch.Tensor:
        """Lower phase edge s_j for each t in (s_j, s_{j+1}] (0 for a one-phase model)."""
        if self.phase_edges.numel() == 0:
            return torch.zeros_like(t)
        edges = self.phase_edges.to(t.device)
        idx = torch.searchsorted(edges, t.flatten().contiguous(), right=False) - 1
        return edges[idx.clamp(0, edges.numel() - 2)].reshape(t.shape)
