"""trainer.target against docs/algorithms.md §4.1: SCT's variance-reduced target, reference sets, class masking."""

from __future__ import annotations

import functools

import pytest
import torch

from trainer.config import DataConfig
from trainer.data import ImageDataset, load_dataset
from trainer.target import posterior_weights, reference_set, sct_x0_offset, target_point


@functools.lru_cache(maxsize=1)
def digits() -> ImageDataset:
    return load_dataset(DataConfig(name="digits"))


def _indexed_dataset(n: int = 50, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose every pixel is the image's own index (so a reference tells where it came from)."""
    images = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return images, torch.arange(n) % classes


def _ids(refs: torch.Tensor) -> list[int]:
    return refs[:, 0, 0, 0].long().tolist()


def _posterior_mean_spec(x_t: torch.Tensor, t: float, ys: torch.Tensor) -> torch.Tensor:
    """x̂_0 = Σ_j softmax_j(−‖x_t − y_j‖²/(2t²))·y_j in float64, written independently (docs/algorithms.md §4.1)."""
    d2 = ((x_t.double().flatten(1)[:, None, :] - ys.double().flatten(1)[None, :, :]) ** 2).sum(-1)
    w = torch.softmax(-d2 / (2 * t**2), dim=1)
    return (w @ ys.double().flatten(1)).reshape(x_t.shape)


def test_n1_equals_ect_exactly() -> None:
    ds = digits()
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(ds), generator=g)[:32]
    x = ds.images[idx]
    eps = torch.randn(x.shape, generator=g)
    for t_val in (0.002, 0.3, 2.0, 80.0):
        t = torch.full((32,), t_val)
        r = t * 0.6
        t4, r4 = t.reshape(-1, 1, 1, 1), r.reshape(-1, 1, 1, 1)
        refs, valid, _ = reference_set(x, idx, ds.images, n=1)
        offset, ess = sct_x0_offset(x, x + t4 * eps, t, refs, valid)
        sct = target_point(x, eps, t4, r4, offset)
        ect = target_point(x, eps, t4, r4)
        assert torch.equal(sct, ect)
        assert torch.equal(ect, x + r4 * eps)  # ECT's x + r·ε (docs/algorithms.md §3 step 3)
        assert torch.equal(ess, torch.ones(32))


def test_target_point_is_the_spec_formula() -> None:
    ds = digits()
    x = ds.images[:16]
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    t = torch.linspace(0.05, 5.0, 16)
    r = t * 0.5
    t4, r4 = t.reshape(-1, 1, 1, 1), r.reshape(-1, 1, 1, 1)
    x_t = x + t4 * eps
    refs = ds.images[:200]
    valid = torch.ones(16, 200, dtype=torch.bool)
    offset, _ = sct_x0_offset(x, x_t, t, refs, valid)
    x0_hat = torch.cat([_posterior_mean_spec(x_t[i : i + 1], float(t[i]), refs) for i in range(16)])
    torch.testing.assert_close((x + offset).double(), x0_hat, rtol=1e-5, atol=1e-5)
    want = (r4 / t4) * x_t.double() + (1 - r4 / t4) * x0_hat  # x_r = (r/t)·x_t + (1 − r/t)·x̂_0
    torch.testing.assert_close(target_point(x, eps, t4, r4, offset).double(), want, rtol=1e-5, atol=1e-5)


def test_reference_set_n_leq_batch() -> None:
    images, _ = _indexed_dataset()
    idx = torch.tensor([3, 7, 11, 20, 41])
    refs, valid, ref_labels = reference_set(images[idx], idx, images, n=3)
    assert _ids(refs) == idx.tolist() and ref_labels is None
    assert valid.diagonal().all()  # every sample is its own reference
    assert (valid.sum(1) == 3).all()


def test_reference_set_n_gt_batch_draws_extra_refs() -> None:
    images, labels = _indexed_dataset()
    idx = torch.tensor([3, 7, 11, 20, 41])
    torch.manual_seed(0)
    refs, valid, _ = reference_set(images[idx], idx, images, n=17)
    ids = _ids(refs)
    assert refs.shape[0] == 17 and ids[:5] == idx.tolist()
    extra = ids[5:]
    assert len(set(extra)) == 12 and not set(extra) & set(idx.tolist())
    assert valid.all()
    # Different draws give different extras (i.i.d. data, not a fixed block).
    torch.manual_seed(1)
    assert _ids(reference_set(images[idx], idx, images, n=17)[0])[5:] != extra


def test_reference_set_all_uses_whole_dataset() -> None:
    images, labels = _indexed_dataset()
    idx = torch.tensor([3, 7, 11, 20, 41])
    refs, valid, ref_labels = reference_set(images[idx], idx, images, n="all", labels=labels[idx],
                                            dataset_labels=labels)
    assert sorted(_ids(refs)) == list(range(50)) and _ids(refs)[:5] == idx.tolist()
    torch.testing.assert_close(ref_labels, labels[torch.tensor(_ids(refs))])


@pytest.mark.parametrize("n", [4, 30, "all"])
def test_conditional_masking_never_weights_another_class(n: int | str) -> None:
    ds = digits()
    idx = torch.arange(0, 160, 10)
    x, lab = ds.images[idx], ds.labels[idx]
    torch.manual_seed(0)
    refs, valid, ref_labels = reference_set(x, idx, ds.images, n=n, labels=lab, dataset_labels=ds.labels)
    assert torch.equal(valid.diagonal()[: len(idx)], torch.ones(len(idx), dtype=torch.bool))
    for t_val in (0.002, 1.0, 80.0):
        t = torch.full((len(idx),), t_val)
        x_t = x + t_val * torch.randn_like(x)
        w = posterior_weights(x_t, t, refs, valid)
        other = ref_labels[None, :] != lab[:, None]
        assert other.any()
        assert (w[other] == 0).all()
        torch.testing.assert_close(w.sum(1), torch.ones(len(idx)))
        # x̂_0 is a convex combination of same-class references only.
        offset, ess = sct_x0_offset(x, x_t, t, refs, valid)
        assert torch.isfinite(offset).all()
        assert (ess >= 1 - 1e-5).all() and (ess <= valid.sum(1) + 1e-3).all()


@pytest.mark.parametrize("n", [1, 16, 64, 500, "all"])
def test_finite_and_ess_in_range(n: int | str) -> None:
    ds = digits()
    g = torch.Generator().manual_seed(5)
    idx = torch.randperm(len(ds), generator=g)[:64]
    x = ds.images[idx]
    torch.manual_seed(0)
    refs, valid, _ = reference_set(x, idx, ds.images, n=n)
    n_refs = valid.sum(1).float()  # references each sample may weight
    eps = torch.randn(x.shape, generator=g)
    for t_val in (0.002, 0.1, 1.0, 10.0, 80.0):
        t = torch.full((64,), t_val)
        t4 = t.reshape(-1, 1, 1, 1)
        offset, ess = sct_x0_offset(x, x + t4 * eps, t, refs, valid)
        x_r = target_point(x, eps, t4, 0.5 * t4, offset)
        assert torch.isfinite(x_r).all() and torch.isfinite(ess).all()
        assert (ess >= 1 - 1e-5).all() and (ess <= n_refs + 1e-3).all()
        if t_val == 0.002:  # weights collapse onto the sample itself: ECT
            assert (ess < 1.01).all()
            torch.testing.assert_close(offset, torch.zeros_like(offset), rtol=0, atol=1e-5)
        if t_val == 80.0:  # weights near uniform
            assert (ess > 0.9 * n_refs).all() and (n_refs == (len(ds) if n == "all" else n)).all()


def _target_mse(n: int | str, t_val: float, reps: int = 4, batch: int = 128) -> tuple[float, float]:
    """Mean ‖target − E[target | x_t]‖² for ECT and SCT (n refs) at noise level t on digits.

    The regression target of f(x_t, t) is E[x_r | x_t]; for the (empirical) digits distribution its x̂_0
    is the posterior mean over the whole dataset. ECT uses the sample's own clean x (the one-sample
    velocity ε); SCT the reference-set estimate. r = t/2 (the ratio cancels: both are (1 − r/t)·x̂ error).
    """
    ds = digits()
    g = torch.Generator().manual_seed(11)
    ect_err = sct_err = 0.0
    for _ in range(reps):
        idx = torch.randperm(len(ds), generator=g)[:batch]
        x = ds.images[idx]
        eps = torch.randn(x.shape, generator=g)
        t = torch.full((batch,), t_val)
        t4 = t.reshape(-1, 1, 1, 1)
        x_t = x + t4 * eps
        r4 = 0.5 * t4
        everything = torch.ones(batch, len(ds), dtype=torch.bool)
        ideal = target_point(x, eps, t4, r4, sct_x0_offset(x, x_t, t, ds.images, everything)[0])
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        refs, valid, _ = reference_set(x, idx, ds.images, n=n)
        sct = target_point(x, eps, t4, r4, sct_x0_offset(x, x_t, t, refs, valid)[0])
        ect = target_point(x, eps, t4, r4)
        ect_err += (ect - ideal).square().flatten(1).sum(1).mean().item() / reps
        sct_err += (sct - ideal).square().flatten(1).sum(1).mean().item() / reps
    return ect_err, sct_err


def test_sct_target_has_lower_variance_on_digits() -> None:
    """Variance reduction of the target on real data at moderate and large t (docs/algorithms.md §4.1)."""
    factors = {}
    for t_val in (0.5, 1.0, 2.0, 5.0, 20.0, 80.0):
        ect, sct = _target_mse(256, t_val)
        factors[t_val] = ect / sct
    print("SCT (n=256) target variance reduction ECT/SCT by t:", {k: round(v, 1) for k, v in factors.items()})
    for t_val in (1.0, 2.0, 5.0, 20.0, 80.0):
        assert factors[t_val] > 2.0, factors
    assert factors[80.0] > 20.0, factors
    # Larger reference sets reduce it further; "all" is the exact posterior mean (no variance left).
    ect, sct_small = _target_mse(16, 5.0)
    assert ect / sct_small < factors[5.0]
    ect, sct_all = _target_mse("all", 5.0, reps=1)
    assert sct_all < 1e-6 * ect
