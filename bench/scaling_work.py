"""Scaling with the work: ECT step time vs batch size and network width (log-log), 1 vs all cores,
sweep wall time vs number of trials, and the FLOPs per step of larger networks (for the GPU estimate).

    python bench/scaling_work.py [--part steps|sweeps|flops|all] [--rounds 5] [--block-s 0.3]
                                 [--batches 16 32 64 128 256 512] [--widths 8 16 32 64]
                                 [--trials 2 4 8] [--iterations 100] [--png PATH]

steps: every (batch, width, threads) cell is one fn of one interleaved timing (common.interleaved),
so all cells share the machine's load; the slope of log(ms/step) vs log(batch) or log(width) is fitted
by least squares over the cells, and `2-core speed-up` is the paired per-round ratio 1 thread / 2.
sweeps: sweep_overhead's fixed-work sweep at each trial count (real runner, private project).
flops: torch.utils.flop_counter FLOPs of one ECT step (2 forwards + 1 backward) at batch 128.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
from collections.abc import Callable
from typing import Any

import torch
from common import (
    conditions,
    interleaved,
    load_average,
    make_step,
    median,
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


def steps_part(batches: list[int], widths: list[int], rounds: int, block_s: float, cores: int,
               png: str | None) -> None:
    """ECT step time over batch sizes (width 32) and widths (batch 128), at 1 and `cores` threads."""
    torch.manual_seed(0)
    cells: dict[tuple[str, int, int], tuple[Callable[[], object], float]] = {}
    plan = [("batch", b, 32) for b in batches] + [("width", 128, w) for w in widths if w != 32 or 128 not in batches]
    models: dict[int, Any] = {}
    for _axis, b, w in plan:
        cfg = TrainConfig.model_validate({"method": "ect", "network": {"model_channels": w}})
        if w not in models:
            data = load_dataset(cfg.data)
            model = build_model(cfg, data)
            models[w] = (cfg, data, model, optimizer(cfg, model))
        cfg, data, model, opt = models[w]
        step = make_step("ect", 1, cfg, model, data, opt, b)
        flops = float(count_flops(step))
        for n in sorted({1, cores}):
            cells[(f"b{b} w{w}", n, b)] = (with_threads(step, n), flops)
    t = interleaved({f"{k[0]} t{k[1]}": fn for k, (fn, _) in cells.items()}, rounds, block_s)
    torch.set_num_threads(cores)

    def row(b: int, w: int) -> dict[str, str]:
        one, many = t[f"b{b} w{w} t1"], t[f"b{b} w{w} t{cores}"]
        flops = cells[(f"b{b} w{w}", 1, b)][1]
        sp, lo, hi = paired_ratio(one, many)
        return {"batch": str(b), "width": str(w), "GFLOP/step": f"{flops / 1e9:.2f}",
                "ms/step 1 thr": f"{median(one) * 1e3:.1f}", f"ms/step {cores} thr": f"{median(many) * 1e3:.1f}",
                "img/s 1 thr": f"{b / median(one):.0f}", f"GFLOP/s {cores} thr": f"{flops / median(many) / 1e9:.1f}",
                f"{cores}-core speed-up": f"{sp:.2f} [{lo:.2f}–{hi:.2f}]"}

    by_batch = [row(b, 32) for b in batches]
    by_width = [row(128, w) for w in widths]
    for title, rows, key in (("batch size (width 32)", by_batch, "batch"), ("width (batch 128)", by_width, "width")):
        xs = [float(r[key]) for r in rows]
        s1 = slope(xs, [float(r["ms/step 1 thr"]) for r in rows])
        sn = slope(xs, [float(r[f"ms/step {cores} thr"]) for r in rows])
        sf = slope(xs, [float(r["GFLOP/step"]) for r in rows])
        print(f"\n# ECT step vs {title}: log-log slope of ms/step {s1:.2f} (1 thread), {sn:.2f} ({cores} threads); "
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
        for col, label in (("ms/step 1 thr", "1 thread"), (f"ms/step {cores} thr", f"{cores} threads")):
            ax.loglog(x, [float(r[col]) for r in rows], "o-", label=label)
        flops = [float(r["GFLOP/step"]) for r in rows]
        ref = float(rows[-1]["ms/step 1 thr"]) / flops[-1]
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

    from sweep_overhead import measure, private_project

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    project = private_project()
    rows = []
    try:
        for n in trials:
            res = measure(n, iterations, 16, cpus, baseline=False, name=f"bench_scale_{n}")
            sw = res["sweep"]
            per = sum(t["total"] for t in sw["trials"])
            ideal = per / sw["slots"]
            rows.append({"trials": str(n), "wall s": f"{sw['wall']:.1f}", "Σ trial s / slots": f"{ideal:.1f}",
                         "overhead s": f"{sw['wall'] - ideal:.1f}", "wall / trial s": f"{sw['wall'] / n:.1f}",
                         "Ray start+stop s": f"{res['ray']['start'] + res['ray']['stop']:.1f}",
                         "failed": str(sw["errors"])})
    finally:
        shutil.rmtree(project, ignore_errors=True)
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
    walls = [float(r["wall s"]) for r in rows]
    s = slope([float(n) for n in trials], walls) if len(trials) > 1 else float("nan")
    print(f"\n# sweep wall vs trials ({iterations} SCT iterations each, width 16, {cpus} slots): "
          f"log-log slope {s:.2f}")
    print(table(rows))


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
    ap.add_argument("--part", choices=["steps", "sweeps", "flops", "all"], default="all")
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
    if args.part in ("flops", "all"):
        flops_part()
    if args.part in ("steps", "all"):
        steps_part(args.batches, args.widths, args.rounds, args.block_s, args.cores, args.png)
    if args.part in ("sweeps", "all"):
        sweeps_part(args.trials, args.iterations, args.cores)
    print(f"# load (after): {load_average()}")


if __name__ == "__main__":
    main()
