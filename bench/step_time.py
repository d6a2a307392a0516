"""Trainer step time per method on digits (batch 128) vs. the machine's matmul ceiling.

    python bench/step_time.py [--batch 128] [--repeats 10] [--channels 32] [--profile]

Prints a table: ms/step, achieved GFLOP/s (FLOPs from torch.utils.flop_counter) and its ratio to
a plain fp32 matmul of similar size (the practical ceiling of torch on this machine), and SCT's
overhead over ECT at each reference-set size. All numbers of one table come from one run.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import make_step

from trainer.config import TrainConfig
from trainer.data import load_dataset
from trainer.metrics.flops import count_flops
from trainer.train import build_model


def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
    """fp32 GFLOP/s of an n×n @ n×n matmul: the ceiling torch reaches here."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top ops for the SCT step")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = TrainConfig.model_validate({"network": {"model_channels": args.channels}})
    data = load_dataset(cfg.data)
    model = build_model(cfg, data)
    opt = torch.optim.RAdam(model.parameters(), lr=1e-4)
    ceiling = matmul_gflops()
    print(f"threads {torch.get_num_threads()}, matmul ceiling {ceiling:.1f} GFLOP/s, batch {args.batch}, "
          f"model_channels {args.channels}")
    print(f"{'method':<14}{'ms/step':>10}{'GFLOP/step':>12}{'GFLOP/s':>10}{'of ceiling':>12}{'vs ect':>9}")
    ect_ms = None
    for method, ref in [("edm", 0), ("ect", 1), ("sct", 64), ("sct", 256), ("sct", 512)]:
        step = make_step(method, ref, cfg, model, data, opt, args.batch)
        flops = count_flops(step)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        ms = sorted(times)[len(times) // 2] * 1000
        if method == "ect":
            ect_ms = ms
        rate = flops / (ms / 1000) / 1e9
        rel = f"{ms / ect_ms:.3f}" if ect_ms and method == "sct" else ""
        name = f"{method}" + (f" n={ref}" if method == "sct" else "")
        print(f"{name:<14}{ms:>10.1f}{flops / 1e9:>12.2f}{rate:>10.1f}{rate / ceiling:>12.2f}{rel:>9}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        step = make_step("sct", 512, cfg, model, data, opt, args.batch)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
