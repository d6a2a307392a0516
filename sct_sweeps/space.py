"""From a SweepSpec to what Ray Tune runs: param_space, searcher, scheduler, trial configs, the plan.

The param_space holds only the swept axes, keyed by dotted TrainConfig path; the base TrainConfig
travels beside it, and `trial_config` merges the two into the TrainConfig one trial trains.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Sequence
from typing import Any

from sct_sweeps.config import SweepSpec, absolute_paths
from sct_sweeps.pretrain import enumerate_configs
from sct_sweeps.variants import training_axes, variant_grid, variants_per_training
from trainer.config import TrainConfig, override

# Short labels for readable run names: sct-w32-it400-s0-ref64.
_LABELS = {
    "network.model_channels": "w",
    "iterations": "it",
    "seed": "s",
    "sct.ref_batch": "ref",
    "sampler.eta": "eta",
    "guidance.strength": "cfg",
    "schedule.mapping": "map",
    "schedule.q": "q",
    "schedule.k": "k",
    "schedule.b": "b",
    "schedule.double_every": "de",
    "optim.lr": "lr",
    "optim.batch_size": "bs",
}


# Grid axes whose larger values make a trial longer. A grid sweep walks them largest value first, so
# it ends on its cheapest trials: the slots finish close together instead of all but one idling
# beside a long last trial (longest-first scheduling; docs/benchmarks.md §2).
COST_AXES = ("iterations", "optim.batch_size", "network.model_channels", "network.num_blocks")


def largest_first(path: str, values: Sequence[Any]) -> list[Any]:
    """A grid axis's values in the order a sweep walks them: descending on a COST_AXES path."""
    if path not in COST_AXES:
        return list(values)
    try:
        return sorted(values, reverse=True)
    except TypeError:  # values that do not compare: keep the spec's order
        return list(values)


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Ray Tune param_space: one tune domain (or grid_search) per swept dotted path."""
    from ray import tune

    space: dict[str, Any] = {}
    for path, axis in training_axes(spec).items():
        kind = axis.kind
        if kind == "grid":
            space[path] = tune.grid_search(largest_first(path, axis.grid))
        elif kind == "choice":
            space[path] = tune.choice(list(axis.choice))
        elif kind == "uniform":
            space[path] = tune.uniform(*axis.uniform)
        elif kind == "loguniform":
            space[path] = tune.loguniform(*axis.loguniform)
        else:
            space[path] = tune.randint(*axis.randint)
    return space


def swept_values(spec: SweepSpec, config: dict[str, Any]) -> dict[str, Any]:
    """The swept axes' values in a trial's Ray config (other keys ignored)."""
    return {p: config[p] for p in spec.search if p in config}


def trial_config(spec: SweepSpec, flat_params: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of one trial: the base with the trial's dotted-path values and the variants it
    evaluates (`eval.variants`, sct_sweeps/variants.py), paths absolute."""
    variants = variant_grid(spec)
    extra = {"eval.variants": variants} if variants else {}
    return absolute_paths(override(spec.base, {**swept_values(spec, flat_params), **extra}))


def variant_config(cfg: TrainConfig, variant: dict[str, Any]) -> TrainConfig:
    """The config one variant of training `cfg` is evaluated with (as a trial of its own would be)."""
    return override(cfg, {"eval.variants": [], **variant})


def run_name(cfg: TrainConfig, swept: dict[str, Any]) -> str:
    """Readable trial name: method, width, budget, seed, then the other swept axes (`sct-w32-it400-s0`)."""
    parts = [cfg.method, f"w{cfg.network.model_channels}", f"it{cfg.iterations}", f"s{cfg.seed}"]
    for path, value in swept.items():
        if path in ("network.model_channels", "iterations", "seed"):
            continue
        label = _LABELS.get(path, path.rsplit(".", 1)[-1])
        text = f"{value:.3g}" if isinstance(value, float) else str(value).replace(" ", "")
        parts.append(f"{label}{text}")
    return "-".join(parts)


def search_alg(spec: SweepSpec) -> Any:
    """OptunaSearch (TPE, seeded by base.seed) for `algorithm: optuna`; None (Ray's grid/random) else."""
    if spec.algorithm != "optuna":
        return None
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    sampler = optuna.samplers.TPESampler(seed=spec.base.seed)
    return OptunaSearch(metric=spec.metric, mode=spec.mode, sampler=sampler)


def scheduler(spec: SweepSpec) -> Any:
    """ASHA early stopping on the spec's metric, or None (FIFO: every trial runs its budget)."""
    if spec.scheduler.type != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    s = spec.scheduler
    return ASHAScheduler(
        time_attr=s.time_attr,
        metric=spec.metric,
        mode=spec.mode,
        max_t=s.max_t or spec.max_iterations(),
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _axis_mean(spec: SweepSpec, path: str, fn: Any, default: float) -> float:
    """Expected fn(value) over the axis at `path` (uniform over listed values / the range's ends)."""
    axis = spec.search.get(path)
    if axis is None:
        return fn(default)
    if axis.kind in ("grid", "choice"):
        return _mean([fn(v) for v in (axis.grid or axis.choice)])
    return _mean([fn(v) for _, v in axis.probe_values()])


@dataclasses.dataclass
class Plan:
    """What a sweep will run, and an estimate of what it costs."""

    trials: int  # trainings: Ray trials
    pretrains: int
    pretrains_complete: bool  # False: a continuous axis on a pretraining field adds some in trials
    cpu: float  # per worker
    gpu: float | str  # per worker
    concurrency: int
    tuning_iterations: float  # expected total over all trials
    pretrain_iterations: int
    est_compute_s: float | None  # sum over trials and pretraining, one trial's resources each
    est_wall_s: float | None  # compute / concurrency (an estimate: no startup, no stragglers)
    pretrained_from: str | None = None  # every trial starts from this given checkpoint (no phase one)
    workers: int = 1  # data-parallel processes per trial (Ray Train when > 1)
    placement: str = "pack"
    variants: int = 1  # evaluated variants per training (evaluation-only grid axes)

    def lines(self) -> list[str]:
        """Human-readable plan, one fact a line."""
        more = "" if self.pretrains_complete else " (+ any from continuous axes, built in trials)"
        pretraining = f"distinct pretrainings: {self.pretrains}{more} ({self.pretrain_iterations} iterations)"
        if self.pretrained_from is not None:
            pretraining = f"pretraining: from {self.pretrained_from} (0 iterations, 0 h)"
        out = [
            f"trainings: {self.trials}, evaluated variants: {self.trials * self.variants}",
            pretraining,
            f"resources per trial: {self.resources_text()}; up to {self.concurrency} at a time",
            f"tuning iterations (expected total): {self.tuning_iterations:.0f}",
        ]
        if self.est_compute_s is None:
            out.append("cost estimate: none (add `estimate: {it_per_s: ...}` measured on this machine)")
        else:
            out.append(
                f"cost estimate: ~{self.est_compute_s / 60:.1f} trial-minutes, "
                f"~{self.est_wall_s / 60:.1f} min wall (estimate; excludes Ray/worker startup)"
            )
        return out

    def resources_text(self) -> str:
        """`1 CPU, auto GPU`, or for several workers `2 workers x (1 CPU, 0 GPU), placement pack`."""
        each = f"{self.cpu:g} CPU, {self.gpu} GPU"
        return each if self.workers == 1 else f"{self.workers} workers x ({each}), placement {self.placement}"


def trial_cpus(spec: SweepSpec) -> float:
    """CPUs one trial holds: its workers' together."""
    return spec.resources.cpu * spec.resources.workers


def trial_count(spec: SweepSpec) -> int:
    """Number of trials: grid points x num_samples for grid, num_samples for Optuna."""
    if spec.algorithm == "optuna":
        return spec.num_samples
    grids = [len(a.grid) for a in training_axes(spec).values() if a.kind == "grid"]
    return math.prod(grids) * spec.num_samples


def plan(spec: SweepSpec, total_cpus: float | None = None) -> Plan:
    """The trial plan of `spec` on a machine (or cluster) with `total_cpus` CPUs (default: this one)."""
    n = trial_count(spec)
    cpus = total_cpus or float(os.cpu_count() or 1)
    concurrency = max(1, min(n, int(cpus // trial_cpus(spec)), spec.max_concurrent_trials or n))
    iters = _axis_mean(spec, "iterations", float, spec.base.iterations)
    pre_cfgs, complete = enumerate_configs(spec)
    pre_iters = sum(c.pretrain.iterations for c in pre_cfgs)
    est = spec.estimate
    compute = wall = None
    if est is not None:

        def rel(c: Any) -> float:
            return (float(c) / est.at_channels) ** est.width_exponent

        width = _axis_mean(spec, "network.model_channels", rel, spec.base.network.model_channels)
        tune_s = n * iters * width / est.it_per_s
        pre_rate = est.pretrain_it_per_s or est.it_per_s
        pre_s = sum(c.pretrain.iterations * rel(c.network.model_channels) / pre_rate for c in pre_cfgs)
        compute = tune_s + pre_s
        wall = tune_s / concurrency + pre_s / max(1, min(len(pre_cfgs), int(cpus // spec.resources.cpu)))
    return Plan(
        trials=n,
        pretrains=len(pre_cfgs),
        pretrains_complete=complete,
        cpu=spec.resources.cpu,
        gpu=spec.resources.gpu,
        concurrency=concurrency,
        tuning_iterations=n * iters,
        pretrain_iterations=pre_iters,
        est_compute_s=compute,
        est_wall_s=wall,
        pretrained_from=_given_checkpoint(spec),
        workers=spec.resources.workers,
        placement=spec.resources.placement,
        variants=variants_per_training(spec),
    )


def _given_checkpoint(spec: SweepSpec) -> str | None:
    """The base's pretrain.checkpoint when no axis varies it and every trial tunes from it."""
    given = spec.base.pretrain.checkpoint
    if given is None or "pretrain.checkpoint" in spec.search or spec.base.method not in ("ect", "sct"):
        return None
    return str(given)


def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every combination of the grid axes (the grid a grid sweep walks, once)."""
    grids = {p: a.grid for p, a in training_axes(spec).items() if a.kind == "grid"}
    return [dict(zip(grids, combo, strict=True)) for combo in itertools.product(*grids.values())]
