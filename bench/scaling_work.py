"""Scaling with the work: ECT step time vs batch size and network width (log-log), 1 vs all cores,
sweep wall time vs number of trials, and the FLOPs per step of larger networks (for the GPU estimate).

    python bench/scaling_work.py [--part steps sweeps flops | all] [--rounds 5] [--block-s 0.3]
                                 [--batches 16 32 64 128 256 512] [--widths 8 16 32 64]
                                 [--trials 2 4 8] [--iterations 100] [--png PATH]

steps: every (batch, width, threads) cell is one fn of one interleaved timing (common.interleaved),
so all cells share the machine's load. 1-thread cells are reported in CPU time of the calling thread
(load-blind: time spent descheduled by other jobs does not count); the slope of log(ms/step) vs
log(batch) or log(width) is fitted by least squares over them. The all-cores cells (wall time) and
the `2-core speed-up` (paired per-round wall ratio 1 thread / all threads) are measured only when a
quick probe finds all-thread steps no slower than 1.5x a 1-thread step: when other jobs hold the
cores, every parallel region waits for a descheduled thread and the all-core figures measure the
contention, not the code.
sweeps: sweep_overhead's fixed-work sweep at each trial count (real runner, private project).
flops: torch.utils.flop_counter FLOPs of one ECT step (2 forwards + 1 backward) at batch 128.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from common import (
    OVERSUBSCRIBED,
    conditions,
    interleaved,
    load_average,
    make_step,
    median,
    oversubscribed,
    paired_ratio,
    print_conditions,
    table,
)
from step_time import optimizer

from trainer.config import TrainConfig
from trainer.data import load_dataset
from trainer.metrics.flops import count_flops
from trainer.networks import build_network, count_parameters, forward_flops
from trainer.train import build_model

NETS = {  # name: (NetworkConfig fields, resolution, channels) for the FLOP table
    "digits (TrainConfig default)": ({"model_channels": 32}, 8, 1),
    "digits (experiments/*.yaml)": ({"model_channels": 16, "num_blocks": 1}, 8, 1),
    "Fashion-MNIST (fmnist_pretrain.yaml)": ({"model_channels": 20, "channel_mult": [1, 2, 4], "num_blocks": 2}, 32, 1),
    "CIFAR-10 DDPM++ (cifar10_*.yaml)": (
        {"model_channels": 128, "channel_mult": [2, 2, 2], "num_blocks": 4, "attn_resolutions": [16]}, 32, 3),
}


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) on log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def with_threads(fn: Callable[[], object], n: int) -> Callable[[], object]:
    """`fn` run at `n` torch threads."""

    def run() -> object:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return fn()

    return run


class CpuMeter:
    """Wraps a fn and keeps this thread's CPU seconds of every call (load-blind at 1 torch thread)."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.fn, self.calls = fn, []

    def __call__(self) -> object:
        t0 = time.thread_time()
        out = self.fn()
        self.calls.append(time.thread_time() - t0)
        return out

    def per_round(self, rounds: int) -> list[float]:
        """Mean CPU seconds per call in each round of `common.interleaved` (after its 2 untimed calls)."""
        xs = self.calls[2:]
        k = len(xs) // rounds
        return [sum(xs[i * k : (i + 1) * k]) / k for i in range(rounds)]


def steps_part(batches: list[int], widths: list[int], rounds: int, block_s: float, cores: int,
               png: str | None) -> None:
    """ECT step time over batch sizes (width 32) and widths (batch 128), at 1 and `cores` threads."""
    torch.manual_seed(0)
    steps: dict[tuple[int, int], tuple[Callable[[], object], float]] = {}
    plan = [(b, 32) for b in batches] + [(128, w) for w in widths if (128, w) not in [(b, 32) for b in batches]]
    models: dict[int, Any] = {}
    for b, w in plan:
        cfg = TrainConfig.model_validate({"method": "ect", "network": {"model_channels": w}})
        if w not in models:
            data = load_dataset(cfg.data)
            model = build_model(cfg, data)
            models[w] = (cfg, data, model, optimizer(cfg, model))
        cfg, data, model, opt = models[w]
        step = make_step("ect", 1, cfg, model, data, opt, b)
        steps[(b, w)] = (step, float(count_flops(step)))
    threads = [1]
    if cores > 1:
        probe = steps[(128, 32)][0] if (128, 32) in steps else next(iter(steps.values()))[0]
        over = oversubscribed(probe, cores)
        if over > OVERSUBSCRIBED:
            print(f"\n# {cores} threads are {over:.1f}x SLOWER than 1 thread right now (other jobs hold the cores): "
                  f"{cores}-thread cells skipped")
        else:
            threads.append(cores)
    meters = {k: CpuMeter(with_threads(fn, 1)) for k, (fn, _) in steps.items()}
    fns: dict[str, Callable[[], object]] = {}
    for (b, w), (fn, _) in steps.items():
        fns[f"b{b} w{w} t1"] = meters[(b, w)]
        if cores in threads[1:]:
            fns[f"b{b} w{w} t{cores}"] = with_threads(fn, cores)
    t = interleaved(fns, rounds, block_s)
    torch.set_num_threads(cores)

    def row(b: int, w: int) -> dict[str, str]:
        flops = steps[(b, w)][1]
        cpu = median(meters[(b, w)].per_round(rounds))
        r = {"batch": str(b), "width": str(w), "GFLOP/step": f"{flops / 1e9:.2f}",
             "ms/step 1 thr (CPU)": f"{cpu * 1e3:.1f}", "GFLOP/s 1 thr": f"{flops / cpu / 1e9:.1f}",
             "img/s 1 thr": f"{b / cpu:.0f}"}
        if len(threads) > 1:
            one, many = t[f"b{b} w{w} t1"], t[f"b{b} w{w} t{cores}"]
            sp, lo, hi = paired_ratio(one, many)
            r[f"ms/step {cores} thr (wall)"] = f"{median(many) * 1e3:.1f}"
            r[f"{cores}-core speed-up (wall)"] = f"{sp:.2f} [{lo:.2f}–{hi:.2f}]"
        return r

    by_batch = [row(b, 32) for b in batches]
    by_width = [row(128, w) for w in widths]
    for title, rows, key in (("batch size (width 32)", by_batch, "batch"), ("width (batch 128)", by_width, "width")):
        xs = [float(r[key]) for r in rows]
        s1 = slope(xs, [float(r["ms/step 1 thr (CPU)"]) for r in rows])
        sf = slope(xs, [float(r["GFLOP/step"]) for r in rows])
        more = ""
        if len(threads) > 1:
            more = f", {slope(xs, [float(r[f'ms/step {cores} thr (wall)']) for r in rows]):.2f} ({cores} threads, wall)"
        print(f"\n# ECT step vs {title}: log-log slope of ms/step {s1:.2f} (1 thread, CPU time){more}; "
              f"of FLOPs {sf:.2f}")
        print(table(rows))
    if png:
        plot(by_batch, by_width, cores, png)


def plot(by_batch: list[dict[str, str]], by_width: list[dict[str, str]], cores: int, path: str) -> None:
    """Log-log PNG of ms/step vs batch and vs width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, rows, key in ((axes[0], by_batch, "batch"), (axes[1], by_width, "width")):
        x = [float(r[key]) for r in rows]
        for col, label in (("ms/step 1 thr (CPU)", "1 thread (CPU time)"),
                           (f"ms/step {cores} thr (wall)", f"{cores} threads (wall)")):
            if col in rows[0]:
                ax.loglog(x, [float(r[col]) for r in rows], "o-", label=label)
        flops = [float(r["GFLOP/step"]) for r in rows]
        ref = float(rows[-1]["ms/step 1 thr (CPU)"]) / flops[-1]
        ax.loglog(x, [f * ref for f in flops], "k:", label="∝ FLOPs")
        ax.set_xticks(x, [str(int(v)) for v in x])
        ax.minorticks_off()
        ax.set_xlabel(key)
        ax.set_ylabel("ms / ECT step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"# plot: {path}")


def sweeps_part(trials: list[int], iterations: int, cpus: int) -> None:
    """Sweep wall vs number of trials, fixed work per trial (sweep_overhead's sweep, no inline baseline)."""
    import logging
    import sys

    from sweep_overhead import measure, private_project, remove_project

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    project = private_project()
    rows: list[dict[str, str]] = []
    cpus_used: list[float] = []
    try:
        for n in trials:
            res = measure(n, iterations, 16, cpus, baseline=False, name=f"bench_scale_{n}")
            sw = res["sweep"]
            per = sum(t["total"] for t in sw["trials"])
            ideal = per / sw["slots"]
            cpu = sum(sw["cpu"].values())
            cpus_used.append(cpu)
            rows.append({"trials": str(n), "wall s": f"{sw['wall']:.1f}", "Σ trial s / slots": f"{ideal:.1f}",
                         "wall − that s": f"{sw['wall'] - ideal:.1f}", "wall / trial s": f"{sw['wall'] / n:.1f}",
                         "Ray start+stop s": f"{res['ray']['start'] + res['ray']['stop']:.1f}",
                         "sweep CPU s": f"{cpu:.1f}", "failed": str(sw["errors"])})
    finally:
        remove_project(project)
    walls = [float(r["wall s"]) for r in rows]
    s = slope([float(n) for n in trials], walls) if len(trials) > 1 else float("nan")
    print(f"\n# sweep wall vs trials ({iterations} SCT iterations each, width 16, {cpus} slots): "
          f"log-log slope {s:.2f}")
    print(table(rows))
    if len(trials) > 1:  # CPU = fixed + per-trial × n, least squares (load-blind decomposition)
        mx, my = sum(trials) / len(trials), sum(cpus_used) / len(cpus_used)
        b = sum((x - mx) * (y - my) for x, y in zip(trials, cpus_used, strict=True))
        b /= sum((x - mx) ** 2 for x in trials)
        print(f"# sweep CPU ≈ {my - b * mx:.1f} s fixed (Ray, worker start-ups, driver) + {b:.1f} s per trial")


def flops_part() -> None:
    """FLOPs of one ECT step (2 forwards + backward ≈ 4 forwards) at batch 128 for the project's networks."""
    rows = []
    for name, (net_cfg, res, ch) in NETS.items():
        cfg = TrainConfig.model_validate({"network": net_cfg})
        net = build_network(cfg.network, res, ch, 0)
        fwd = forward_flops(net, 128)
        rows.append({"network": name, "params": f"{count_parameters(net) / 1e6:.2f} M",
                     "GFLOP fwd (batch 128)": f"{fwd / 1e9:.1f}", "GFLOP ECT step ≈ 4 fwd": f"{4 * fwd / 1e9:.1f}"})
    print("\n# FLOPs per step (torch.utils.flop_counter on a meta copy; ECT step = 2 forwards + backward ≈ 4 forwards)")
    print(table(rows))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", nargs="+", choices=["steps", "sweeps", "flops", "all"], default=["all"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block-s", type=float, default=0.3)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    ap.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--trials", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--iterations", type=int, default=100, help="SCT iterations per sweep trial")
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--png", default=None, help="write the log-log plot here")
    args = ap.parse_args()
    print_conditions(conditions(args.cores))
    parts = {"steps", "sweeps", "flops"} if "all" in args.part else set(args.part)
    if "flops" in parts:
        flops_part()
    if "steps" in parts:
        steps_part(args.batches, args.widths, args.rounds, args.block_s, args.cores, args.png)
    if "sweeps" in parts:
        sweeps_part(args.trials, args.iterations, args.cores)
    print(f"# load (after): {load_average()}")


if __name__ == "__main__":
    main()
