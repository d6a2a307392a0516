"""Trainer step time per method on digits (batch 128) vs. what torch's own kernels give for the same layers.

    python bench/step_time.py [--threads 2] [--batch 128] [--channels 32] [--rounds 9] [--block-s 0.5] [--profile]

Every figure of one table comes from one run, timed interleaved (each round runs one block of every
method, in rotated order) so that load from other jobs cancels in the ratios:
- ms/step (median over rounds) of train.py's step + EMA update for edm, ect, sct at reference sets
  64/256/512 and its FLOPs (torch.utils.flop_counter); also ECT without dropout, and ECT with the
  target pass drawing its dropout masks again from the restored RNG (what a compiled network does)
  instead of reusing the prediction pass's masks;
- the kernel ceiling: the step's own convolution / matmul calls (forward and backward, recorded with a
  dispatch mode) replayed alone on random tensors of the same shapes and strides — the time torch's
  kernels need for exactly these layers, with no Python, norms, activations, dropout or optimiser;
  `kernel share` = replay time / step time (also = achieved GFLOP/s ÷ the kernels' GFLOP/s);
- a plain square fp32 matmul (the machine's dense-GEMM rate) for scale;
- SCT vs ECT: the paired per-round ratio of step times, and the variance-reduced target alone
  (reference set + x̂0) as a share of an ECT step.
`--profile` prints torch.profiler's time per op category for the ECT and SCT n=512 steps.
"""

from __future__ import annotations

import argparse
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
    set_threads,
    table,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from trainer.config import TrainConfig
from trainer.data import load_dataset
from trainer.ema import Ema
from trainer.heap import keep_freed_memory
from trainer.metrics.flops import count_flops
from trainer.target import reference_set, sct_x0_offset
from trainer.train import build_model

aten = torch.ops.aten
KERNELS = {aten.convolution.default, aten.convolution_backward.default, aten.mm.default, aten.addmm.default,
           aten.bmm.default, aten.baddbmm.default}  # what flop_counter counts in this network
METHODS = [("edm", "edm", 1), ("ect", "ect", 1), ("sct n=64", "sct", 64), ("sct n=256", "sct", 256),
           ("sct n=512", "sct", 512)]
NO_DROPOUT = "ect, dropout 0"
REDRAWN = "ect, masks redrawn"  # the target pass draws its dropout masks again (as for a compiled network)


class _Spec:
    """Shape, strides and dtype of a tensor argument (its data is not kept)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.key = (tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


class _KernelRecorder(TorchDispatchMode):
    """Records every convolution / matmul call (forward and backward) with its argument shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in KERNELS:
            spec = lambda a: _Spec(a) if isinstance(a, torch.Tensor) else a  # noqa: E731
            self.calls.append((func, tree_map(spec, args), tree_map(spec, kwargs)))
        return func(*args, **kwargs)


def kernel_replay(step: Callable[[], object]) -> Callable[[], None]:
    """A function that runs only the convolution / matmul kernels of one `step()` on random tensors.

    Arguments of equal shape and strides share one tensor (so the replay is, if anything, optimistic).
    """
    rec = _KernelRecorder()
    with rec:
        step()
    pool: dict[tuple, torch.Tensor] = {}

    def real(a: Any) -> Any:
        if not isinstance(a, _Spec):
            return a
        if a.key not in pool:
            shape, stride, dtype, device = a.key
            n = 1 + sum((s - 1) * st for s, st in zip(shape, stride, strict=True)) if all(shape) else 0
            pool[a.key] = torch.randn(n, dtype=dtype, device=device).as_strided(shape, stride)
        return pool[a.key]

    calls = [(f, tree_map(real, a), tree_map(real, k)) for f, a, k in rec.calls]

    @torch.no_grad()
    def replay() -> None:
        for f, a, k in calls:
            f(*a, **k)

    return replay


def optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The tuning optimiser exactly as train.py builds it."""
    cls = torch.optim.RAdam if cfg.optim.name == "radam" else torch.optim.Adam
    return cls(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas)


def matmul(n: int) -> tuple[Callable[[], object], float]:
    """An n×n @ n×n fp32 matmul and its FLOPs."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return (lambda: a @ b), 2.0 * n**3


def target_only(data: Any, batch: int, n: int, cfg: TrainConfig) -> Callable[[], object]:
    """SCT's variance-reduced target alone: reference set + x̂0 (docs/algorithms.md §4.1) for one minibatch."""

    def fn() -> object:
        idx = torch.randperm(len(data))[:batch]
        x = data.images[idx]
        t = torch.rand(batch) * 2
        refs, valid, _ = reference_set(x, idx, data.images, n=n)
        return sct_x0_offset(x, x + t.reshape(-1, 1, 1, 1) * torch.randn_like(x), t, refs, valid)

    return fn


CATEGORIES = [  # (label, substrings of aten op names): self CPU time of the profiled step, by kind of op
    ("conv / matmul kernels", ("convolution", "addmm", "aten::mm", "bmm")),
    ("dropout RNG (bernoulli)", ("bernoulli",)),
    ("GroupNorm + SiLU (fwd, bwd)", ("group_norm", "silu")),
    ("other aten ops", ("aten::",)),
]


def profile_summary(step: Callable[[], object], steps: int = 5) -> list[dict[str, str]]:
    """Share of one step's wall time per op category (torch.profiler self CPU time), plus the time outside
    any aten op (Python, dispatcher, profiler) and the optimiser's total."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - t0) / steps * 1e6  # µs per step
    events = prof.key_averages()
    seen: set[str] = set()
    rows = []
    for label, keys in CATEGORIES:
        us = 0.0
        for e in events:
            if e.key not in seen and any(k in e.key for k in keys):
                seen.add(e.key)
                us += e.self_cpu_time_total / steps
        rows.append({"category": label, "ms/step": f"{us / 1e3:.1f}", "share": f"{us / wall:.0%}"})
    ops = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) / steps
    rows.append({"category": "outside aten ops (Python, dispatch)", "ms/step": f"{(wall - ops) / 1e3:.1f}",
                 "share": f"{(wall - ops) / wall:.0%}"})
    opt = sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.")) / steps
    rows.append({"category": "(optimizer step + zero_grad, total)", "ms/step": f"{opt / 1e3:.1f}",
                 "share": f"{opt / wall:.0%}"})
    rows.append({"category": "(whole step, profiled)", "ms/step": f"{wall / 1e3:.1f}", "share": "100%"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--channels", type=int, default=32, help="network.model_channels (digits default 32)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--block-s", type=float, default=0.5, help="seconds per timed block")
    ap.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                    help="cpu = this thread's CPU time (auto: cpu at 1 thread, where it is load-blind; else wall)")
    ap.add_argument("--force", action="store_true", help="run multi-threaded even when the cores are held by others")
    ap.add_argument("--profile", action="store_true", help="op-category profile of the ECT and SCT n=512 steps")
    args = ap.parse_args()
    threads = set_threads(args.threads)
    keep_freed_memory()  # as train.py does on CPU (trainer/heap.py)
    info = conditions(threads)
    print_conditions(info)
    torch.manual_seed(0)
    cfg = TrainConfig.model_validate({"network": {"model_channels": args.channels}})
    data = load_dataset(cfg.data)
    model = build_model(cfg, data)
    opt = optimizer(cfg, model)
    ema = Ema(model, cfg.ema.beta, cfg.ema.warmup)
    steps = {label: make_step(m, ref, cfg, model, data, opt, args.batch, ema=ema) for label, m, ref in METHODS}
    # The same network without dropout: what the dropout masks (CPU RNG, single-threaded) cost.
    cfg0 = cfg.model_copy(update={"network": cfg.network.model_copy(update={"dropout": 0.0})})
    model0 = build_model(cfg0, data)
    ema0 = Ema(model0, cfg.ema.beta, cfg.ema.warmup)
    steps[NO_DROPOUT] = make_step("ect", 1, cfg0, model0, data, optimizer(cfg0, model0), args.batch, ema=ema0)
    steps[REDRAWN] = make_step("ect", 1, cfg, model, data, opt, args.batch, ema=ema, replay_dropout=False)
    if threads > 1:
        over = oversubscribed(steps["ect"], threads)
        print(f"# {threads} threads / 1 thread, wall per ECT step now: {over:.2f}")
        if over > OVERSUBSCRIBED and not args.force:
            raise SystemExit(f"other jobs hold the cores ({threads} threads {over:.1f}x slower than 1): multi-thread "
                             "figures would measure the contention; rerun with --threads 1, later, or with --force")
    flops = {label: count_flops(s) for label, s in steps.items()}
    fns: dict[str, Callable[[], object]] = dict(steps)
    for label in ("edm", "ect", "sct n=512"):
        fns[f"kernels {label}"] = kernel_replay(steps[label])
    mm, mm_flops = matmul(1024)
    fns["matmul 1024"] = mm
    fns["target n=512"] = target_only(data, args.batch, 512, cfg)
    cpu_clock = args.clock == "cpu" or (args.clock == "auto" and threads == 1)
    t = interleaved(fns, args.rounds, args.block_s, clock=time.thread_time if cpu_clock else time.perf_counter)

    mm_rate = mm_flops / median(t["matmul 1024"]) / 1e9
    print(f"# digits 8x8, model_channels {args.channels}, batch {args.batch}, {args.rounds} rounds, "
          f"medians of {'CPU' if cpu_clock else 'wall'} time; matmul 1024: {mm_rate:.0f} GFLOP/s")
    rows = []
    for label in [*(m[0] for m in METHODS), NO_DROPOUT, REDRAWN]:
        s = median(t[label])
        rate = flops[label] / s / 1e9
        kern = "kernels " + ("sct n=512" if label.startswith("sct") else "ect" if label.startswith("ect") else label)
        share, lo, hi = paired_ratio(t[kern], t[label])
        vs = paired_ratio(t[label], t["ect"]) if label != "edm" else None
        rows.append({
            "method": label, "ms/step": f"{s * 1e3:.1f}", "GFLOP/step": f"{flops[label] / 1e9:.2f}",
            "GFLOP/s": f"{rate:.1f}", "kernels GFLOP/s": f"{flops[label] / median(t[kern]) / 1e9:.1f}",
            "kernel share": f"{share:.2f} [{lo:.2f}–{hi:.2f}]",
            "vs ECT": f"{vs[0]:.3f} [{vs[1]:.3f}–{vs[2]:.3f}]" if vs else "",
        })
    print(table(rows))
    tgt, lo, hi = paired_ratio(t["target n=512"], t["ect"])
    print(f"# SCT target alone (reference set n=512 + x̂0, batch {args.batch}): "
          f"{median(t['target n=512']) * 1e3:.2f} ms = {tgt:.1%} of an ECT step [{lo:.1%}–{hi:.1%}]")
    if args.profile:
        for label in ("ect", "sct n=512"):
            print(f"\n# profile of the {label} step (torch.profiler, 5 steps)")
            print(table(profile_summary(steps[label])))
    print(f"# load (after): {load_average()}")


if __name__ == "__main__":
    main()
