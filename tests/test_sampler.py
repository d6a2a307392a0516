"""trainer.sampler against docs/algorithms.md §4.4 (edge-skipping η), §4.5 (guidance) and §5 (sampling, uint8)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.config import NetworkConfig, PrecondConfig, SamplerConfig
from trainer.networks import build_network
from trainer.precond import ConsistencyModel
from trainer.sampler import Guidance, sample, sample_ddim_skip, sample_renoise, time_list, to_uint8, x0_fn
from trainer.schedule import karras_sigmas, phase_edges

PRE = PrecondConfig()
SAMP = SamplerConfig()
SHAPE = (1, 8, 8)


def tiny_model(edges: torch.Tensor | None = None, classes: int = 0, seed: int = 0) -> ConsistencyModel:
    """A real 8x8x1 U-Net with every conv re-initialised so F_θ (and its labels' effect) is O(1)."""
    torch.manual_seed(seed)
    net = build_network(NetworkConfig(model_channels=16, channel_mult=[1, 2], dropout=0.2), 8, 1, classes)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
    return ConsistencyModel(net, PRE, edges).eval()


def _z(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def test_time_list() -> None:
    assert time_list(1, SAMP, PRE) == [80.0]
    assert time_list(2, SAMP, PRE) == [80.0, 0.821]  # t_mid default (docs/algorithms.md §5, CIFAR-10)
    assert time_list(2, SamplerConfig(t_mid=1.526), PRE) == [80.0, 1.526]
    n, rho, lo, hi = 5, 7.0, 0.002, 80.0
    want = [(hi ** (1 / rho) + i / n * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(n)]
    got = time_list(n, SAMP, PRE)
    assert len(got) == n and got == pytest.approx(want, rel=1e-9)
    assert all(a > b for a, b in zip(got, got[1:], strict=False)) and got[-1] > lo
    edges = phase_edges(4, 0.002, 80.0, 7.0)
    phased = tiny_model(edges)
    assert time_list(4, SAMP, PRE, phased) == pytest.approx(edges.flip(0)[:-1].tolist())
    assert time_list(3, SAMP, PRE, phased) == pytest.approx(time_list(3, SAMP, PRE))


def test_renoise_eta1_is_the_stochastic_cm_sampler() -> None:
    model = tiny_model()
    times = time_list(4, SAMP, PRE)
    with torch.no_grad():
        g = torch.Generator().manual_seed(42)
        z = torch.randn(3, *SHAPE, generator=g)
        got = sample_renoise(x0_fn(model), z, times, 1.0, None, g)
        # By hand: x = f(τ_0·z, τ_0); then x = f(x + τ_i·z_i, τ_i) (Song et al. 2023, Alg. 1; docs/algorithms.md §5).
        g = torch.Generator().manual_seed(42)
        z = torch.randn(3, *SHAPE, generator=g)
        x = model(times[0] * z, times[0], shift=True)
        for tau in times[1:]:
            x = model(x + tau * torch.randn(x.shape, generator=g), tau, shift=True)
    torch.testing.assert_close(got, x, rtol=1e-6, atol=1e-6)


def test_sample_two_step_is_the_spec_sampler() -> None:
    model = tiny_model()
    model.train()  # sample() must switch to eval (no dropout) and restore the mode
    got = sample(model, 3, 2, SAMP, PRE, SHAPE, generator=torch.Generator().manual_seed(1))
    assert model.training
    model.eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        z = torch.randn(3, *SHAPE, generator=g)
        x_hat = model(80.0 * z, 80.0, shift=True)  # x̂ = f(80z, 80)
        want = model(x_hat + 0.821 * torch.randn(3, *SHAPE, generator=g), 0.821, shift=True)
        one = model(80.0 * _z(3, 1), 80.0, shift=True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    one_got = sample(model, 3, 1, SAMP, PRE, SHAPE, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(one_got, one, rtol=1e-6, atol=1e-6)


def test_renoise_eta0_lands_on_edges_deterministically() -> None:
    model = tiny_model()
    f = x0_fn(model)
    times = time_list(4, SAMP, PRE)
    z = _z()
    a = sample_renoise(f, z, times, 0.0, None, torch.Generator().manual_seed(0))
    b = sample_renoise(f, z, times, 0.0, None, torch.Generator().manual_seed(99))
    assert torch.equal(a, b)


def _recording(f):
    calls: list[float] = []

    def g(x: torch.Tensor, tau: float, labels: torch.Tensor | None) -> torch.Tensor:
        calls.append(float(tau))
        return f(x, tau, labels)

    return g, calls


def test_ddim_skip_eta0_edge_to_edge_and_deterministic() -> None:
    model = tiny_model()
    times = time_list(4, SAMP, PRE)
    f, calls = _recording(x0_fn(model))
    z = _z()
    out = sample_ddim_skip(f, z, times, 0.0, None)
    assert calls == pytest.approx(times)  # evaluated exactly at the edges
    assert torch.equal(out, sample_ddim_skip(x0_fn(model), z, times, 0.0, None))
    # By hand (one-phase model: x̂ is the x0 prediction): x ← x̂ + τ_{i+1}·(x − x̂)/τ_i; last step → x̂.
    with torch.no_grad():
        x = times[0] * z
        for i, tau in enumerate(times):
            x0 = model(x, tau, shift=True)
            x = x0 if i == len(times) - 1 else x0 + times[i + 1] * (x - x0) / tau
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


def test_ddim_skip_eta_skips_past_edges() -> None:
    model = tiny_model()
    times = time_list(4, SAMP, PRE)
    eta = 0.3
    f, calls = _recording(x0_fn(model))
    sample_ddim_skip(f, _z(), times, eta, None)
    edges = [*times[1:], 0.0]
    want = [times[0]] + [edges[j] - eta * (edges[j] - edges[j + 1]) for j in range(len(edges) - 1)]
    assert calls == pytest.approx(want)  # τ' = s_j − η·(s_j − s_{j−1}) (docs/algorithms.md §4.4)


def test_ddim_skip_eta1_ends_at_the_x0_of_the_jump_to_zero() -> None:
    """η = 1 (the config's default) jumps from each edge to the one below the next; the jump that lands on 0
    ends the sampler with that x̂_0 — before, the model was called at τ = 0 and every image was NaN."""
    model = tiny_model()
    times = time_list(4, SAMP, PRE)
    f, calls = _recording(x0_fn(model))
    x = sample_ddim_skip(f, _z(), times, 1.0, None)
    edges = [*times[1:], 0.0]
    assert calls == pytest.approx([times[0], *edges[1:-1]]) and min(calls) > 0
    assert torch.isfinite(x).all()


def test_ddim_skip_eta0_phased_model_is_edge_to_edge_consistency() -> None:
    """For a phased model, η = 0 applies f_θ (which lands on the lower edge) segment by segment."""
    edges = phase_edges(4, 0.002, 80.0, 7.0)
    model = tiny_model(edges)
    z = _z()
    got = sample(model, 3, 4, SamplerConfig(edge_skip_mode="ddim_skip", eta=0.0), PRE, SHAPE,
                 generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = 80.0 * z
        for tau in edges.flip(0)[:-1].tolist():
            x = model(x, tau)  # f(x, τ) = the point at the segment's lower edge; the last segment's is 0
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("steps", "sampler"),
    [(1, SAMP), (2, SAMP), (4, SAMP), (4, SamplerConfig(edge_skip_mode="ddim_skip", eta=0.2))],
)
def test_sample_deterministic_under_seed(steps: int, sampler: SamplerConfig) -> None:
    model = tiny_model()

    def draw(seed: int) -> torch.Tensor:
        return sample(model, 4, steps, sampler, PRE, SHAPE, generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(3), draw(3), draw(4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (4, *SHAPE) and torch.isfinite(a).all()


def test_guidance_w1_equals_good_model() -> None:
    good, bad = tiny_model(seed=0), tiny_model(seed=1)
    x, labels = 5.0 * _z(), None
    want = x0_fn(good)(x, 5.0, labels)
    assert torch.equal(x0_fn(good, Guidance(1.0, "auto", bad))(x, 5.0, labels), want)

    def gen(g: Guidance | None) -> torch.Tensor:
        return sample(good, 3, 2, SAMP, PRE, SHAPE, guidance=g, generator=torch.Generator().manual_seed(0))

    assert torch.equal(gen(Guidance(1.0, "auto", bad)), gen(None))


@pytest.mark.parametrize("w", [0.0, 1.5, 2.0])
def test_autoguidance_is_the_linear_mix(w: float) -> None:
    good, bad = tiny_model(seed=0), tiny_model(seed=1)
    x = 5.0 * _z()
    with torch.no_grad():
        f_good, f_bad = good(x, 5.0, shift=True), bad(x, 5.0, shift=True)
        got = x0_fn(good, Guidance(w, "auto", bad))(x, 5.0, None)
    torch.testing.assert_close(got, f_bad + w * (f_good - f_bad), rtol=1e-6, atol=1e-6)  # docs/algorithms.md §4.5
    assert (f_good - f_bad).abs().max() > 1e-3  # the mix is not trivially the good model


@pytest.mark.parametrize("w", [1.25, 2.0])
def test_classic_guidance_is_the_linear_mix_with_null_label(w: float) -> None:
    model = tiny_model(classes=10)
    x = 5.0 * _z()
    labels = torch.tensor([1, 4, 7])
    null = torch.full((3,), 10)  # the network's null label is index num_classes
    with torch.no_grad():
        cond, uncond = model(x, 5.0, labels, shift=True), model(x, 5.0, null, shift=True)
        got = x0_fn(model, Guidance(w, "classic", None, null_label=10))(x, 5.0, labels)
    torch.testing.assert_close(got, uncond + w * (cond - uncond), rtol=1e-6, atol=1e-6)
    assert (cond - uncond).abs().max() > 1e-3


def test_guidance_on_phased_model_mixes_x0() -> None:
    edges = phase_edges(4, 0.002, 80.0, 7.0)
    good, bad = tiny_model(edges, seed=0), tiny_model(edges, seed=1)
    x = 5.0 * _z()
    with torch.no_grad():
        want = bad.denoise(x, 5.0) + 1.5 * (good.denoise(x, 5.0) - bad.denoise(x, 5.0))
        got = x0_fn(good, Guidance(1.5, "auto", bad))(x, 5.0, None)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_to_uint8() -> None:
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0])
    got = to_uint8(x)
    assert got.dtype == torch.uint8
    want = (x * 127.5 + 128).clamp(0, 255).floor().to(torch.uint8)  # x·127.5 + 128, clamp [0, 255]
    assert got.tolist() == want.tolist() == [0, 0, 64, 128, 191, 255, 255]


def test_karras_time_list_matches_schedule_grid() -> None:
    got = time_list(8, SAMP, PRE)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), karras_sigmas(9, 0.002, 80.0).flip(0)[:-1])


def test_ict_is_sampled_with_the_boundary_it_was_trained_with() -> None:
    """iCT trains with f(x, σ_min = 0.002) = x (docs/algorithms.md §6); its samples must use that boundary,
    not ECT's eval shift 0.003 — which at a small t_mid moves the 2-step sample by far more than rounding."""
    from trainer.config import TrainConfig
    from trainer.data import load_dataset
    from trainer.evaluate import generate
    from trainer.train import build_model

    cfg = TrainConfig(method="ict", sampler={"t_mid": 0.005}, network={"model_channels": 8, "dropout": 0.0})
    assert cfg.eval_boundary == cfg.precond.sigma_min == 0.002
    assert TrainConfig(method="sct").eval_boundary == cfg.precond.sigma_min_shift == 0.003
    data = load_dataset(cfg.data, "train")
    torch.manual_seed(0)
    model = build_model(cfg, data).eval()
    for m in model.net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
    got = generate(model, cfg, data, 4, 2, seed=3)

    def direct(boundary: float) -> torch.Tensor:
        gen = torch.Generator().manual_seed(3)
        return sample(model, 4, 2, cfg.sampler, cfg.precond, data.shape, generator=gen, boundary=boundary)

    torch.testing.assert_close(got, direct(0.002), rtol=0, atol=1e-6)
    assert (got - direct(0.003)).abs().max() > 1e-3  # 1000x the tolerance above
    x = _z()
    torch.testing.assert_close(x0_fn(model, shift=cfg.eval_boundary)(x, 0.002, None), x, rtol=0, atol=1e-7)
