"""FidEvaluator: Fréchet distance of generated images to a dataset's cached reference statistics.

Feature network per dataset (docs/algorithms.md §7): digits and fashion_mnist use their shipped classifier
(``classifier.py``, a "Fréchet classifier distance", not comparable with Inception-FID);
cifar10, imagenet64 and folder use the FID Inception-v3 from ``eval.inception_weights`` or torch.hub's
cache path (``inception.py``). Reference split: digits the whole set, fashion_mnist the 10k test
split, the others the train split.

Reference statistics are cached in-process and on disk under ``$SCT_CACHE_DIR/fid_refs`` (default
``~/.cache/sct-sweeps``), keyed by the sha256 of the reference images' bytes and of the feature
weights, and written atomically. FID is biased by the generated sample count: compare equal N only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from trainer.config import DataConfig, TrainConfig
from trainer.errors import ConfigError
from trainer.metrics.classifier import NATIVE_SHAPE, ClassifierFeatures, load_classifier
from trainer.metrics.frechet import GaussianStats, StatsAccumulator, frechet_distance
from trainer.metrics.inception import load_inception

log = logging.getLogger(__name__)

REFERENCE_SPLIT = {"digits": "all", "fashion_mnist": "test", "cifar10": "train", "imagenet64": "train"}
_CACHE_VERSION = "fid-ref-v1"  # bump when feature preprocessing changes
_MEMORY: dict[str, GaussianStats] = {}
_CLASSIFIER_BATCH = 2500


def cache_dir() -> Path:
    """Directory of cached reference statistics: `$SCT_CACHE_DIR/fid_refs` (default ~/.cache/sct-sweeps)."""
    root = os.environ.get("SCT_CACHE_DIR") or "~/.cache/sct-sweeps"
    return Path(root).expanduser() / "fid_refs"


def feature_network(data: DataConfig, inception_weights: Path | None = None) -> tuple[nn.Module, str]:
    """The frozen feature network for `data.name` and a fingerprint (sha256) of its weights."""
    if data.name in NATIVE_SHAPE:
        net, digest = load_classifier(data.name)
        return ClassifierFeatures(net).eval().requires_grad_(False), digest
    return load_inception(inception_weights)


@torch.no_grad()
def compute_stats(net: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int) -> GaussianStats:
    """Feature mean and covariance (float64) of images [N, C, H, W] in [-1, 1], in eval mode, no grad."""
    was_training = net.training
    net.eval()
    acc = StatsAccumulator(int(net.num_features))
    for i in range(0, images.shape[0], batch_size):
        acc.update(net(images[i : i + batch_size].to(device, torch.float32)))
    net.train(was_training)
    return acc.stats()


def _content_key(images: torch.Tensor, weights_sha: str) -> str:
    """sha256 of the reference images' bytes (and shape), the feature weights' digest and the version."""
    h = hashlib.sha256(f"{_CACHE_VERSION}|{weights_sha}|{tuple(images.shape)}|{images.dtype}".encode())
    h.update(memoryview(images.detach().cpu().contiguous().numpy()).cast("B"))
    return h.hexdigest()


def _load_cached(path: Path) -> GaussianStats | None:
    if not path.is_file():
        return None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        return GaussianStats(mu=d["mu"], sigma=d["sigma"], n=int(d["n"]))
    except Exception as e:  # a corrupt cache entry is recomputed, never fatal
        log.warning("ignoring unreadable FID reference cache %s (%s)", path, type(e).__name__)
        return None


def _save_cached(path: Path, stats: GaussianStats) -> None:
    """Write atomically (temp file in the same directory, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"mu": stats.mu, "sigma": stats.sigma, "n": stats.n}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def reference_stats(
    net: nn.Module, weights_sha: str, images: torch.Tensor, device: torch.device, batch_size: int
) -> GaussianStats:
    """Statistics of the reference `images`, from the in-process or on-disk cache when present."""
    key = _content_key(images, weights_sha)
    if key in _MEMORY:
        return _MEMORY[key]
    path = cache_dir() / f"{key}.pt"
    stats = _load_cached(path)
    if stats is None:
        t0 = time.perf_counter()
        stats = compute_stats(net, images, device, batch_size)
        try:
            _save_cached(path, stats)
        except OSError as e:
            log.warning("could not cache FID reference statistics in %s (%s)", path.parent, e)
        log.info("FID reference statistics of %d images in %.2f s -> %s", stats.n, time.perf_counter() - t0, path)
    _MEMORY[key] = stats
    return stats


class FidEvaluator:
    """Scores generated images [N, C, H, W] in [-1, 1] against fixed reference statistics."""

    def __init__(
        self, net: nn.Module, reference: GaussianStats, device: torch.device | str = "cpu", batch_size: int = 500
    ) -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).eval().requires_grad_(False)
        self.reference = reference
        self.batch_size = batch_size
        self.last_seconds = 0.0  # wall time of the last `score`

    @classmethod
    def from_config(cls, cfg: TrainConfig, device: torch.device | str = "cpu") -> FidEvaluator:
        """Evaluator for `cfg.data` with the reference split of REFERENCE_SPLIT (default train)."""
        from trainer.data import load_dataset

        device = torch.device(device)
        net, digest = feature_network(cfg.data, cfg.eval.inception_weights)
        split = REFERENCE_SPLIT.get(cfg.data.name, "train")
        ref = load_dataset(cfg.data, split)
        if cfg.data.name not in NATIVE_SHAPE and ref.shape[0] not in (1, 3):
            raise ConfigError(f"data.name: {cfg.data.name} images have {ref.shape[0]} channels; Inception needs 1 or 3")
        net = net.to(device)
        # classifier features are cheap: large batches cut per-call overhead; Inception uses eval.batch_size
        batch = max(cfg.eval.batch_size, _CLASSIFIER_BATCH) if cfg.data.name in NATIVE_SHAPE else cfg.eval.batch_size
        stats = reference_stats(net, digest, ref.images, device, batch)
        log.info("FID reference: %s/%s, %d images, %d-d features", cfg.data.name, split, stats.n, net.num_features)
        return cls(net, stats, device, batch)

    def statistics(self, images: torch.Tensor) -> GaussianStats:
        """Feature statistics of `images` (batched, eval mode, no grad)."""
        return compute_stats(self.net, images, self.device, self.batch_size)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Feature vectors [N, D] (float32, on the evaluator's device) of `images`, batched, no grad."""
        parts = [self.net(images[i: i + self.batch_size].to(self.device, torch.float32))
                 for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, int(self.net.num_features), device=self.device)

    def score_features(self, features: torch.Tensor) -> float:
        """FID of feature vectors [N, D] (e.g. gathered from several ranks) against the reference."""
        acc = StatsAccumulator(int(self.net.num_features))
        for i in range(0, features.shape[0], self.batch_size):
            acc.update(features[i: i + self.batch_size])
        return frechet_distance(acc.stats(), self.reference)

    def score(self, images: torch.Tensor) -> float:
        """FID of `images` against the reference statistics (docs/algorithms.md §7)."""
        t0 = time.perf_counter()
        fid = frechet_distance(self.statistics(images), self.reference)
        self.last_seconds = time.perf_counter() - t0
        log.info("FID %.4f of %d images in %.2f s", fid, images.shape[0], self.last_seconds)
        return fid
