"""Sanity of the Fréchet classifier distance on real data (issue 3 and issue 10, item 3).

Each property is measured on real images with the shipped feature networks; compared FIDs always
use equal sample counts (FID is biased by N).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from trainer.config import DataConfig
from trainer.data import load_dataset
from trainer.metrics.classifier import ClassifierFeatures, load_classifier
from trainer.metrics.fid import FidEvaluator, compute_stats
from trainer.metrics.frechet import gaussian_stats

NOISE_SIGMAS = (0.05, 0.1, 0.2, 0.4)
_FMNIST_DIR = Path(os.environ.get("SCT_FMNIST_ROOT", "/usr/share/datasets/fashion-mnist"))
_FMNIST_FILES = [f"{p}-{k}-idx{d}-ubyte.gz" for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]


@torch.no_grad()
def _accuracy(dataset: str) -> float:
    net, _ = load_classifier(dataset)
    test = load_dataset(DataConfig(name=dataset), "test")
    preds = torch.cat([net(x).argmax(1) for x in test.images.split(1000)])
    return float((preds == test.labels).float().mean())


def _noisy(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def _uniform(like: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(like.shape, generator=g) * 2 - 1


def _evaluator(dataset: str, reference: torch.Tensor) -> FidEvaluator:
    net, _ = load_classifier(dataset)
    feats = ClassifierFeatures(net)
    return FidEvaluator(feats, compute_stats(feats, reference, torch.device("cpu"), 1000), "cpu", 1000)


# ---------------------------------------------------------------------------------------------
# digits: held-out split (359 images) scored against the train split (1438) as reference.


@pytest.fixture(scope="module")
def digits() -> dict[str, float]:
    train = load_dataset(DataConfig(name="digits"), "train").images
    test = load_dataset(DataConfig(name="digits"), "test").images
    ev = _evaluator("digits", train)
    fids = {"real": ev.score(test), "uniform": ev.score(_uniform(test, 1))}
    for s in NOISE_SIGMAS:
        fids[f"noise{s}"] = ev.score(_noisy(test, s, 0))
    fids["repeat"] = _evaluator("digits", train).score(_noisy(test, 0.1, 0))  # fresh evaluator, same seed
    return fids


@pytest.mark.slow
def test_digits_classifier_held_out_accuracy() -> None:
    assert _accuracy("digits") >= 0.97


@pytest.mark.slow
def test_digits_real_vs_real_is_small(digits: dict[str, float]) -> None:
    # 359 vs 1438 images: the small-N bias (~3) dominates; still far below strong noise and pure noise
    assert 0 <= digits["real"] < 0.25 * digits[f"noise{NOISE_SIGMAS[-1]}"]
    assert digits["real"] < 0.02 * digits["uniform"]


@pytest.mark.slow
def test_digits_fid_grows_with_noise(digits: dict[str, float]) -> None:
    seq = [digits["real"]] + [digits[f"noise{s}"] for s in NOISE_SIGMAS]
    assert all(a < b for a, b in zip(seq, seq[1:], strict=False)), seq


@pytest.mark.slow
def test_digits_pure_noise_is_large(digits: dict[str, float]) -> None:
    assert digits["uniform"] > 5 * digits[f"noise{NOISE_SIGMAS[-1]}"]
    assert digits["uniform"] > max(v for k, v in digits.items() if k != "uniform")


@pytest.mark.slow
def test_same_inputs_same_seed_same_fid(digits: dict[str, float]) -> None:
    assert digits["repeat"] == digits[f"noise{0.1}"]


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST: 5k train images (and variants) scored against the 10k test split (the reference).

needs_fmnist = pytest.mark.skipif(
    not all((_FMNIST_DIR / f).is_file() for f in _FMNIST_FILES),
    reason=f"Fashion-MNIST files not in {_FMNIST_DIR} (run: make install)",
)
N_FMNIST = 5_000  # 10k would double the ~1 min cost; every scored set has this N


@pytest.fixture(scope="module")
def fmnist() -> dict[str, float]:
    cfg = DataConfig(name="fashion_mnist")
    train, test = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    net, _ = load_classifier("fashion_mnist")
    feats = ClassifierFeatures(net)
    with torch.no_grad():  # test-split features once: the reference statistics and the accuracy
        f_test = torch.cat([feats(x) for x in test.images.split(2500)])
        accuracy = float((net.fc2(f_test).argmax(1) == test.labels).float().mean())
    ev = FidEvaluator(feats, gaussian_stats(f_test), "cpu", 2500)
    g = torch.Generator().manual_seed(0)
    real = train.images[torch.randperm(len(train), generator=g)[:N_FMNIST]]
    half = train.images[train.labels < 5]  # half the classes dropped (30k images of 5 classes)
    half = half[torch.randperm(len(half), generator=g)[:N_FMNIST]]
    fids = {"accuracy": accuracy, "real": ev.score(real), "mode_drop": ev.score(half)}
    fids["uniform"] = ev.score(_uniform(real, 1))
    for s in NOISE_SIGMAS:
        fids[f"noise{s}"] = ev.score(_noisy(real, s, 0))
    return fids


@pytest.mark.slow
@pytest.mark.fmnist
@needs_fmnist
def test_fmnist_classifier_test_accuracy(fmnist: dict[str, float]) -> None:
    assert fmnist["accuracy"] >= 0.88


@pytest.mark.slow
@pytest.mark.fmnist
@needs_fmnist
def test_fmnist_sanity_table(fmnist: dict[str, float]) -> None:
    seq = [fmnist["real"]] + [fmnist[f"noise{s}"] for s in NOISE_SIGMAS]
    assert fmnist["real"] < 2.0, fmnist  # train 5k vs test 10k
    assert all(a < b for a, b in zip(seq, seq[1:], strict=False)), fmnist  # monotone in noise
    assert fmnist["mode_drop"] > 20 * fmnist["real"] and fmnist["mode_drop"] > fmnist[f"noise{0.05}"], fmnist
    assert fmnist["uniform"] > max(v for k, v in fmnist.items() if k not in ("uniform", "accuracy")), fmnist
