"""Ray's background CPU: what an embedded Ray takes from the cores while two trials run.

    python bench/ray_tax.py [--rounds 3] [--seconds 30]

Two Ray Tune trials that only sleep (reporting a result every 5 s, as trials report evaluations) run
in an embedded Ray started by `sct_sweeps.session.start_ray`; once both have started and their
imports are over (5 s), every process's CPU time is read from /proc over `--seconds`. Whatever
CPU the processes take then is taken from real trials: Ray's daemons (GCS, raylet, agents, log
monitor, autoscaler monitor), Ray's threads in the two workers and the driver's Tune loop.

Three settings, each in a fresh process, alternated for `--rounds` rounds:
- "Ray's defaults": every variable of `sct_sweeps.session.EMBEDDED_RAY_ENV` at Ray's own default;
- "sct-sweeps": the embedded Ray as a sweep starts it (EMBEDDED_RAY_ENV applied);
- "slower timers": that, plus Ray's periodic checks of 100–200 ms (garbage collection, disk space,
  object manager, idle workers) every second instead (`SLOWER_TIMERS`; a candidate, not used).
Printed: per process role, % of one core and wake-ups per second (voluntary context switches of all
its threads: each is a thread waking and going back to sleep, and on busy cores each wake-up
preempts a training thread), medians over rounds, and the totals.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import conditions, load_average, print_conditions, run_child, spread, table
from proc_cpu import CpuMonitor
from sweep_overhead import private_project, remove_project

from sct_sweeps.session import EMBEDDED_RAY_ENV

RAY_DEFAULTS = {  # Ray 2.60's own values of what EMBEDDED_RAY_ENV sets
    "RAY_prestart_worker_first_driver": "1",
    "RAY_event_stats": "1",
    "RAY_enable_metrics_collection": "1",
}
# Ray's own periodic checks that run every 100-200 ms on every node (ray_config_def.h of Ray 2.60)
SLOWER_TIMERS = {
    "RAY_raylet_check_gc_period_milliseconds": "1000",
    "RAY_local_fs_monitor_interval_ms": "1000",
    "RAY_object_manager_timer_freq_ms": "1000",
    "RAY_kill_idle_workers_interval_ms": "1000",
}
WARMUP_S = 5.0


def sleeper(config: dict[str, Any]) -> None:
    """A trial that computes nothing: marks its start, reports every 5 s until the stop file appears."""
    from ray import tune

    flags = Path(config["flags"])
    (flags / f"started-{os.getpid()}").touch()
    last = time.monotonic()
    while not (flags / "stop").exists():
        time.sleep(0.2)
        if time.monotonic() - last >= 5.0:
            tune.report({"alive": 1.0})
            last = time.monotonic()


def child(seconds: float) -> dict[str, dict[str, float]]:
    """In a fresh process: start Ray as a sweep does, run two sleeping trials; per role, % of a core
    ("cpu") and wake-ups per second ("wakeups")."""
    project = private_project()
    try:
        return _sleeping_trials(project, seconds)
    finally:
        remove_project(project)


def _sleeping_trials(project: Path, seconds: float) -> dict[str, dict[str, float]]:
    from sct_sweeps.session import start_ray, stop_ray

    flags = project / "flags"
    flags.mkdir()
    monitor = CpuMonitor(1.0)
    monitor.start()
    start_ray(None, 2)
    from ray import tune

    window: list[tuple[float, dict[str, float], dict[str, tuple[int, int]]]] = []

    def sample() -> None:
        while len(list(flags.glob("started-*"))) < 2:
            time.sleep(0.2)
        time.sleep(WARMUP_S)
        for wait in (0.0, seconds):
            time.sleep(wait)
            monitor.snapshot()
            cpu = {**monitor.by_role(), "driver": time.process_time() - monitor.own_cpu}
            window.append((time.perf_counter(), cpu, monitor.switches()))
        (flags / "stop").touch()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tuner = tune.Tuner(
        sleeper,
        param_space={"flags": str(flags), "i": tune.grid_search([0, 1])},
        tune_config=tune.TuneConfig(max_concurrent_trials=2),
        run_config=tune.RunConfig(storage_path=str(project / "results"), verbose=0),
    )
    tuner.fit()
    sampler.join()
    monitor.stop()
    stop_ray()
    (t0, a, sa), (t1, b, sb) = window
    return {
        "cpu": {k: 100 * (b.get(k, 0.0) - a.get(k, 0.0)) / (t1 - t0) for k in sorted(set(a) | set(b))},
        "wakeups": {k: (sb[k][0] - sa.get(k, (0, 0))[0]) / (t1 - t0) for k in sorted(sb)},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=30.0, help="measuring window per run")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.child:
        print(json.dumps(child(args.seconds)))
        return
    assert RAY_DEFAULTS.keys() == EMBEDDED_RAY_ENV.keys(), "RAY_DEFAULTS must name what EMBEDDED_RAY_ENV sets"
    for key in EMBEDDED_RAY_ENV:
        os.environ.pop(key, None)
    print_conditions(conditions(1))
    print(f"# 2 sleeping trials in an embedded Ray, {args.seconds:g} s window after a {WARMUP_S:g} s warm-up, "
          f"{args.rounds} rounds, settings alternated")
    variants = {"Ray's defaults": RAY_DEFAULTS, "sct-sweeps": {}, "slower timers": SLOWER_TIMERS}
    runs: dict[str, list[dict[str, dict[str, float]]]] = {v: [] for v in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in order:
            runs[name].append(run_child(__file__, ["--seconds", str(args.seconds)], variants[name], args.seconds + 300))
            res = runs[name][-1]
            print(f"# round {r + 1}, {name}: {sum(res['cpu'].values()):.2f} % of a core, "
                  f"{sum(res['wakeups'].values()):.0f} wake-ups/s", flush=True)
    for what, unit, spec in (("cpu", "% of one core", ".2f"), ("wakeups", "wake-ups per second", ".0f")):
        print(f"\n{unit}, median [min–max] over rounds")
        roles = sorted({k for rs in runs.values() for r in rs for k in r[what]})
        rows = []
        for role in [*roles, "total"]:
            row = {"process": role}
            for name, rs in runs.items():
                xs = [sum(r[what].values()) if role == "total" else r[what].get(role, 0.0) for r in rs]
                row[name] = spread(xs, spec)
            rows.append(row)
        print(table(rows))
    print(f"# load (after): {load_average()}")


if __name__ == "__main__":
    main()
