"""What logging a trial's metrics to MLflow costs the trial: CPU per report, sent at once vs in batches.

    python bench/tracking_cost.py [--reports 100] [--interval 0.6] [--rounds 2]

A `sct_sweeps.TrialTracker` on a fresh SQLite store (the default store of a sweep) gets
`--reports` reports of the metrics the trainer logs every `log_every` iterations (loss, iteration,
images seen, FLOPs, wall and CPU seconds, stage, ESS: 9 values), one every `--interval` seconds —
0.6 s is `bench/sweep_overhead.py`'s trial at 1 thread (10 iterations of ~60 ms). Timed: the
reporting thread's CPU time (the training thread's, in a trial), per report, with
`flush_every_s` 0 (every report written at once) and 5 (a sweep's default, `mlflow_flush_s`);
the two settings alternate for `--rounds` rounds. Also printed: that cost as a share of the
interval, i.e. of a trial's training CPU at that pace.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import conditions, load_average, median, print_conditions, table

from sct_sweeps import tracking
from sct_sweeps.trial_tracker import TrialTracker

KEYS = ("loss", "iteration", "images_seen", "flops", "wall_s", "cpu_s", "eval_s", "stage", "ess")


def run(flush_every_s: float, reports: int, interval: float) -> float:
    """CPU seconds per report of one tracker logging `reports` reports `interval` s apart, finish included."""
    root = Path(tempfile.mkdtemp(prefix="sct-track-", dir="/tmp"))
    try:
        uri = f"sqlite:///{root / 'mlruns.db'}"
        client = tracking.client(uri)
        exp = tracking.ensure_experiment(client, "cost", root / "artifacts")
        parent = tracking.start_parent_run(client, exp, "cost", {}, "name: cost\n", root)
        params = {f"p{i}": str(i) for i in range(100)}  # a trial's run has ~100 settings as params
        tracker = TrialTracker(uri=uri, experiment_id=exp, parent_run_id=parent, sweep="cost", trial_id="t0",
                                        run_name="run", tags={}, params=params, flush_every_s=flush_every_s)
        tracker.start()
        c0 = time.thread_time()
        for step in range(reports):
            time.sleep(interval)
            tracker.log_metrics({k: float(step + i) for i, k in enumerate(KEYS)}, step * 10)
        assert tracker.finish() == 0
        return (time.thread_time() - c0) / reports
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reports", type=int, default=100)
    ap.add_argument("--interval", type=float, default=0.6, help="seconds between reports")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    print_conditions(conditions(1))
    run(0.0, 3, 0.0)  # MLflow's and SQLAlchemy's imports, outside the timing
    settings = {"every report (flush_every_s 0)": 0.0, "batched (flush_every_s 5)": 5.0}
    cpu: dict[str, list[float]] = {k: [] for k in settings}
    for r in range(args.rounds):
        for name in list(settings) if r % 2 == 0 else list(settings)[::-1]:
            cpu[name].append(run(settings[name], args.reports, args.interval))
    print(f"# {args.reports} reports of {len(KEYS)} metrics, {args.interval:g} s apart, SQLite store; "
          f"{args.rounds} rounds, medians [min–max]")
    rows = []
    for name, xs in cpu.items():
        rows.append({"metrics sent": name, "CPU ms per report": f"{median(xs) * 1e3:.2f} "
                     f"[{min(xs) * 1e3:.2f}–{max(xs) * 1e3:.2f}]",
                     f"share of a trial's CPU at 1 report / {args.interval:g} s": f"{median(xs) / args.interval:.2%}"})
    print(table(rows))
    a, b = (median(xs) for xs in cpu.values())
    print(f"# every report / batched: {a / b:.1f}x the CPU")
    print(f"# load (after): {load_average()}")


if __name__ == "__main__":
    main()
