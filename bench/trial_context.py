"""Where a sweep trial's training time goes: the same trials in five contexts, from bare to the full runner.

    python bench/trial_context.py [--trials 4] [--iterations 300] [--channels 16] [--rounds 2]
                                  [--contexts inline,pool,ray task,tune,tune one arena,sweep]

The trials are bench/sweep_overhead.py's (digits SCT, fixed work, one evaluation at the end, seeds
0..N−1). Each context runs all of them, 2 at a time except the first; the figure per trial is the
trainer's own loop + evaluation time (`wall_s` + `eval_s`: no imports, no set-up), so the contexts
differ only in what runs around the training step:
1. inline — back to back in this process, 1 torch thread;
2. pool — a pool of 2 plain processes (spawn), no Ray;
3. ray task — 2 plain Ray tasks at a time in an embedded Ray (the trainer in the worker's main thread);
4. tune — a bare Ray Tune function trainable (the trainer in Tune's trial thread), no MLflow;
5. tune one arena — the same with MALLOC_ARENA_MAX=1 in Ray's processes (what the sweep used to set);
6. sweep — `sct_sweeps.runner.run_sweep`: Tune + MLflow SQLite logging + checkpoints + our trainable.
Each round runs the chosen `--contexts` in that order, rotated by one place per round (round 2
starts with the second), `--rounds` times (load drift shows as round-to-round spread).
Ratios are medians per context / median inline of the same round. Also per trial: how often the
training thread was preempted (involuntary context switches, Linux; not known for the sweep context).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import conditions, load_average, median, print_conditions, table
from sweep_overhead import private_project, remove_project, spec_dict

from trainer.config import TrainConfig

CONTEXTS = ("inline", "pool", "ray task", "tune", "tune one arena", "sweep")
_ARENA = os.environ.get("MALLOC_ARENA_MAX")  # the caller's own setting, restored outside "tune one arena"


def preemptions() -> int:
    """Involuntary context switches of the calling thread so far (Linux; 0 where /proc has none)."""
    try:
        status = Path(f"/proc/self/task/{threading.get_native_id()}/status").read_text()
    except OSError:
        return 0
    return next((int(x.split(":")[1]) for x in status.splitlines() if x.startswith("nonvoluntary_ctxt")), 0)


def train_seconds(cfg: TrainConfig) -> dict[str, float]:
    """Train `cfg` at 1 torch thread; the trainer's loop + evaluation seconds, and how often the
    training thread was preempted meanwhile."""
    import torch

    from trainer.train import train

    torch.set_num_threads(1)
    before = preemptions()
    m = train(cfg).metrics
    return {"seconds": float(m["wall_s"] + m["eval_s"]), "preempted": float(preemptions() - before)}


def _tune_trial(config: dict[str, Any]) -> None:
    """A bare Tune function trainable: train, report the trainer's seconds."""
    from ray import tune

    tune.report(train_seconds(TrainConfig.model_validate(config["cfg"])))


def run_context(name: str, cfgs: list[TrainConfig], raw: dict[str, Any], out: Path) -> list[dict[str, float]]:
    """Per-trial `train_seconds` of all `cfgs` in context `name` (2 at a time except inline)."""
    cfgs = [c.model_copy(update={"out_dir": out / name.replace(" ", "_") / f"s{c.seed}"}) for c in cfgs]
    if name == "inline":
        return [train_seconds(c) for c in cfgs]
    if name == "pool":
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(2) as pool:
            return pool.map(train_seconds, cfgs, chunksize=1)
    if name == "sweep":
        from ray.tune import ExperimentAnalysis

        from sct_sweeps.config import parse_spec
        from sct_sweeps.runner import Launch, run_sweep

        raw = {**raw, "name": f"{raw['name']}-{time.monotonic_ns()}"}
        outcome = run_sweep(parse_spec(raw, "bench"), launch=Launch(num_cpus=2, progress=False))
        results = [t.last_result for t in ExperimentAnalysis(outcome.record.results_dir).trials]
        return [{"seconds": float(r["wall_s"] + r["eval_s"]), "preempted": math.nan} for r in results]
    import ray
    from ray import tune

    from sct_sweeps.session import start_ray, stop_ray

    if name == "tune one arena":  # Ray's processes inherit this process's environment
        os.environ["MALLOC_ARENA_MAX"] = "1"
    start_ray(None, 2)
    try:
        if name == "ray task":
            task = ray.remote(num_cpus=1)(train_seconds)
            return ray.get([task.remote(c) for c in cfgs])
        tuner = tune.Tuner(
            tune.with_resources(_tune_trial, {"cpu": 1}),
            param_space={"cfg": tune.grid_search([c.model_dump(mode="json") for c in cfgs])},
            tune_config=tune.TuneConfig(reuse_actors=True),
            run_config=tune.RunConfig(storage_path=str(out / "tune"), verbose=0),
        )
        return [{k: float(r.metrics[k]) for k in ("seconds", "preempted")} for r in tuner.fit()]
    finally:
        stop_ray()
        os.environ.pop("MALLOC_ARENA_MAX", None)
        if _ARENA is not None:
            os.environ["MALLOC_ARENA_MAX"] = _ARENA


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=300, help="tuning iterations per trial")
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--contexts", default=",".join(CONTEXTS), help="comma-separated, from: " + ", ".join(CONTEXTS))
    args = ap.parse_args()
    contexts = [c.strip() for c in args.contexts.split(",")]
    unknown = sorted(set(contexts) - set(CONTEXTS))
    if unknown or "inline" not in contexts:
        ap.error(f"--contexts: unknown {unknown} or no inline (from: {', '.join(CONTEXTS)}; inline is the reference)")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    project = private_project()
    print_conditions(conditions(1))
    raw = spec_dict("bench_context", args.trials, args.iterations, args.channels)
    from sct_sweeps.config import parse_spec
    from trainer.config import override

    base = parse_spec(raw, "bench").base
    cfgs = [override(base, {"seed": s}) for s in range(args.trials)]
    seconds: dict[str, list[list[dict[str, float]]]] = {c: [] for c in contexts}
    try:
        for r in range(args.rounds):
            for name in contexts[r % len(contexts):] + contexts[: r % len(contexts)]:
                out = Path(tempfile.mkdtemp(prefix="ctx-", dir=project))
                seconds[name].append(run_context(name, cfgs, raw, out))
    finally:
        remove_project(project)
    def per_round(name: str, key: str) -> list[float]:
        return [median([t[key] for t in r]) for r in seconds[name]]

    inline = per_round("inline", "seconds")
    rows = []
    for name in contexts:
        secs, pre = per_round(name, "seconds"), per_round(name, "preempted")
        rows.append({
            "context": name,
            "s per trial (median), by round": " / ".join(f"{x:.2f}" for x in secs),
            "vs inline, by round": " / ".join(f"{x / i:.2f}" for x, i in zip(secs, inline, strict=True)),
            "preemptions per s of training, by round": " / ".join(
                "–" if math.isnan(p) else f"{p / x:.0f}" for p, x in zip(pre, secs, strict=True)),
        })
    print(f"# {args.trials} digits SCT trials × {args.iterations} iterations (model_channels {args.channels}); "
          f"trainer loop + evaluation seconds per trial; 2 at a time except inline; {args.rounds} rounds, "
          "order rotated each round")
    print(table(rows))
    print(f"# load (after): {load_average()}")


if __name__ == "__main__":
    main()
