"""trainer.loss against docs/algorithms.md §2 (EDM loss), §3 steps 3-6 (ECT), §4.1/§4.3 (SCT, phases), §6 (iCT)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainer.config import IctConfig, LossConfig, NetworkConfig, PrecondConfig, ScheduleConfig
from trainer.loss import consistency_loss, default_c, distance, edm_loss, replays_dropout, weighting
from trainer.networks import build_network
from trainer.precond import ConsistencyModel
from trainer.schedule import phase_edges, sample_t_r
from trainer.target import reference_set

SD = 0.5


def tiny_model(edges: torch.Tensor | None = None, dropout: float = 0.0, classes: int = 0) -> ConsistencyModel:
    """A real 8x8x1 U-Net with every conv re-initialised so F_θ (and dropout's effect on it) is O(1)."""
    torch.manual_seed(0)
    net = build_network(NetworkConfig(model_channels=16, channel_mult=[1, 2], dropout=dropout), 8, 1, classes)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
    return ConsistencyModel(net, PrecondConfig(sigma_data=SD), edges)


def _batch(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _manual_loss(
    model: ConsistencyModel, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cfg: LossConfig, method: str,
    refs: torch.Tensor | None = None, detach_target: bool = True,
) -> torch.Tensor:
    """docs/algorithms.md §3, §4.1, §4.3 written out independently; call right after seeding the global RNG."""
    eps = torch.randn_like(x)
    t4, r4 = t.reshape(-1, 1, 1, 1), r.reshape(-1, 1, 1, 1)
    x_t = x + t4 * eps
    edges = model.phase_edges.tolist()[:-1] or [0.0]  # lower edges; t > t_max stays in the top phase
    s_j = torch.tensor([max(e for e in edges if e < tv) for tv in t.tolist()]).reshape(-1, 1, 1, 1)
    r4 = torch.maximum(r4, s_j)  # r' = max(r, s_j) (docs/algorithms.md §4.3)
    if refs is None:
        x_r = x + r4 * eps  # ECT (docs/algorithms.md §3 step 3)
    else:  # SCT (docs/algorithms.md §4.1), float64 posterior mean over all refs
        d2 = ((x_t.double().flatten(1)[:, None] - refs.double().flatten(1)[None]) ** 2).sum(-1)
        w = torch.softmax(-d2 / (2 * t.double()[:, None] ** 2), dim=1)
        x0 = (w @ refs.double().flatten(1)).reshape(x.shape)
        x_r = ((r4 / t4) * x_t + (1 - r4 / t4) * x0).float()
    rng = torch.get_rng_state()
    pred = model(x_t, t4, None, shift=0.002 if method == "ict" else False)
    torch.set_rng_state(rng)
    on_edge = r4 <= s_j
    ctx = torch.no_grad() if detach_target else torch.enable_grad()
    with ctx:
        f_r = model(x_r, torch.where(on_edge, torch.ones_like(r4), r4), None, shift=0.002 if method == "ict" else False)
    target = torch.where(on_edge, x_r, f_r)
    c = cfg.c if cfg.c is not None else (0.00054 * 8.0 if method == "ict" else 1e-8)
    L = ((pred - target) ** 2).flatten(1).sum(1)
    dist = (L + c**2).sqrt() - c if cfg.distance == "pseudo_huber" else L
    rf = r4.flatten()
    wgt = 1 / (t - rf) if cfg.weighting == "inv_dt" else 1 / t**2 + 1 / SD**2
    return (dist * wgt).mean()


T = torch.tensor([0.001, 0.02, 0.3, 0.9, 2.0, 7.0, 30.0, 85.0])
R_ECT = torch.tensor([0.0, 0.01, 0.2, 0.8, 1.5, 6.0, 29.0, 60.0])


@pytest.mark.parametrize("distance_kind", ["l2", "pseudo_huber"])
@pytest.mark.parametrize("weight_kind", ["inv_dt", "snrpk"])
def test_ect_loss_equals_manual(distance_kind: str, weight_kind: str) -> None:
    model = tiny_model(dropout=0.2).train()
    x = _batch()
    cfg = LossConfig(distance=distance_kind, weighting=weight_kind, c=0.03 if distance_kind == "pseudo_huber" else None)
    torch.manual_seed(7)
    got = consistency_loss(model, x, None, T, R_ECT, cfg=cfg, method="ect")
    torch.manual_seed(7)
    want = _manual_loss(model, x, T, R_ECT, cfg, "ect")
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-6)
    assert got.ess is None and torch.equal(got.t, T)


def test_sct_loss_equals_manual() -> None:
    model = tiny_model().train()
    x = _batch(8)
    refs = torch.cat([x, _batch(40, seed=2)])
    valid = torch.ones(8, 48, dtype=torch.bool)
    cfg = LossConfig()
    torch.manual_seed(7)
    got = consistency_loss(model, x, None, T, R_ECT, cfg=cfg, method="sct", refs=refs, valid=valid)
    torch.manual_seed(7)
    want = _manual_loss(model, x, T, R_ECT, cfg, "sct", refs)
    torch.testing.assert_close(got.loss, want, rtol=1e-4, atol=1e-6)
    assert got.ess is not None and got.ess.shape == (8,)


def test_ict_loss_uses_shift_and_default_c() -> None:
    """iCT puts the boundary at the grid minimum sigma_min = 0.002 (docs/algorithms.md §6): f(x, 0.002) = x."""
    model = tiny_model().train()
    x = _batch()
    cfg = LossConfig()  # c = None → 0.00054·√64 for iCT
    torch.manual_seed(3)
    got = consistency_loss(model, x, None, T, T * 0.9, cfg=cfg, method="ict")
    torch.manual_seed(3)
    torch.testing.assert_close(got.loss, _manual_loss(model, x, T, T * 0.9, cfg, "ict"), rtol=1e-5, atol=1e-6)


def test_phased_loss_targets_the_lower_edge() -> None:
    edges = phase_edges(4, 0.002, 80.0, 7.0)
    model = tiny_model(edges).train()
    x = _batch()
    r = T * 0.3  # several r fall below their segment's edge → target is the edge point x + s_j·ε
    cfg = LossConfig()
    torch.manual_seed(5)
    got = consistency_loss(model, x, None, T, r, cfg=cfg, method="ect")
    torch.manual_seed(5)
    torch.testing.assert_close(got.loss, _manual_loss(model, x, T, r, cfg, "ect"), rtol=1e-5, atol=1e-6)


def test_sct_n1_loss_equals_ect_exactly() -> None:
    model = tiny_model(dropout=0.2).train()
    x = _batch(8)
    idx = torch.arange(8)
    refs, valid, _ = reference_set(x, idx, torch.cat([x, _batch(20, seed=3)]), n=1)
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        ect = consistency_loss(model, x, None, T, R_ECT, cfg=LossConfig(), method="ect")
        torch.manual_seed(seed)
        sct = consistency_loss(model, x, None, T, R_ECT, cfg=LossConfig(), method="sct", refs=refs, valid=valid)
        assert torch.equal(ect.loss, sct.loss)


@pytest.mark.parametrize("replay", [True, False], ids=["replayed", "redrawn"])
def test_shared_dropout_mask(replay: bool) -> None:
    """With r = t the target point is x_t itself, so a shared dropout mask makes the loss exactly 0,
    whether the target pass replays the recorded masks or redraws them from the restored RNG."""
    model = tiny_model(dropout=0.5).train()
    x = _batch()
    t = torch.full((8,), 1.5)
    cfg = LossConfig(distance="l2", weighting="snrpk")
    torch.manual_seed(0)
    assert consistency_loss(model, x, None, t, t, cfg=cfg, method="ect", replay_dropout=replay).loss.item() == 0.0
    # Control: two passes without restoring the RNG see different masks (so the check above can fail).
    torch.manual_seed(0)
    a, b = model(x, 1.5), model(x, 1.5)
    assert (a - b).abs().max() > 1e-2


def test_replayed_dropout_masks_equal_redrawn_ones() -> None:
    """Reusing the prediction's masks in the target pass is bit-identical to drawing them again from
    the restored RNG: same loss, same gradients, same RNG state afterwards (the next step's draws)."""
    model = tiny_model(dropout=0.3).train()
    x = _batch(8)
    refs, valid = torch.cat([x, _batch(40, seed=2)]), torch.ones(8, 48, dtype=torch.bool)

    def run(replay: bool) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(11)
        out = consistency_loss(model, x, None, T, R_ECT, cfg=LossConfig(), method="sct", refs=refs, valid=valid,
                               replay_dropout=replay)
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in model.parameters()], torch.get_rng_state()

    (l1, g1, s1), (l2, g2, s2) = run(True), run(False)
    assert torch.equal(l1, l2) and torch.equal(s1, s2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))
    assert model.net.tape is None  # the tape lives for one loss call only


def test_loss_deterministic_under_seed() -> None:
    model = tiny_model(dropout=0.2).train()
    x = _batch()
    losses = []
    for seed in (4, 4, 5):
        torch.manual_seed(seed)
        losses.append(consistency_loss(model, x, None, T, R_ECT, cfg=LossConfig(), method="ect").loss)
    assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], losses[2])


def test_stop_gradient_only_through_prediction() -> None:
    model = tiny_model(dropout=0.2).train()
    x = _batch()
    cfg = LossConfig()

    def grads(fn) -> list[torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(9)
        fn().backward()
        return [p.grad.clone() for p in model.parameters()]

    g_lib = grads(lambda: consistency_loss(model, x, None, T, R_ECT, cfg=cfg, method="ect").loss)
    g_sg = grads(lambda: _manual_loss(model, x, T, R_ECT, cfg, "ect"))
    g_both = grads(lambda: _manual_loss(model, x, T, R_ECT, cfg, "ect", detach_target=False))
    for a, b in zip(g_lib, g_sg, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert max((a - b).abs().max().item() for a, b in zip(g_lib, g_both, strict=True)) > 1e-4


class _NanBelow(nn.Module):
    """F = 1 everywhere except NaN where c_noise < ln(thr)/4 (to make the target pass non-finite)."""

    def __init__(self, thr: float) -> None:
        super().__init__()
        self.thr = math.log(thr) / 4
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        bad = (c_noise < self.thr).reshape(-1, 1, 1, 1)
        return torch.where(bad, torch.full_like(x, float("nan")), self.scale * torch.ones_like(x))


def test_non_finite_target_becomes_zero() -> None:
    model = ConsistencyModel(_NanBelow(thr=1.0), PrecondConfig(sigma_data=SD))
    x = _batch(2)
    t, r = torch.tensor([4.0, 4.0]), torch.tensor([3.0, 0.5])  # sample 1's target pass yields NaN
    cfg = LossConfig(distance="l2", weighting="inv_dt")
    torch.manual_seed(0)
    out = consistency_loss(model, x, None, t, r, cfg=cfg, method="ect")
    torch.manual_seed(0)
    eps = torch.randn_like(x)
    t4, r4 = t.reshape(-1, 1, 1, 1), r.reshape(-1, 1, 1, 1)
    pred = model(x + t4 * eps, t4)
    target = model(x + r4 * eps, r4).nan_to_num(0.0)
    want = (((pred - target) ** 2).flatten(1).sum(1) / (t - r)).mean()
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, want)


def test_edm_loss_equals_manual() -> None:
    model = tiny_model().train()
    x = _batch()
    torch.manual_seed(2)
    got = edm_loss(model, x, None, -1.2, 1.2)
    torch.manual_seed(2)
    sigma = (-1.2 + 1.2 * torch.randn(8)).exp().reshape(-1, 1, 1, 1)
    n = torch.randn_like(x)
    lam = (sigma**2 + SD**2) / (sigma * SD) ** 2  # λ(σ) (docs/algorithms.md §2)
    want = (lam * (model.denoise(x + sigma * n, sigma) - x) ** 2).mean()
    torch.testing.assert_close(got.loss, want)
    torch.testing.assert_close(got.t, sigma.flatten())


def test_weighting_formulas() -> None:
    t = torch.tensor([0.01, 0.5, 2.0, 80.0], dtype=torch.float64)
    r = torch.tensor([0.0, 0.25, 1.9, 40.0], dtype=torch.float64)
    want_inv = torch.tensor([1 / 0.01, 1 / 0.25, 1 / 0.1, 1 / 40.0], dtype=torch.float64)
    torch.testing.assert_close(weighting(t, t - r, "inv_dt", SD), want_inv, rtol=1e-9, atol=0)
    want_snr = torch.tensor([1 / tv**2 + 1 / SD**2 for tv in t.tolist()], dtype=torch.float64)
    torch.testing.assert_close(weighting(t, t - r, "snrpk", SD), want_snr, rtol=1e-9, atol=0)


@pytest.mark.parametrize("q", [2.0, 4.0, 256.0])
def test_inv_dt_weight_uses_the_schedules_exact_dt(q: float) -> None:
    """With q = 256 (ECT's one-hour recipe) t − r cancels in fp32 already at stage 2. The loss's 1/Δt
    weight (read off as the ratio of the inv_dt loss to the snrpk loss of one sample) must match float64;
    where Δt/t is below fp32's resolution (r rounds to t, the distance is 0) the loss must stay 0, not 0·∞."""
    model = tiny_model()
    x = _batch(1)
    sched = ScheduleConfig(q=q)
    for s in range(8):
        torch.manual_seed(s)
        t, r, dt = sample_t_r(1, s * 100, total_iters=800, stage_iters=100, method="ect", sched=sched,
                              ict=IctConfig(), sigma_min=0.002, sigma_max=80.0)
        losses = {}
        for kind in ("inv_dt", "snrpk"):
            torch.manual_seed(11)
            cfg = LossConfig(distance="l2", weighting=kind)
            losses[kind] = consistency_loss(model, x, None, t, r, cfg=cfg, method="ect", dt=dt).loss.double()
        assert all(torch.isfinite(v) for v in losses.values())
        if losses["snrpk"] == 0:  # x_r == x_t in fp32
            assert losses["inv_dt"] == 0
            continue
        w_inv = losses["inv_dt"] / losses["snrpk"] * (1 / t.double() ** 2 + 1 / SD**2)
        t64 = t.double()
        want = 1.0 / torch.minimum(t64 * q ** -(s + 1.0) * (1 + 8.0 * torch.sigmoid(-t64)), t64)
        torch.testing.assert_close(w_inv, want, rtol=1e-5, atol=0)


def test_distance_formulas_and_default_c() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    L = ((a - b) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(distance(a, b, "l2", 0.0), L)
    torch.testing.assert_close(distance(a, b, "pseudo_huber", 0.06), (L + 0.06**2).sqrt() - 0.06)
    assert default_c("ict", 64) == pytest.approx(0.00054 * 8.0, rel=1e-12)
    assert default_c("ict", 3 * 32 * 32) == pytest.approx(0.00054 * math.sqrt(3072), rel=1e-12)
    assert 0 < default_c("ect", 64) <= 1e-8 and 0 < default_c("sct", 3072) <= 1e-8


def test_pseudo_huber_gradient_finite_at_zero() -> None:
    target = torch.randn(2, 1, 8, 8)
    pred = target.clone().requires_grad_()
    distance(pred, target, "pseudo_huber", default_c("ect", 64)).sum().backward()
    assert torch.isfinite(pred.grad).all()
    # Control: c = 0 (plain √L) has a non-finite gradient at L = 0 — why the default c > 0.
    pred0 = target.clone().requires_grad_()
    distance(pred0, target, "pseudo_huber", 0.0).sum().backward()
    assert not torch.isfinite(pred0.grad).all()


def test_dropout_masks_are_replayed_on_the_cpu_only() -> None:
    """CPU: replay (drawing masks is 6-9% of a step); CUDA (fused dropout) and compiled graphs: redraw."""
    assert replays_dropout(torch.device("cpu"), compiled=False)
    assert not replays_dropout(torch.device("cpu"), compiled=True)
    assert not replays_dropout(torch.device("cuda", 0), compiled=False)
