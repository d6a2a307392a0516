"""FID-vs-iteration metrics: feature networks, Fréchet distance, FidEvaluator, FLOP counting."""

from trainer.metrics.fid import FidEvaluator, cache_dir, feature_network
from trainer.metrics.flops import count_flops
from trainer.metrics.frechet import GaussianStats, frechet_distance, gaussian_stats

__all__ = [
    "FidEvaluator",
    "GaussianStats",
    "cache_dir",
    "count_flops",
    "feature_network",
    "frechet_distance",
    "gaussian_stats",
]
