"""Per-step allocations: a CPU training step with glibc's default heap vs. `keep_freed_memory`.

    python bench/heap_reuse.py [--steps 60] [--repeats 3] [--channels 32] [--batch 128]

`trainer.heap.keep_freed_memory` (called by the trainer on CPU) makes glibc serve tensors up to
32 MiB from the heap and keep freed heap, so a step reuses the memory the previous step freed
instead of faulting in fresh pages the kernel must zero. The setting is per process and cannot be
undone, so every measurement is a fresh child process: it builds the digits model, runs 5 warm-up
steps, then `--steps` SCT (n=512) steps + EMA at 1 torch thread, and reports wall, user and system
CPU seconds and minor page faults of those steps. Alone: default and kept alternate, `--repeats`
each (load drift cancels). Concurrently: two children at once, as two trials on two cores run —
both default, then both kept. Ratios are kept / default from this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

from common import conditions, make_step, median, print_conditions, table

from trainer.heap import heap_env, keep_freed_memory

# label: (keep_freed_memory, in a second thread, heap_env at process start)
VARIANTS = {
    "default heap, main thread": (False, False, False),
    "kept, main thread (python -m trainer)": (True, False, False),
    "default heap, trial thread": (False, True, False),
    "kept, trial thread": (True, True, False),
    "kept + heap_env at start, trial thread (sweep)": (True, True, True),
}
PAIRED = ("default heap, trial thread", "kept + heap_env at start, trial thread (sweep)")


def child(keep: bool, in_thread: bool, steps: int, channels: int, batch: int) -> None:
    """Time `steps` SCT steps in this process; print one JSON line."""
    import torch

    from trainer.config import TrainConfig
    from trainer.data import load_dataset
    from trainer.ema import Ema
    from trainer.train import build_model

    torch.set_num_threads(1)
    kept = keep_freed_memory() if keep else False
    torch.manual_seed(0)
    cfg = TrainConfig.model_validate({"network": {"model_channels": channels}})
    data = load_dataset(cfg.data)
    model = build_model(cfg, data)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    step = make_step("sct", 512, cfg, model, data, opt, batch, ema=Ema(model, cfg.ema.beta, cfg.ema.warmup))
    out: dict[str, float] = {}

    def run() -> None:
        for _ in range(5):
            step()
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(steps):
            step()
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        out.update(wall=wall, user=r1.ru_utime - r0.ru_utime, sys=r1.ru_stime - r0.ru_stime,
                   faults=r1.ru_minflt - r0.ru_minflt)

    if in_thread:
        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
    else:
        run()
    print(json.dumps({"kept": kept, **out}))


def spawn(label: str, args: argparse.Namespace) -> subprocess.Popen[str]:
    """A child process measuring variant `label`."""
    keep, in_thread, env = VARIANTS[label]
    cmd = [sys.executable, __file__, "--child", f"{int(keep)}{int(in_thread)}", "--steps", str(args.steps),
           "--channels", str(args.channels), "--batch", str(args.batch)]
    extra = heap_env() if env else {}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **extra})


def collect(procs: list[subprocess.Popen[str]]) -> list[dict[str, float]]:
    """Wait for the children; their measurements."""
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"child exited with {p.returncode}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--channels", type=int, default=32, help="network.model_channels (digits default 32)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--child", choices=["00", "01", "10", "11"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0] == "1", args.child[1] == "1", args.steps, args.channels, args.batch)
        return
    print_conditions(conditions(1))
    alone: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for label in VARIANTS:
            alone[label] += collect([spawn(label, args)])
    pair = {label: collect([spawn(label, args), spawn(label, args)]) for label in PAIRED}
    if not all(r["kept"] for label, (keep, _, _) in VARIANTS.items() if keep for r in alone[label]):
        raise SystemExit("keep_freed_memory had no effect here (not glibc?): nothing to compare")

    def per_step(rows: list[dict[str, float]], key: str) -> float:
        return median([r[key] / args.steps for r in rows])

    base = per_step(alone["default heap, main thread"], "wall")
    rows = []
    for label in VARIANTS:
        rows.append({
            "heap": label,
            "ms/step": f"{per_step(alone[label], 'wall') * 1e3:.1f}",
            "vs default, main": f"{per_step(alone[label], 'wall') / base:.2f}",
            "user ms": f"{per_step(alone[label], 'user') * 1e3:.1f}",
            "system ms": f"{per_step(alone[label], 'sys') * 1e3:.1f}",
            "page faults/step": f"{per_step(alone[label], 'faults'):.0f}",
            "2 at once ms/step": f"{per_step(pair[label], 'wall') * 1e3:.1f}" if label in pair else "",
        })
    print(f"# digits, model_channels {args.channels}, batch {args.batch}, SCT n=512 + EMA, 1 torch thread, "
          f"{args.steps} steps per child; medians of {args.repeats} children alone, of 2 children at once")
    print(table(rows))
    sweep, plain = (per_step(pair[label], "wall") for label in reversed(PAIRED))
    print(f"# 2 trials at once, sweep's heap / default heap: {sweep / plain:.2f}")
    print_conditions(conditions(1), "after")


if __name__ == "__main__":
    main()
