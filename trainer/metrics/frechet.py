"""Feature statistics (mean, covariance) and the Fréchet distance between two Gaussians, in float64.

FID = ‖μ_g − μ_r‖² + Tr(Σ_g + Σ_r − 2(Σ_g Σ_r)^½)   (docs/algorithms.md §7)

Tr((Σ_g Σ_r)^½) is computed as Σ_i sqrt(λ_i) with λ_i the eigenvalues of the symmetric PSD matrix
Σ_r^½ Σ_g Σ_r^½ (same spectrum as Σ_g Σ_r), so no complex parts or non-symmetric sqrtm arise.
tests/test_metrics.py checks it against torchmetrics' FrechetInceptionDistance to 1e-6 relative.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class GaussianStats:
    """Mean [D] and unbiased covariance [D, D] (float64) of N feature vectors."""

    mu: torch.Tensor
    sigma: torch.Tensor
    n: int


class StatsAccumulator:
    """Streams feature batches into float64 sums; `stats()` gives mean and covariance (N − 1)."""

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.shift: torch.Tensor | None = None  # first batch's mean: keeps the sums well-conditioned
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: torch.Tensor) -> None:
        """Add features [B, D]."""
        f = features.detach().to("cpu", torch.float64)
        if self.shift is None:
            self.shift = f.mean(0)
        f = f - self.shift
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def stats(self) -> GaussianStats:
        """Mean and unbiased covariance of everything seen."""
        if self.n < 2 or self.shift is None:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.n}")
        m = self.sum / self.n
        sigma = (self.outer - self.n * torch.outer(m, m)) / (self.n - 1)
        return GaussianStats(mu=m + self.shift, sigma=(sigma + sigma.T) / 2, n=self.n)


def gaussian_stats(features: torch.Tensor) -> GaussianStats:
    """Mean and unbiased covariance of features [N, D] in float64."""
    acc = StatsAccumulator(features.shape[1])
    acc.update(features)
    return acc.stats()


def _sqrt_psd(a: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues -> 0)."""
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^½) in float64 (docs/algorithms.md §7)."""
    mu_a, mu_b = a.mu.double(), b.mu.double()
    s_a, s_b = a.sigma.double(), b.sigma.double()
    root_b = _sqrt_psd(s_b)
    m = root_b @ s_a @ root_b
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    fid = (mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * tr_sqrt
    return float(fid)
