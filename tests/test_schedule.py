"""trainer.schedule against docs/algorithms.md §3 (ECT t, r(t), stages), §4.2 (smooth), §4.3 (edges), §6 (iCT)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.config import IctConfig, ScheduleConfig, TrainConfig
from trainer.schedule import (
    ect_r,
    ict_num_scales,
    ict_sample_pair,
    karras_sigmas,
    phase_edges,
    sample_lognormal,
    sample_t_r,
    stage,
)

T_GRID = torch.tensor([0.002, 0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0, 80.0], dtype=torch.float64)


def _r_spec(t: float, s: float, mapping: str, q: float, k: float, b: float) -> float:
    """docs/algorithms.md §3 step 2, written independently: r = t(1 − q^{−(s+1)}(1 + k·σ(−bt))) or t(1 − q^{−(s+1)})."""
    if mapping == "sigmoid":
        sig = 1.0 / (1.0 + math.exp(b * t))  # sigmoid(−b·t)
        r = t * (1.0 - q ** (-(s + 1)) * (1.0 + k * sig))
    else:
        r = t * (1.0 - q ** (-(s + 1)))
    return max(r, 0.0)


@pytest.mark.parametrize("mapping", ["sigmoid", "const"])
@pytest.mark.parametrize(
    ("q", "k", "b", "s"),
    [(2.0, 8.0, 1.0, 0), (2.0, 8.0, 1.0, 3), (2.0, 8.0, 1.0, 7), (256.0, 8.0, 1.0, 0), (4.0, 2.0, 0.5, 1),
     (2.0, 0.0, 1.0, 2), (1.5, 16.0, 3.0, 0.5)],
)
def test_ect_r_matches_spec(mapping: str, q: float, k: float, b: float, s: float) -> None:
    cfg = ScheduleConfig(mapping=mapping, q=q, k=k, b=b)
    got = ect_r(T_GRID, s, cfg)
    want = torch.tensor([_r_spec(float(t), s, mapping, q, k, b) for t in T_GRID], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert (got >= 0).all() and (got < T_GRID).all()


def test_ect_r_clamps_at_zero_and_float32() -> None:
    # q = 2, s = 0, k = 8: at small t, 1 − 0.5·(1 + 8·0.5) = −1.5 < 0, so r must be clamped to 0.
    cfg = ScheduleConfig(mapping="sigmoid", q=2.0, k=8.0, b=1.0)
    t = torch.tensor([0.002, 0.1, 1.0], dtype=torch.float32)
    r = ect_r(t, 0, cfg)
    assert r.dtype == torch.float32
    assert r[0] == 0 and r[1] == 0
    want = torch.tensor([_r_spec(float(x), 0, "sigmoid", 2.0, 8.0, 1.0) for x in t], dtype=torch.float32)
    torch.testing.assert_close(r, want, rtol=1e-6, atol=1e-6)


def test_stage_advances_at_stage_iters() -> None:
    assert [stage(i, 100) for i in (0, 1, 99, 100, 101, 199, 200, 799, 800)] == [0, 0, 0, 1, 1, 1, 2, 7, 8]
    assert stage(150, 100, smooth=True) == pytest.approx(1.5)
    assert stage(0, 100, smooth=True) == 0.0
    assert TrainConfig(iterations=800).stage_iters == 100  # default: iterations / 8 (docs/algorithms.md §3)
    assert TrainConfig(iterations=800, schedule=ScheduleConfig(double_every=30)).stage_iters == 30


def test_smooth_stage_interpolates_between_stages() -> None:
    cfg = ScheduleConfig(mapping="const", q=2.0)
    t = torch.tensor([1.0, 10.0], dtype=torch.float64)
    r1, r2 = ect_r(t, stage(100, 100), cfg), ect_r(t, stage(200, 100), cfg)
    r_mid_hard = ect_r(t, stage(150, 100), cfg)
    r_mid_smooth = ect_r(t, stage(150, 100, smooth=True), cfg)
    torch.testing.assert_close(r_mid_hard, r1)  # hard stages: flat until the boundary
    assert ((r_mid_smooth > r1) & (r_mid_smooth < r2)).all()
    # Δt/t = q^{−(s+1)} decays geometrically in s: at s = 1.5 it is the geometric mean of s = 1 and s = 2.
    dt1, dt2, dt_mid = (t - r1) / t, (t - r2) / t, (t - r_mid_smooth) / t
    torch.testing.assert_close(dt_mid, (dt1 * dt2).sqrt(), rtol=1e-12, atol=1e-12)
    # At integer stages smooth and hard agree.
    torch.testing.assert_close(ect_r(t, stage(200, 100, smooth=True), cfg), r2)


def test_sample_lognormal_is_the_spec_formula() -> None:
    torch.manual_seed(0)
    t = sample_lognormal(50_000, -1.1, 2.0)
    torch.manual_seed(0)
    torch.testing.assert_close(t, (-1.1 + 2.0 * torch.randn(50_000)).exp())
    assert t.log().mean().item() == pytest.approx(-1.1, abs=0.05)
    assert t.log().std().item() == pytest.approx(2.0, abs=0.05)


def test_sample_t_r_ect_uses_the_stage_of_the_iteration() -> None:
    sched, ict = ScheduleConfig(), IctConfig()
    for it, s in [(0, 0), (99, 0), (100, 1), (350, 3)]:
        torch.manual_seed(1)
        t, r, _ = sample_t_r(64, it, total_iters=800, stage_iters=100, method="ect", sched=sched, ict=ict,
                             sigma_min=0.002, sigma_max=80.0)
        torch.testing.assert_close(r, ect_r(t, s, sched))
    # clamp_t clamps t to [sigma_min, sigma_max]; without it t is not clamped (docs/algorithms.md §3 step 1).
    torch.manual_seed(2)
    t = sample_t_r(4000, 0, total_iters=800, stage_iters=100, method="sct", sched=sched, ict=ict, sigma_min=0.002,
                   sigma_max=80.0).t
    assert t.min() < 0.002 and t.max() > 80.0
    torch.manual_seed(2)
    t = sample_t_r(4000, 0, total_iters=800, stage_iters=100, method="sct", sched=ScheduleConfig(clamp_t=True),
                   ict=ict, sigma_min=0.002, sigma_max=80.0).t
    assert t.min() == pytest.approx(0.002) and t.max() == pytest.approx(80.0)


def test_karras_sigmas_formula() -> None:
    n, lo, hi, rho = 7, 0.002, 80.0, 7.0
    want = [(lo ** (1 / rho) + i / (n - 1) * (hi ** (1 / rho) - lo ** (1 / rho))) ** rho for i in range(n)]
    torch.testing.assert_close(karras_sigmas(n, lo, hi, rho), torch.tensor(want, dtype=torch.float64))
    grid = karras_sigmas(n, lo, hi)
    assert grid[0].item() == pytest.approx(lo) and grid[-1].item() == pytest.approx(hi)


@pytest.mark.parametrize("m", [2, 4, 8])
def test_phase_edges_structure(m: int) -> None:
    e = phase_edges(m, 0.002, 80.0, 7.0).double()
    assert e.numel() == m + 1 and e[0] == 0 and e[-1].item() == pytest.approx(80.0)
    assert (e[1:] > e[:-1]).all()
    root = e[1:] ** (1 / 7)  # EDM ρ spacing of the non-zero edges: equal steps in σ^{1/ρ}
    steps = root[1:] - root[:-1]
    torch.testing.assert_close(steps, steps.mean().expand_as(steps), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(phase_edges(1, 0.002, 80.0), torch.tensor([0.0, 80.0]))


@pytest.mark.parametrize("m", [2, 4, 8])
def test_phase_edges_no_degenerate_bottom_phase(m: int) -> None:
    e = phase_edges(m, 0.002, 80.0, 7.0).double()
    assert e[1] > 10 * 0.002  # every phase must carry training mass and a sampling step of its own
    want = karras_sigmas(m + 1, 0.002, 80.0, 7.0)[1:]
    torch.testing.assert_close(e[1:], want, rtol=1e-6, atol=1e-6)


def _num_scales_spec(k: int, total: int, s0: int, s1: int) -> int:
    """docs/algorithms.md §6: N(k) = min(s0·2^⌊k/K'⌋, s1) + 1, K' = ⌊K/(log2⌊s1/s0⌋ + 1)⌋."""
    k_prime = math.floor(total / (math.log2(math.floor(s1 / s0)) + 1))
    return min(s0 * 2 ** math.floor(k / k_prime), s1) + 1


def test_ict_num_scales_curriculum() -> None:
    cfg = IctConfig()  # s0 = 10, s1 = 1280: K' = ⌊K / 8⌋
    total = 1000
    assert ict_num_scales(0, total, cfg) == cfg.s0 + 1
    assert ict_num_scales(124, total, cfg) == 11 and ict_num_scales(125, total, cfg) == 21
    assert ict_num_scales(250, total, cfg) == 41
    assert ict_num_scales(999, total, cfg) == cfg.s1 + 1
    assert ict_num_scales(10 * total, total, cfg) == cfg.s1 + 1  # capped
    for k in range(0, 1200, 7):
        assert ict_num_scales(k, total, cfg) == _num_scales_spec(k, total, 10, 1280)
    other = IctConfig(s0=5, s1=200)
    for k in range(0, 700, 13):
        assert ict_num_scales(k, 600, other) == _num_scales_spec(k, 600, 5, 200)


def test_ict_pair_adjacent_levels_and_erf_distribution() -> None:
    n_scales, p_mean, p_std = 11, -1.1, 2.0
    sig = karras_sigmas(n_scales, 0.002, 80.0, 7.0).float()
    torch.manual_seed(0)
    n = 200_000
    t, r, _ = ict_sample_pair(n, n_scales, p_mean=p_mean, p_std=p_std, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    assert (t > r).all()
    i_r = torch.searchsorted(sig, r)
    i_t = torch.searchsorted(sig, t)
    torch.testing.assert_close(sig[i_r], r)  # both on the grid ...
    torch.testing.assert_close(sig[i_t], t)
    assert (i_t == i_r + 1).all()  # ... and adjacent
    cdf = [math.erf((math.log(s) - p_mean) / (math.sqrt(2) * p_std)) for s in sig.double().tolist()]
    p = torch.tensor([cdf[i + 1] - cdf[i] for i in range(n_scales - 1)], dtype=torch.float64)
    p = p / p.sum()
    freq = torch.bincount(i_r, minlength=n_scales - 1)[: n_scales - 1].double() / n
    # Binomial sd ≤ √(0.25/n) ≈ 0.0011; allow 5 sd.
    torch.testing.assert_close(freq, p, rtol=0, atol=0.0056)


@pytest.mark.parametrize("n", [1, 9])
def test_karras_sigmas_are_built_on_the_device_asked_for(n: int) -> None:
    """Built where they are used (iCT draws from them every step): no host-to-device copy, which on
    CUDA is a host sync (found on an H200). The meta device shows where a tensor is made on any machine."""
    assert karras_sigmas(n, 0.002, 80.0, 7.0, device="meta").device.type == "meta"
    t, r, _ = ict_sample_pair(4, n + 1, p_mean=-1.1, p_std=2.0, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                              device="meta")
    assert t.device.type == "meta" and r.device.type == "meta"


@pytest.mark.parametrize("mapping", ["sigmoid", "const"])
@pytest.mark.parametrize("q", [2.0, 4.0, 256.0])
def test_dt_matches_float64_at_every_stage(mapping: str, q: float) -> None:
    """Δt = t − r must not cancel in fp32: over all 8 default stages (q = 256: ECT's one-hour recipe) the
    schedule's Δt, and the r it returns, match a float64 computation within 1e-5 relative."""
    sched, ict = ScheduleConfig(mapping=mapping, q=q), IctConfig()
    for s in range(8):
        torch.manual_seed(s)
        t, r, dt = sample_t_r(4096, s * 100, total_iters=800, stage_iters=100, method="ect", sched=sched, ict=ict,
                              sigma_min=0.002, sigma_max=80.0)
        t64 = t.double()
        g = 1.0 + sched.k * torch.sigmoid(-sched.b * t64) if mapping == "sigmoid" else torch.ones_like(t64)
        want = torch.minimum(t64 * q ** -(s + 1.0) * g, t64)
        assert dt.dtype == torch.float32
        torch.testing.assert_close(dt.double(), want, rtol=1e-5, atol=0)
        assert ((r.double() - (t64 - want)).abs() <= 1e-6 * t64).all()  # r to fp32 rounding of t


def test_ict_dt_is_the_grid_step_in_float64() -> None:
    torch.manual_seed(0)
    t, r, dt = ict_sample_pair(4096, 1281, p_mean=-1.1, p_std=2.0, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    sig = karras_sigmas(1281, 0.002, 80.0, 7.0)
    i = (sig[None, :] - r.double()[:, None]).abs().argmin(1)  # index of r on the grid
    torch.testing.assert_close(dt.double(), sig[i + 1] - sig[i], rtol=1e-5, atol=0)
