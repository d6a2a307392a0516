"""trainer.precond against docs/algorithms.md §1 (EDM preconditioning, σ_min shift) and §4.3 (phased model)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainer.config import NetworkConfig, PrecondConfig
from trainer.networks import build_network
from trainer.precond import ConsistencyModel, c_in, c_noise, c_out, c_skip
from trainer.schedule import phase_edges

SD, SMIN = 0.5, 0.003
TS = [0.002, 0.003, 0.01, 0.5, 1.0, 10.0, 80.0]


def tiny_model(edges: torch.Tensor | None = None, dropout: float = 0.0) -> ConsistencyModel:
    """A real 8x8x1 U-Net whose output layer is re-initialised so F_θ is O(1), not ~0."""
    torch.manual_seed(0)
    net = build_network(NetworkConfig(model_channels=16, channel_mult=[1, 2], dropout=dropout), 8, 1, 0)
    nn.init.xavier_uniform_(net.conv_out.weight)
    return ConsistencyModel(net, PrecondConfig(sigma_data=SD, sigma_min_shift=SMIN), edges)


def _x(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("t", TS)
def test_coefficients_match_spec(t: float) -> None:
    tt = torch.tensor([t], dtype=torch.float64)
    # Train (plain EDM) form.
    assert c_skip(tt, SD).item() == pytest.approx(SD**2 / (t**2 + SD**2), rel=1e-12, abs=1e-12)
    assert c_out(tt, SD).item() == pytest.approx(t * SD / math.sqrt(t**2 + SD**2), rel=1e-12, abs=1e-12)
    assert c_in(tt, SD).item() == pytest.approx(1 / math.sqrt(t**2 + SD**2), rel=1e-12)
    assert c_noise(tt).item() == pytest.approx(math.log(t) / 4, rel=1e-12)
    # σ_min-shifted eval form (ECT CIFAR).
    assert c_skip(tt, SD, SMIN).item() == pytest.approx(SD**2 / ((t - SMIN) ** 2 + SD**2), rel=1e-12, abs=1e-12)
    want = (t - SMIN) * SD / math.sqrt(t**2 + SD**2)
    assert c_out(tt, SD, SMIN).item() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_shifted_and_plain_agree_at_t_max() -> None:
    t = torch.tensor([80.0], dtype=torch.float64)
    assert abs(c_skip(t, SD) - c_skip(t, SD, SMIN)).item() < 1e-4
    assert abs(c_out(t, SD) - c_out(t, SD, SMIN)).item() < 1e-4


def test_forward_is_cskip_x_plus_cout_F() -> None:
    model = tiny_model().eval()
    x = _x()
    for t in (0.01, 1.0, 40.0):
        tt = torch.full((x.shape[0], 1, 1, 1), t)
        raw = model.net(c_in(tt, SD) * x, c_noise(tt).flatten(), None)
        for shift, smin in ((False, 0.0), (True, SMIN)):
            want = c_skip(tt, SD, smin) * x + c_out(tt, SD, smin) * raw
            torch.testing.assert_close(model(x, t, shift=shift), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model.denoise(x, t), c_skip(tt, SD) * x + c_out(tt, SD) * raw)


def test_boundary_eval_shift_is_exact() -> None:
    model = tiny_model().eval()
    x = _x()
    torch.testing.assert_close(model(x, SMIN, shift=True), x, rtol=0, atol=1e-6)
    # Without the shift f(x, σ_min) ≠ x: the network contributes c_out·F (so the check above can fail).
    assert (model(x, SMIN, shift=False) - x).abs().max() > 1e-4


def test_boundary_train_mode_limit() -> None:
    model = tiny_model().train()
    x = _x()
    errs = [(model(x, t) - x).abs().max().item() for t in (1e-1, 1e-3, 1e-5, 1e-7)]
    assert errs[0] > 1e-3  # the network does contribute at moderate t
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False))  # f(x, t) → x as t → 0
    assert errs[-1] < 1e-5


def test_per_sample_t() -> None:
    model = tiny_model().eval()
    x = _x()
    t = torch.tensor([0.01, 0.5, 3.0, 80.0])
    out = model(x, t)
    for i in range(4):
        torch.testing.assert_close(out[i : i + 1], model(x[i : i + 1], float(t[i])), rtol=1e-5, atol=1e-5)


def test_phased_lower_edge() -> None:
    edges = phase_edges(4, 0.002, 80.0, 7.0)
    model = tiny_model(edges)
    for j in range(edges.numel() - 1):
        lo, hi = edges[j].item(), edges[j + 1].item()
        ts = torch.tensor([lo * 1.0001 if lo > 0 else 1e-4 * hi, (lo + hi) / 2, hi]).reshape(-1, 1, 1, 1)
        assert (model.lower_edge(ts) == edges[j]).all(), (j, ts.flatten(), model.lower_edge(ts).flatten())
    assert model.lower_edge(torch.tensor([200.0])).item() == edges[-2].item()  # beyond t_max: top phase
    assert (tiny_model().lower_edge(torch.tensor([0.01, 80.0])) == 0).all()  # one phase


def test_phased_forward_formula_and_boundary() -> None:
    edges = phase_edges(4, 0.002, 80.0, 7.0)
    model = tiny_model(edges).eval()
    x = _x()
    for j in range(edges.numel() - 1):
        lo, hi = edges[j].item(), edges[j + 1].item()
        t = (lo + hi) / 2
        want = (lo / t) * x + (1 - lo / t) * model.denoise(x, t)  # docs/algorithms.md §4.3
        torch.testing.assert_close(model(x, t), want, rtol=1e-6, atol=1e-6)
        # f(x, s_j⁺) = x.
        t_plus = lo * (1 + 1e-5) if lo > 0 else 1e-7
        torch.testing.assert_close(model(x, t_plus), x, rtol=0, atol=1e-4)
    # ... and it is not x in the middle of a segment (the check above can fail).
    assert (model(x, 20.0) - x).abs().max() > 1e-2
