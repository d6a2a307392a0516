"""Sweep overhead: an N-trial sweep of fixed work vs. the same trials back to back in one process.

    python bench/sweep_overhead.py [--trials 8] [--iterations 150] [--channels 16] [--cpus 2]
                                   [--threaded] [--no-parallel] [--rounds 1]

The trials are tiny digits SCT trials (no pretraining, fixed iterations, one evaluation at the end,
seeds 0..N−1). The sweep is the real thing: `sct_sweeps.runner.run_sweep` (embedded Ray, MLflow
SQLite store, checkpoints) in a private SCT_PROJECT_DIR / RAY_TMPDIR under /tmp, 1 CPU per trial,
so `cpus` trials run at once and Ray sets OMP_NUM_THREADS=1 in each (torch threads × concurrent
trials = cores). The baseline runs the same TrainConfigs with `trainer.train.train` in this process:
with 1 torch thread (a trial's compute as the sweep gives it: the ideal sweep wall is their sum /
cpus) and with `cpus` threads (running them by hand, one after another; skipped when a probe finds
`cpus` threads slower than 1, i.e. other jobs hold the cores; only with --threaded) and as a pool of
`cpus` plain processes at 1 thread (by hand in parallel, no Ray or MLflow: the hardware's floor for
concurrent trials). Half of the back-to-back baseline
trials run before the sweep and half after it, so a drift of the machine's load cancels.
With --rounds R the whole measurement repeats R times in one project (round 1 creates the MLflow
store, later rounds find it, as a user's second sweep does) and a last table gives every round's
ratios and their medians: the machine's speed drifts over minutes, so one round's ratio is noisy.

Reported: Ray start-up and shutdown (timed alone first), per-trial set-up inside a trial (Ray's
time_total_s minus the trainer's own loop and evaluation time), the gaps between trials (worker
start, scheduling), the goal ratio sweep wall / (Σ 1-thread trial time / cpus) ≤ 1.10, and its
load-blind twin: the CPU seconds of the sweep (every process under this one — Ray's GCS, raylet,
workers — read from /proc, plus the driver) over the CPU seconds of the inline trials. The VM's
speed drifts by several percent between the inline trials and the sweep; the training loop's own
thread CPU (sweep / inline) measures that drift for the same work, and the goal ratio divided by it
is the runner's overhead with the drift taken out.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    OVERSUBSCRIBED,
    conditions,
    load_average,
    make_step,
    median,
    oversubscribed,
    print_conditions,
    spread,
    table,
)
from proc_cpu import CpuMonitor, Usage

from trainer.config import TrainConfig


def spec_dict(name: str, trials: int, iterations: int, channels: int) -> dict[str, Any]:
    """The benchmark sweep: N seeds of a tiny digits SCT run, every trial the same work."""
    return {
        "name": name,
        "base": {
            "method": "sct", "iterations": iterations, "data": {"name": "digits"},
            "network": {"model_channels": channels, "channel_mult": [1, 2], "num_blocks": 1},
            "pretrain": {"iterations": 0}, "optim": {"batch_size": 64, "lr": 3e-4}, "sct": {"ref_batch": 512},
            "eval": {"every": iterations, "fid_samples": 500, "at_start": False, "online": False,
                     "save_grid": False},
            "log_every": 10, "checkpoint_every": iterations,
        },
        "search": {"seed": {"grid": list(range(trials))}},
        "algorithm": "grid", "metric": "fid_1step", "resources": {"cpu": 1, "gpu": 0},
    }


def private_project() -> Path:
    """A throw-away project directory and Ray temp directory (short: Ray's socket paths are limited)."""
    project = Path(tempfile.mkdtemp(prefix="sct-bench-", dir="/tmp"))
    os.environ["SCT_PROJECT_DIR"] = str(project)
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rtb", dir="/tmp")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("RAY_ADDRESS", None)
    return project


def remove_project(project: Path) -> None:
    """Delete a `private_project` directory and its Ray temp directory."""
    shutil.rmtree(project, ignore_errors=True)
    shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)


def ray_startup(cpus: int) -> dict[str, float]:
    """Seconds to start and to shut down the embedded Ray a sweep uses (measured alone)."""
    from sct_sweeps.session import start_ray, stop_ray

    t0 = time.perf_counter()
    start_ray(None, cpus)
    t1 = time.perf_counter()
    stop_ray()
    return {"start": t1 - t0, "stop": time.perf_counter() - t1}


def run_trials_inline(cfgs: list[TrainConfig], threads: int, out: Path) -> list[dict[str, float]]:
    """Train each config with trainer.train in this process at `threads` torch threads; per-trial times."""
    from trainer.train import train

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        for cfg in cfgs:
            cfg = cfg.model_copy(update={"out_dir": out / f"t{threads}-s{cfg.seed}"})
            t0, c0, r0 = time.perf_counter(), time.thread_time(), resource.getrusage(resource.RUSAGE_SELF)
            res = train(cfg)
            total, cpu, usage = time.perf_counter() - t0, time.thread_time() - c0, Usage.since(r0)
            rows.append({"total": total, "cpu": cpu, "loop": res.metrics["wall_s"], "eval": res.metrics["eval_s"],
                         "loop_cpu": res.metrics["cpu_s"], "usage": usage})
    finally:
        torch.set_num_threads(old)
    return rows


def _train_one(cfg: TrainConfig) -> dict[str, float]:
    """One trial at 1 torch thread in a pool process (module level: picklable for `spawn`)."""
    from trainer.train import train

    torch.set_num_threads(1)
    t0, c0, r0 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
    train(cfg)
    return {"total": time.perf_counter() - t0, "cpu": time.process_time() - c0, "usage": Usage.since(r0)}


def run_trials_parallel(cfgs: list[TrainConfig], procs: int, out: Path) -> dict[str, Any]:
    """The same trials by hand without Ray or MLflow: a pool of `procs` fresh processes at 1 thread each.

    Its wall (pool start and imports included) is what the hardware gives `procs` concurrent trials:
    the sweep's practical floor, above Σ/cores by the cost of two trials sharing caches and memory.
    """
    import multiprocessing as mp

    cfgs = [c.model_copy(update={"out_dir": out / f"par-s{c.seed}"}) for c in cfgs]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(procs, maxtasksperchild=None) as pool:
        rows = pool.map(_train_one, cfgs, chunksize=1)
    return {"wall": time.perf_counter() - t0, "trials": rows}


def run_sweep_timed(spec_raw: dict[str, Any], cpus: int) -> dict[str, Any]:
    """Run the sweep with the real runner; wall time, its parts and per-trial times from Ray's results."""
    from ray.tune import ExperimentAnalysis

    from sct_sweeps import schema, tracking
    from sct_sweeps.config import parse_spec
    from sct_sweeps.runner import Launch, run_sweep

    spec = parse_spec(spec_raw, "bench")
    monitor = CpuMonitor()
    monitor.start()
    t0, c0, started = time.perf_counter(), time.process_time(), time.time()
    outcome = run_sweep(spec, launch=Launch(num_cpus=cpus, progress=False))
    wall, driver_cpu, ended = time.perf_counter() - t0, time.process_time() - c0, time.time()
    cpu = monitor.stop()
    cpu["driver"] = driver_cpu - monitor.own_cpu  # this script's sampling is not the sweep's
    rec = outcome.record
    runs = tracking.client(rec.tracking_uri).search_runs(
        [rec.experiment_id], filter_string=f"tags.`{schema.PARENT}` = '{rec.parent_run_id}'")
    first_run = min(r.info.start_time for r in runs) / 1e3 - started  # a trial's MLflow run exists: it trains
    last_end = ended - max(r.info.end_time for r in runs) / 1e3
    trials = []
    for t in ExperimentAnalysis(rec.results_dir).trials:
        r = t.last_result or {}
        trials.append({"total": float(r.get("time_total_s", 0.0)), "loop": float(r.get("wall_s", 0.0)),
                       "eval": float(r.get("eval_s", 0.0)), "loop_cpu": float(r.get("cpu_s", 0.0)),
                       "status": t.status})
    return {"wall": wall, "pretrain": outcome.pretrain_s, "slots": outcome.slots, "errors": outcome.errors,
            "trials": trials, "cpu": cpu, "first_run": first_run, "last_end": last_end}


def measure(trials: int, iterations: int, channels: int, cpus: int, baseline: bool = True,
            name: str = "bench_overhead", threaded: bool = False, parallel: bool = True) -> dict[str, Any]:
    """One sweep of `trials` trials, the inline baseline around it (if asked), Ray start-up; all times."""
    from sct_sweeps.config import parse_spec
    from trainer.config import override

    project = Path(os.environ["SCT_PROJECT_DIR"])
    raw = spec_dict(name, trials, iterations, channels)
    base = parse_spec(raw, "bench").base
    cfgs = [override(base, {"seed": s}) for s in range(trials)]
    res: dict[str, Any] = {"ray": ray_startup(cpus), "seq1": [], "seqn": [], "over": None, "par": None}
    by_hand = baseline and threaded and cpus > 1
    if by_hand:
        res["over"] = over = oversubscribed(probe_step(base), cpus)
        by_hand = over <= OVERSUBSCRIBED
    half = (trials + 1) // 2
    for part in (cfgs[:half], None, cfgs[half:]):
        if part is None:
            res["sweep"] = run_sweep_timed(raw, cpus)
            if baseline and parallel and cpus > 1:
                res["par"] = run_trials_parallel(cfgs, cpus, project / "inline")
        elif baseline:
            for cfg in part:  # alternate thread counts trial by trial
                res["seq1"] += run_trials_inline([cfg], 1, project / "inline")
                if by_hand:
                    res["seqn"] += run_trials_inline([cfg], cpus, project / "inline")
    return res


def probe_step(cfg: TrainConfig) -> Any:
    """One training step of `cfg`'s network and method (for the oversubscription probe)."""
    from trainer.data import load_dataset
    from trainer.train import build_model

    data = load_dataset(cfg.data)
    model = build_model(cfg, data)
    opt = torch.optim.RAdam(model.parameters(), lr=cfg.optim.lr)
    return make_step(cfg.method, cfg.sct.ref_batch, cfg, model, data, opt, cfg.optim.batch_size)


def _usage_text(u: Usage, trials: int) -> str:
    return f"{u.system / max(u.cpu, 1e-9):.1%}, {u.minflt / max(trials, 1):,.0f}"


def report(res: dict[str, Any], cpus: int) -> dict[str, float]:
    """Print the overhead table of one `measure` result; return its headline ratios."""
    sw = res["sweep"]
    cpu = sw["cpu"]
    n = len(sw["trials"])
    ray = res["ray"]
    ray_total = ray["start"] + ray["stop"]
    sum_trial = sum(t["total"] for t in sw["trials"])
    setup_in_trial = [t["total"] - t["loop"] - t["eval"] for t in sw["trials"]]
    gaps = sw["wall"] - sw["pretrain"] - ray_total - sum_trial / sw["slots"]
    rows = [
        {"what": "sweep wall (run_sweep, end to end)", "s": f"{sw['wall']:.1f}"},
        {"what": "  Ray start + shutdown (measured alone)", "s": f"{ray['start']:.1f} + {ray['stop']:.1f}"},
        {"what": f"  Σ trial time (Ray time_total_s) / {sw['slots']} slots", "s": f"{sum_trial / sw['slots']:.1f}"},
        {"what": "  per-trial set-up inside the trial: median / max (first trial of a worker)",
         "s": f"{median(setup_in_trial):.2f} / {max(setup_in_trial):.2f}"},
        {"what": "  rest: worker start, scheduling, MLflow parent run, stragglers", "s": f"{gaps:.1f}"},
        {"what": "  start-up: run_sweep called → first trial's MLflow run created (Ray, store, worker imports)",
         "s": f"{sw['first_run']:.1f}"},
        {"what": "  tear-down: last trial's MLflow run ended → run_sweep returns", "s": f"{sw['last_end']:.1f}"},
    ]
    headline = {"sweep wall (s)": sw["wall"], "Ray start + shutdown (s)": ray_total}
    if res["seq1"]:
        s1 = sum(t["total"] for t in res["seq1"])
        c1 = sum(t["cpu"] for t in res["seq1"])
        inline_setup = [t["total"] - t["loop"] - t["eval"] for t in res["seq1"]]
        ideal = s1 / cpus
        ratio, no_ray, workers = sw["wall"] / ideal, (sw["wall"] - ray_total) / ideal, cpu["workers"] / c1
        thread = sum(t["loop_cpu"] for t in sw["trials"]) / sum(t["loop_cpu"] for t in res["seq1"])
        headline.update({"ideal (s)": ideal, "sweep wall / ideal": ratio, "without Ray start/shutdown": no_ray,
                         "trial workers' CPU / inline CPU": workers, "training thread CPU, sweep / inline": thread,
                         "sweep wall / ideal ÷ training thread ratio": ratio / thread})
        rows += [
            {"what": "Σ trial time inline, 1 thread (back to back)", "s": f"{s1:.1f}"},
            {"what": "  (its CPU time: the compute, blind to other jobs)", "s": f"{c1:.1f}"},
            {"what": f"  ideal sweep wall = that / {cpus} cores", "s": f"{ideal:.1f}"},
            {"what": "  per-trial set-up inline (median)", "s": f"{median(inline_setup):.2f}"},
            {"what": "**sweep wall / ideal (goal ≤ 1.10)**", "s": f"**{ratio:.2f}**"},
            {"what": "  without Ray start/shutdown", "s": f"{no_ray:.2f}"},
            {"what": "sweep CPU s: trial workers + Ray system processes + driver",
             "s": f"{cpu['workers']:.1f} + {cpu['ray_system']:.1f} + {cpu['driver']:.1f}"},
            {"what": "**sweep CPU / Σ inline trial CPU (load-blind overhead)**",
             "s": f"**{(cpu['workers'] + cpu['ray_system'] + cpu['driver']) / c1:.2f}**"},
            {"what": "  trial workers' CPU / Σ inline trial CPU", "s": f"{workers:.2f}"},
            {"what": "    the training loop's own thread only (trainer's cpu_s), sweep / inline",
             "s": f"{thread:.2f}"},
            {"what": "sweep wall / ideal ÷ that thread ratio (the machine's speed in the sweep vs inline taken out)",
             "s": f"{ratio / thread:.2f}"},
            {"what": "  system-CPU share, minor page faults per trial: inline / sweep workers (imports included)",
             "s": f"{_usage_text(Usage.total([t['usage'] for t in res['seq1']]), len(res['seq1']))} / "
                  f"{_usage_text(cpu['workers_usage'], n)}"},
            {"what": "  a sweep trial / a trial inline at 1 thread (wall, medians; equal work)",
             "s": f"{median([t['total'] for t in sw['trials']]) / median([t['total'] for t in res['seq1']]):.2f}"},
        ]
        if res["par"] is not None:
            par = res["par"]
            cp = sum(t["cpu"] for t in par["trials"])
            par_ratio, vs_par = par["wall"] / ideal, sw["wall"] / par["wall"]
            headline.update({"by hand / ideal": par_ratio, "sweep / by hand": vs_par})
            rows += [
                {"what": f"by hand in parallel: a pool of {cpus} processes at 1 thread, no Ray/MLflow (wall)",
                 "s": f"{par['wall']:.1f}"},
                {"what": "  its wall / ideal (what the hardware allows)", "s": f"{par_ratio:.2f}"},
                {"what": "  its trials' CPU / Σ inline trial CPU (sharing caches and memory)", "s": f"{cp / c1:.2f}"},
                {"what": "  its system-CPU share, minor page faults per trial",
                 "s": _usage_text(Usage.total([t["usage"] for t in par["trials"]]), len(par["trials"]))},
                {"what": "**sweep wall / by hand in parallel**", "s": f"**{vs_par:.2f}**"},
            ]
        if res["seqn"]:
            sn = sum(t["total"] for t in res["seqn"])
            rows += [{"what": f"Σ trial time inline, {cpus} threads (by hand, back to back)", "s": f"{sn:.1f}"},
                     {"what": f"sweep wall / by hand at {cpus} threads", "s": f"{sw['wall'] / sn:.2f}"}]
        elif res["over"] is not None:
            rows.append({"what": f"by hand at {cpus} threads: skipped, {cpus} threads were {res['over']:.1f}x "
                                 "slower than 1 (other jobs hold the cores)", "s": ""})
    print(f"# {n} trials ({sw['errors']} failed), {sw['slots']} at a time, 1 CPU each")
    print(table(rows))
    return headline


def report_rounds(headlines: list[dict[str, float]]) -> None:
    """Print every round's headline figures side by side, with their medians and ranges."""
    rows = []
    for key in headlines[0]:
        xs = [h[key] for h in headlines]
        fmt = ".1f" if key.endswith("(s)") else ".3f"
        rows.append({"what": key, **{f"round {i + 1}": format(x, fmt) for i, x in enumerate(xs)},
                     "median [min–max]": spread(xs, fmt)})
    print(f"# all {len(headlines)} rounds")
    print(table(rows))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=150, help="tuning iterations per trial")
    ap.add_argument("--channels", type=int, default=16, help="network.model_channels (experiments' digits net)")
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs given to Ray (= trials at once)")
    ap.add_argument("--keep", action="store_true", help="keep the private project directory")
    ap.add_argument("--threaded", action="store_true", help="also run the trials back to back at --cpus threads")
    ap.add_argument("--no-parallel", action="store_true", help="skip the by-hand process-pool baseline")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole measurement; medians at the end")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    project = private_project()
    print_conditions(conditions(1))
    print(f"# project {project}; digits, model_channels {args.channels}, 1 block, batch 64, "
          f"{args.iterations} SCT iterations + one 500-sample 1- and 2-step FID per trial")
    try:
        headlines = []
        for r in range(args.rounds):
            if args.rounds > 1:
                print(f"## round {r + 1} of {args.rounds} (UTC {time.strftime('%H:%M', time.gmtime())}, "
                      f"load {load_average()})")
            res = measure(args.trials, args.iterations, args.channels, args.cpus, name=f"bench_overhead_{r}",
                          threaded=args.threaded, parallel=not args.no_parallel)
            headlines.append(report(res, args.cpus))
        if args.rounds > 1:
            report_rounds(headlines)
    finally:
        if not args.keep:
            remove_project(project)
    print(f"# load (after): {load_average()}")


if __name__ == "__main__":
    main()
