"""Shared pretraining: a sweep of N trials with one phase-one config pretrains once.

    python bench/pretrain_sharing.py [--trials 4] [--pretrain-iters 200] [--iterations 30] [--cpus 2]

Runs the real runner (`sct_sweeps.runner.run_sweep`, embedded Ray, private SCT_PROJECT_DIR under
/tmp) on a digits sweep whose N trials differ only in a tuning field (sct.ref_batch), so they share
one phase one. Reports the sweep's pretraining wall time, the number of checkpoints in the cache,
and that every trial's MLflow run carries the same `sct.pretrain_checkpoint` tag; then times the
same pretraining inline in this process (1 torch thread, as a 1-CPU trial would run it) and a second
sweep on the same cache (its pretraining phase is a cache hit). The saving: (N − 1) pretrainings of
compute, or (N / slots − 1) pretrainings of wall time, when each trial would pretrain for itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import conditions, load_average, print_conditions, table
from sweep_overhead import private_project, remove_project


def spec_dict(name: str, trials: int, pretrain_iters: int, iterations: int, channels: int) -> dict[str, Any]:
    """N SCT trials differing only in the reference-set size (a tuning field): one phase one."""
    return {
        "name": name,
        "base": {
            "method": "sct", "iterations": iterations, "data": {"name": "digits"},
            "network": {"model_channels": channels, "channel_mult": [1, 2], "num_blocks": 1},
            "pretrain": {"iterations": pretrain_iters, "batch_size": 128},
            "optim": {"batch_size": 64, "lr": 3e-4},
            "eval": {"every": iterations, "fid_samples": 500, "at_start": False, "online": False,
                     "save_grid": False},
            "log_every": 10, "checkpoint_every": iterations,
        },
        "search": {"sct.ref_batch": {"grid": [64 * 2**i for i in range(trials)]}},
        "algorithm": "grid", "metric": "fid_1step", "resources": {"cpu": 1, "gpu": 0},
    }


def pretrain_tags(uri: str, experiment_id: str) -> list[str]:
    """The `sct.pretrain_checkpoint` tag of every trial run of the experiment."""
    from sct_sweeps import schema, tracking

    not_parent = f"tags.`{schema.ROLE}` != '{schema.ROLE_PARENT}'"
    runs = tracking.client(uri).search_runs([experiment_id], filter_string=not_parent)
    return [r.data.tags.get(schema.PRETRAIN_CHECKPOINT, "") for r in runs if schema.PARENT in r.data.tags]


def sweep(raw: dict[str, Any], cpus: int) -> dict[str, Any]:
    """Run one sweep; its wall and pretraining time, the trials' pretrain tags, and the cache's files."""
    from sct_sweeps.config import parse_spec
    from sct_sweeps.runner import Launch, run_sweep

    t0 = time.perf_counter()
    out = run_sweep(parse_spec(raw, "bench"), launch=Launch(num_cpus=cpus, progress=False))
    wall = time.perf_counter() - t0
    rec = out.record
    return {"wall": wall, "pretrain": out.pretrain_s, "trials": out.trials, "errors": out.errors, "slots": out.slots,
            "tags": pretrain_tags(rec.tracking_uri, rec.experiment_id),
            "cache": sorted(p.name for p in Path(rec.pretrain_cache).glob("*.pt"))}


def inline_pretrain(raw: dict[str, Any], out: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of the same phase one trained in this process at 1 torch thread."""
    from sct_sweeps.config import parse_spec
    from trainer.train import pretrain

    cfg = parse_spec(raw, "bench").base
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0, c0 = time.perf_counter(), time.thread_time()
        pretrain(cfg, out / "inline_pretrain.pt")
        return time.perf_counter() - t0, time.thread_time() - c0
    finally:
        torch.set_num_threads(old)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--pretrain-iters", type=int, default=200)
    ap.add_argument("--iterations", type=int, default=30, help="tuning iterations per trial")
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    project = private_project()
    print_conditions(conditions(1))
    n = args.trials
    try:
        sizes = (args.pretrain_iters, args.iterations, args.channels)
        first = sweep(spec_dict("share_a", n, *sizes), args.cpus)
        t_inline, c_inline = inline_pretrain(spec_dict("x", n, *sizes), project)
        second = sweep(spec_dict("share_b", 2, *sizes), args.cpus)
    finally:
        remove_project(project)
    t_task, t_pre = first["pretrain"], t_inline  # a trial pretraining itself would pay t_pre, in its own slot
    slots = first["slots"]
    tags = first["tags"]
    distinct = len(set(tags))
    wall_saved = max(0.0, n / slots - 1) * t_pre
    print(f"# digits, model_channels {args.channels}, 1 block; phase one {args.pretrain_iters} EDM iterations "
          f"(batch 128); {n} SCT trials × {args.iterations} iterations, sct.ref_batch swept; {slots} slots")
    rows = [
        {"what": f"sweep A ({n} trials): wall", "value": f"{first['wall']:.1f} s"},
        {"what": "  its pretraining phase (one Ray task, 1 CPU, incl. worker start)", "value": f"{t_task:.1f} s"},
        {"what": "  checkpoints in the pretrain cache", "value": str(len(first["cache"]))},
        {"what": "  trials' sct.pretrain_checkpoint tags: distinct / runs", "value": f"{distinct} / {len(tags)}"},
        {"what": "the same pretraining inline, 1 thread (= what each trial would pay): wall / CPU",
         "value": f"{t_pre:.1f} s / {c_inline:.1f} s"},
        {"what": f"**compute saved: (N − 1) × pretraining CPU = {n - 1} × {c_inline:.1f} s**",
         "value": f"**{(n - 1) * c_inline:.0f} CPU·s ({(n - 1) / n:.0%} of the pretraining compute)**"},
        {"what": f"wall saved: (N / slots − 1) × {t_pre:.1f} s",
         "value": f"{wall_saved:.0f} s ({wall_saved / (first['wall'] + wall_saved):.0%} of the unshared wall)"},
        {"what": "sweep B (2 trials, same phase one): pretraining phase",
         "value": f"{second['pretrain']:.2f} s (cache hit)"},
        {"what": "  checkpoints in the cache after both sweeps", "value": str(len(second["cache"]))},
    ]
    print(table(rows))
    failed = first["errors"] + second["errors"]
    if failed or distinct != 1 or len(second["cache"]) != 1:
        print(f"# WARNING: {failed} failed trials, {distinct} distinct checkpoints, cache {second['cache']}")
    print(f"# load (after): {load_average()}")


if __name__ == "__main__":
    main()
