"""Where a sweep's start-up goes: a timeline from `run_sweep` to the trials' first training steps.

    python bench/startup_timeline.py [--rounds 3] [--iterations 20]

Each round runs the real runner (`sct_sweeps.runner.run_sweep`: embedded Ray, MLflow SQLite store)
on 2 digits SCT trials at once, 1 CPU each, in a fresh process and a private project (round 1
creates the MLflow store, later rounds find it), and reads /proc every 0.1 s for every process
under that one: when it was born (its start time, 10-ms ticks) and what it is (`proc_cpu.role`).
Times in seconds after `run_sweep` was called:

- Ray's daemons born (first and last: GCS, raylet, agents, log monitor, autoscaler monitor);
- the sweep's parent MLflow run created (by the driver, after `ray.init`);
- the trial workers born (Ray starts them when Tune asks for the trials);
- each trial's MLflow run created (the worker has imported Ray Tune, torch, MLflow and opened the store);
- each trial set up (its step-0 report: data loaded, networks built, optimiser made);
- each trial's first metrics (`log_every` steps trained, the first with the FLOP count);
- `run_sweep` returned.

Then the CPU seconds every role used over the whole sweep (with trials this short, mostly start-up):
what the start-up costs two cores. Medians over rounds, [min–max].
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from common import conditions, load_average, print_conditions, run_child, spread, table
from proc_cpu import WORKER, CpuMonitor
from sweep_overhead import private_project, remove_project, spec_dict


def _boot_time() -> float:
    """The epoch time the machine booted: /proc start times count from then."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise RuntimeError("no btime in /proc/stat")


def child(iterations: int) -> dict[str, Any]:
    """In a fresh process: one 2-trial sweep; event times (s after run_sweep) and CPU per role."""
    project = private_project()
    try:
        return _timeline(iterations)
    finally:
        remove_project(project)


def _timeline(iterations: int) -> dict[str, Any]:
    from sct_sweeps import schema, tracking
    from sct_sweeps.config import parse_spec
    from sct_sweeps.runner import Launch, run_sweep

    spec = parse_spec(spec_dict("timeline", 2, iterations, 16), "bench")
    tick, boot = os.sysconf("SC_CLK_TCK"), _boot_time()
    monitor = CpuMonitor(0.1)
    monitor.start()
    t0, c0 = time.time(), time.process_time()  # the driver's CPU from here: its imports are done
    outcome = run_sweep(spec, launch=Launch(num_cpus=2, progress=False))
    ended = time.time()
    monitor.stop()
    rec = outcome.record
    client = tracking.client(rec.tracking_uri)
    runs = client.search_runs([rec.experiment_id], filter_string=f"tags.`{schema.PARENT}` = '{rec.parent_run_id}'")
    setup, first = [], []
    for run in runs:
        setup.append(min(m.timestamp for m in client.get_metric_history(run.info.run_id, "n_params")) / 1e3 - t0)
        first.append(min(m.timestamp for m in client.get_metric_history(run.info.run_id, "loss")) / 1e3 - t0)
    born = {}  # role -> birth times
    for (_, start), name in monitor.names.items():
        born.setdefault(name, []).append(boot + start / tick - t0)
    daemons = [t for name, ts in born.items() if name != WORKER for t in ts]
    events = {
        "Ray's daemons born: first": min(daemons),
        "Ray's daemons born: last": max(daemons),
        "parent MLflow run created": client.get_run(rec.parent_run_id).info.start_time / 1e3 - t0,
        "trial workers born: first": min(born[WORKER]),
        "trial workers born: last": max(born[WORKER]),
        "trials' MLflow runs created: first": min(r.info.start_time / 1e3 - t0 for r in runs),
        "trials' MLflow runs created: last": max(r.info.start_time / 1e3 - t0 for r in runs),
        "trials set up (step-0 report): first": min(setup),
        "trials set up (step-0 report): last": max(setup),
        "first metrics (step log_every): last": max(first),
        "run_sweep returned": ended - t0,
    }
    cpu = {**monitor.by_role(), "driver": time.process_time() - c0 - monitor.own_cpu}
    return {"events": events, "cpu": cpu}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=20, help="tuning iterations per trial")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.child:
        print(json.dumps(child(args.iterations)))
        return
    print_conditions(conditions(1))
    print(f"# 2 digits SCT trials of {args.iterations} iterations, 2 at a time, {args.rounds} rounds, "
          "each a fresh process; seconds after run_sweep was called")
    res = []
    for r in range(args.rounds):
        res.append(run_child(__file__, ["--iterations", str(args.iterations)]))
        print(f"# round {r + 1}: run_sweep returned after {res[-1]['events']['run_sweep returned']:.2f} s", flush=True)
    print(table([{"event": k, "s after run_sweep": spread([x["events"][k] for x in res])} for k in res[0]["events"]]))
    roles = sorted({k for x in res for k in x["cpu"]})
    rows = [{"process": k, "CPU s": spread([x["cpu"].get(k, 0.0) for x in res])} for k in roles]
    rows.append({"process": "total", "CPU s": spread([sum(x["cpu"].values()) for x in res])})
    print("\nCPU seconds over the whole sweep, per role (`ray::worker`: the 2 trial workers together)")
    print(table(rows))
    print(f"# load (after): {load_average()}")


if __name__ == "__main__":
    main()
