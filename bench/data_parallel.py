"""Data-parallel tuning step on this machine: 2 workers × 1 thread against 1 worker × 2 threads (CPU),
or N GPUs against one (`--device cuda --workers N`, NCCL; bench/gpu_check.sh runs it where there are several).

    python bench/data_parallel.py [--method sct] [--batch 128] [--channels 32] [--steps 20] [--rounds 5]
                                  [--device cpu|cuda] [--workers 2]

Both arrangements run the trainer's own step (`trainer.step.train_step`) at the same global batch on
digits: one process with 2 torch threads, and two gloo processes (`trainer.distributed.spawn`) with 1
thread each, each training on half of every global batch and averaging gradients. Timed inside the
processes (after 3 warm-up steps, ranks synchronised at the start and end of the timed block), rounds
alternate the order so that load from other jobs falls on both. Prints the median ms/step of each and
their per-round ratio (2 workers / 1 worker; below 1 = data-parallel is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import conditions, median, paired_ratio, print_conditions, spread, synchronize, table

from trainer.config import TrainConfig
from trainer.distributed import backend_for, current_world, local_device, spawn
from trainer.ema import Ema
from trainer.runtime import resolve_device
from trainer.step import TrainState, make_optimizer, train_step
from trainer.train import _load_data, build_model


def config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig.model_validate({
        "method": args.method, "device": args.device, "iterations": 1000, "seed": 0,
        "network": {"model_channels": args.channels, "channel_mult": [1, 2], "dropout": 0.1},
        "optim": {"batch_size": args.batch}, "sct": {"ref_batch": args.batch * 2},
    })


def timed_steps(cfg_json: str, steps: int, threads: int, out: str) -> None:
    """`steps` timed training steps (after 3 untimed ones) in this process; rank 0 writes ms/step to `out`."""
    torch.set_num_threads(threads)
    cfg = TrainConfig.model_validate_json(cfg_json)
    world = current_world()
    device = local_device(resolve_device(cfg.device), world)
    torch.manual_seed(cfg.seed)
    data = _load_data(cfg, device)
    model = build_model(cfg, data)
    state = TrainState(model, make_optimizer(cfg, model), Ema(model, cfg.ema.beta, cfg.ema.warmup))

    def step(it: int) -> None:
        train_step(cfg, state, data, it, device=device, replay=True, world=world)
        state.ema.update(model, it)

    for it in range(3):
        step(it)
    def barrier() -> None:
        synchronize(device)
        if world.size > 1:
            torch.distributed.barrier()

    barrier()
    t0 = time.perf_counter()
    for it in range(3, 3 + steps):
        step(it)
    barrier()
    if world.is_main:
        Path(out).write_text(json.dumps({"ms": (time.perf_counter() - t0) / steps * 1e3}))


def one(cfg: TrainConfig, args: argparse.Namespace, workers: int) -> float:
    """ms/step of `workers` processes (on the CPU each with cores / workers torch threads; on CUDA one GPU each)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ms.json")
        job = (cfg.model_dump_json(), args.steps, max(1, (os.cpu_count() or 2) // workers), out)
        if workers == 1:
            timed_steps(*job)
        else:
            spawn(timed_steps, job, workers=workers, backend=backend_for(torch.device(args.device)))
        return json.loads(Path(out).read_text())["ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="sct", choices=["edm", "ect", "sct"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--workers", type=int, default=2, help="processes of the data-parallel arrangement")
    args = ap.parse_args()
    n, cores = args.workers, os.cpu_count() or 2
    unit = "GPU" if args.device == "cuda" else "thread"
    per = 1 if args.device == "cuda" else cores
    print_conditions(conditions(threads=f"1 worker × {per} {unit}(s) / {n} workers × {max(1, per // n)}"))
    cfg = config(args)
    ms: dict[int, list[float]] = {1: [], n: []}
    for r in range(args.rounds):
        for workers in ((1, n) if r % 2 == 0 else (n, 1)):
            ms[workers].append(one(cfg, args, workers))
        print(f"round {r}: 1 worker {ms[1][-1]:.1f} ms, {n} workers {ms[n][-1]:.1f} ms", flush=True)
    ratio = paired_ratio(ms[n], ms[1])
    rows = [{"arrangement": f"1 worker × {per} {unit}(s)", "ms/step": spread(ms[1], ".1f")},
            {"arrangement": f"{n} workers × {max(1, per // n)} {unit}(s)", "ms/step": spread(ms[n], ".1f")},
            {"arrangement": f"ratio {n} workers / 1 (per round)",
             "ms/step": f"{ratio[0]:.3f} [{ratio[1]:.3f}–{ratio[2]:.3f}]"}]
    print(f"\n{args.method} on {args.device}, digits 8x8, {args.channels} channels, global batch {args.batch}, "
          f"{args.steps} steps × {args.rounds} rounds (median [min–max])")
    print(table(rows))
    print_conditions(conditions(), "after")
    print(json.dumps({"args": vars(args), "ms_1": ms[1], f"ms_{n}": ms[n], "median_1": median(ms[1]),
                      f"median_{n}": median(ms[n]), "ratio": ratio}))


if __name__ == "__main__":
    sys.exit(main())
