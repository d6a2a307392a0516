"""Data-parallel training over several processes (torch.distributed): which process this is, its shard
of every global batch, gradient averaging, and gathering evaluation features.

The processes are started by Ray Train (a sweep's `resources.workers`) or by `python -m trainer
--workers N` (`spawn` below); the trainer only reads the process group they set up. Every rank draws
the same global randomness (batch indices, noise levels, noise, SCT's references) from the same seed
and keeps its rows, so N workers at global batch B compute exactly the per-sample losses of one worker
at batch B (docs/architecture.md "Data-parallel trials"). With one process every function here is the
identity and nothing is communicated: a one-worker run is exactly a plain run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's rank among `size` data-parallel processes (rank 0 checkpoints and reports)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's rows of a global batch of n (n divisible by the world size)."""
        b = n // self.size
        return slice(self.rank * b, (self.rank + 1) * b)


def current_world() -> World:
    """The world of the initialised process group, else a world of one."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPUs."""
    return "nccl" if device.type == "cuda" else "gloo"


def local_device(device: torch.device, world: World) -> torch.device:
    """A bare `cuda` in a multi-process run means this process's own GPU (LOCAL_RANK, as torchrun sets it)."""
    if device.type != "cuda" or world.size == 1 or "LOCAL_RANK" not in os.environ:
        return device
    return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())


@contextlib.contextmanager
def own_dropout_stream(world: World, seed: int, iteration: int, device: torch.device) -> Iterator[None]:
    """Inside, the global RNG is this rank's own (dropout masks of different ranks differ); outside, every
    rank's global RNG stays in step with the others. A no-op for one process (the RNG stream of a plain run)."""
    if world.size == 1:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((seed * 1_000_003 + iteration) * 4099 + world.rank)
        yield


def average_gradients(params: Iterable[nn.Parameter], world: World) -> None:
    """Gradients ← their mean over the ranks (one flat all-reduce); a missing gradient counts as 0."""
    if world.size == 1:
        return
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset: offset + n].view_as(p).clone()
        offset += n


def all_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    """`t` summed over the ranks, in place (the tensor itself for one process)."""
    if world.size > 1:
        dist.all_reduce(t)
    return t


def broadcast_module(module: nn.Module, world: World) -> None:
    """Every rank takes rank 0's parameters and buffers (identical weights from the first step on)."""
    if world.size == 1:
        return
    for t in module.state_dict().values():
        if torch.is_tensor(t):
            dist.broadcast(t, src=0)


def gather_rows(x: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's rows of `x` [n_r, ...] concatenated in rank order (ranks may hold different n_r)."""
    if world.size == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world.size)]
    dist.all_gather(sizes, n)
    most = int(max(s.item() for s in sizes))
    padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, size: int, port: int, backend: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(size))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        fn(*args)
        # Every rank leaves together: a gloo group torn down while a peer still sends (rank 0 writing
        # its last checkpoint) can abort the process ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], args: tuple, *, workers: int, backend: str) -> None:
    """Run `fn(*args)` in `workers` processes of one process group on this machine (torch's own
    multiprocessing; for a sweep, Ray Train starts the processes instead). Raises if any of them fails."""
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(workers, _free_port(), backend, fn, args), nprocs=workers,
                       start_method="spawn")
