"""Unit tests of trainer.metrics: Fréchet distance, statistics, FLOPs, feature-net loading, caching."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from trainer.config import TrainConfig
from trainer.errors import CheckpointError
from trainer.metrics import FidEvaluator, count_flops, frechet_distance, gaussian_stats
from trainer.metrics.classifier import WEIGHTS_DIR, load_classifier, sha256_file, weights_path
from trainer.metrics.fid import _MEMORY, cache_dir
from trainer.metrics.frechet import StatsAccumulator
from trainer.metrics.inception import FidInceptionV3, load_inception, resize_bilinear_tf1


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty FID reference cache (disk and process)."""
    monkeypatch.setenv("SCT_CACHE_DIR", str(tmp_path / "cache"))
    saved = dict(_MEMORY)
    _MEMORY.clear()
    yield tmp_path / "cache" / "fid_refs"
    _MEMORY.clear()
    _MEMORY.update(saved)


class _Identity(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.num_features = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _gaussians(seed: int, d: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(600, d, generator=g, dtype=torch.float64) * 2.0 + 1.0
    mix = torch.eye(d, dtype=torch.float64) + 0.4 * torch.randn(d, d, generator=g, dtype=torch.float64)
    b = torch.randn(500, d, generator=g, dtype=torch.float64) @ mix + 0.3
    return a, b


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_distance_equals_torchmetrics(seed: int) -> None:
    real, fake = _gaussians(seed)
    metric = FrechetInceptionDistance(feature=_Identity(real.shape[1]).eval().requires_grad_(False))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    expected = float(metric.compute())
    ours = frechet_distance(gaussian_stats(fake), gaussian_stats(real))
    assert ours == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(gaussian_stats(real), gaussian_stats(fake)) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_identical_stats_is_zero() -> None:
    a, _ = _gaussians(3)
    s = gaussian_stats(a)
    assert abs(frechet_distance(s, s)) < 1e-8 * float(s.sigma.trace())


def test_frechet_distance_of_shifted_mean() -> None:
    """Equal covariances, means apart by v: FID = ‖v‖²."""
    a, _ = _gaussians(4)
    v = torch.linspace(-1, 1, a.shape[1], dtype=torch.float64)
    assert frechet_distance(gaussian_stats(a + v), gaussian_stats(a)) == pytest.approx(float(v @ v), rel=1e-8)


def test_streamed_stats_equal_one_shot() -> None:
    a, _ = _gaussians(5)
    a = a + 1e3  # a large offset is where naive sum-of-squares loses digits
    acc = StatsAccumulator(a.shape[1])
    for chunk in a.split(77):
        acc.update(chunk.float())
    s = acc.stats()
    ref = a.float().double()
    assert torch.allclose(s.mu, ref.mean(0), rtol=1e-12)
    assert torch.allclose(s.sigma, torch.cov(ref.T), rtol=1e-9, atol=1e-9)
    assert s.n == a.shape[0]


def test_count_flops_linear_forward_and_backward() -> None:
    b, n_in, n_out = 8, 32, 16
    lin = torch.nn.Linear(n_in, n_out)
    x = torch.randn(b, n_in)
    assert count_flops(lambda: lin(x)) == 2 * b * n_in * n_out
    # backward: grad wrt the input and wrt the weight, each another 2*B*in*out
    assert count_flops(lambda: lin(x.requires_grad_(True)).sum().backward()) == 3 * 2 * b * n_in * n_out


def test_resize_bilinear_tf1_matches_legacy_formula() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y = resize_bilinear_tf1(x, 8)
    # TF1 (no half-pixel centres): src = dst * in/out, last rows/cols clamp to the edge
    assert torch.equal(y[0, 0, 0], torch.tensor([0, 0.5, 1, 1.5, 2, 2.5, 3, 3]))
    assert torch.equal(y[0, 0, :, 0], torch.tensor([0, 2, 4, 6, 8, 10, 12, 12.0]))
    assert torch.equal(resize_bilinear_tf1(x, 4), x)


def test_inception_layout_matches_the_fid_weights() -> None:
    sd = FidInceptionV3().state_dict()
    assert len(sd) == 566
    n_params = sum(v.numel() for k, v in sd.items() if not k.endswith(("running_mean", "running_var", "tracked")))
    assert n_params == 23_850_960  # 23.85M, as pt_inception-2015-12-05-6726825d.pth


@pytest.mark.slow
def test_inception_loads_a_state_dict_file_and_gives_2048_features(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = FidInceptionV3()
    for k, v in src.state_dict().items():  # random values of the right shapes (weights: default init)
        if k.endswith("running_var"):
            v.uniform_(0.5, 1.5)
        elif k.endswith(("running_mean", "bn.bias")):
            v.normal_(0.0, 0.05)
    path = tmp_path / "inception_random.pth"
    torch.save(src.state_dict(), path)
    net, digest = load_inception(path)
    assert digest == sha256_file(path)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert torch.equal(net.Mixed_7c.branch_pool.conv.weight, src.Mixed_7c.branch_pool.conv.weight)
    with torch.no_grad():
        f = net(torch.rand(2, 3, 32, 32) * 2 - 1)
        g = net(torch.rand(1, 1, 16, 16) * 2 - 1)  # grey images are repeated to RGB
    assert f.shape == (2, 2048) and g.shape == (1, 2048)
    assert torch.isfinite(f).all() and not torch.equal(f[0], f[1])


def test_inception_missing_file_is_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(CheckpointError) as e:
        load_inception(missing)
    msg = str(e.value)
    assert "\n" not in msg and str(missing) in msg and "eval.inception_weights" in msg


def test_inception_official_name_with_wrong_digest_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="6726825d"):
        load_inception(path)


def test_inception_wrong_state_dict_is_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="other.pth"):
        load_inception(path)


def test_cifar10_evaluator_without_weights_names_the_path(tmp_path: Path) -> None:
    cfg = TrainConfig.model_validate(
        {"data": {"name": "cifar10"}, "eval": {"inception_weights": str(tmp_path / "w.pth")}}
    )
    with pytest.raises(CheckpointError, match="w.pth"):
        FidEvaluator.from_config(cfg, "cpu")


@pytest.mark.parametrize("dataset", ["digits", "fashion_mnist"])
def test_shipped_weights_load_with_weights_only(dataset: str) -> None:
    path = weights_path(dataset)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert path.stat().st_size < 2 * 1024 * 1024
    net, digest = load_classifier(dataset)
    assert digest == sha256_file(path)
    assert not net.training and net.num_features == 128


def test_classifier_sha_mismatch_is_checkpoint_error(tmp_path: Path) -> None:
    for f in ("digits_classifier.pt", "digits_classifier.pt.sha256"):
        shutil.copy(WEIGHTS_DIR / f, tmp_path / f)
    (tmp_path / "digits_classifier.pt.sha256").write_text("0" * 64 + "  digits_classifier.pt\n")
    with pytest.raises(CheckpointError, match="digits_classifier.pt"):
        load_classifier("digits", tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_classifier("fashion_mnist", tmp_path)


def test_digits_evaluator_caches_reference_on_disk(tmp_cache: Path) -> None:
    cfg = TrainConfig()
    ev = FidEvaluator.from_config(cfg, "cpu")
    files = list(tmp_cache.glob("*.pt"))
    assert len(files) == 1 and not list(tmp_cache.glob("*.tmp"))
    assert ev.reference.n == 1797  # digits: the whole set (issue 3)
    _MEMORY.clear()
    mtime = files[0].stat().st_mtime_ns
    ev2 = FidEvaluator.from_config(cfg, "cpu")  # from disk, not recomputed
    assert files[0].stat().st_mtime_ns == mtime
    assert torch.equal(ev2.reference.sigma, ev.reference.sigma)
    assert cache_dir() == tmp_cache


def test_digits_at_16px_scores_its_own_reference_near_zero(tmp_cache: Path) -> None:
    from trainer.data import load_dataset

    cfg = TrainConfig.model_validate({"data": {"resolution": 16}})
    ev = FidEvaluator.from_config(cfg, "cpu")
    assert len(list(tmp_cache.glob("*.pt"))) == 1  # a different key from 8x8 would be a second file
    fid = ev.score(load_dataset(cfg.data, "all").images)
    assert abs(fid) < 1e-8 * float(ev.reference.sigma.trace())
    assert ev.last_seconds > 0
