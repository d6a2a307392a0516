"""Will the network fit? Its parameter count, from a build on the meta device, against this machine's memory.

A U-Net asked for by a typo (`model_channels: 1000000`) would allocate for minutes and then die with
an out-of-memory error deep inside a trial. Built on the meta device it costs no memory and a few
milliseconds, and its parameter count gives a floor of what training holds: the weights, their EMA,
the gradients and Adam's two moments, each in fp32.
"""

from __future__ import annotations

import os

import torch

from trainer.config import TrainConfig
from trainer.errors import ConfigError

BYTES_PER_PARAMETER = 5 * 4  # fp32 weights, EMA, gradients, Adam's first and second moments
# (resolution, channels, classes) of each dataset; `folder` assumes RGB and no classes (it is only read later).
_SHAPES = {"digits": (8, 1, 10), "fashion_mnist": (28, 1, 10), "cifar10": (32, 3, 10), "imagenet64": (64, 3, 1000)}


def parameter_count(cfg: TrainConfig) -> int:
    """Parameters of the network `cfg` trains, counted on the meta device (nothing is allocated)."""
    from trainer.networks import build_network

    native, channels, classes = _SHAPES.get(cfg.data.name, (None, 3, 0))
    levels = len(cfg.network.channel_mult)
    resolution = cfg.data.resolution or native or 1 << levels
    with torch.device("meta"):
        net = build_network(cfg.network, resolution, channels, classes if cfg.data.conditional else 0)
    return sum(p.numel() for p in net.parameters())


def memory_bytes() -> int:
    """The memory a run here can use: the largest of host RAM and any CUDA device's memory."""
    sizes = [os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
    if torch.cuda.is_available():
        sizes += [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
    return max(sizes)


def check_fits(cfg: TrainConfig, where: str = "network", memory: int | None = None) -> int:
    """The parameter count of `cfg`'s network; ConfigError in one line when training it cannot fit `memory`."""
    n = parameter_count(cfg)
    need, have = n * BYTES_PER_PARAMETER, memory or memory_bytes()
    if need > have:
        raise ConfigError(
            f"{where}: {n:.2g} parameters ({need / 1e9:.3g} GB for weights, EMA, gradients and Adam's moments "
            f"in fp32) do not fit in the {have / 2**30:.0f} GiB of memory here; use a smaller model_channels, "
            "channel_mult or num_blocks"
        )
    return n
