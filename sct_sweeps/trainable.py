"""One trial: its TrainConfig, its MLflow child run, and `trainer.train` with a Ray + MLflow reporter.

Runs inside a Ray worker whose working directory Ray has moved, so every path here is absolute.
Ray sets OMP_NUM_THREADS to the trial's CPUs and torch follows; nothing here changes thread counts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from sct_sweeps import schema, tracking
from sct_sweeps.config import SweepSpec
from sct_sweeps.errors import RecurringTrialError
from sct_sweeps.pretrain import cache_path, with_pretrain
from sct_sweeps.run_group import RunGroup
from sct_sweeps.space import run_name, swept_values, trial_config, variant_config
from sct_sweeps.stores import check_writable, is_local
from sct_sweeps.trial_checkpoints import RUN_FILE, Restore, final_checkpoint, prune_ray_checkpoints, restore_dir
from sct_sweeps.trial_tracker import TrialTracker
from sct_sweeps.variants import best_of, variant_key
from trainer.config import TrainConfig, override, split_variant_metric
from trainer.errors import ConfigError, DataError, DivergenceError
from trainer.fingerprint import needs_pretrain

log = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares (passed with `tune.with_parameters`, rebuilt on resume)."""

    spec: SweepSpec
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    pretrain_cache: str  # absolute
    results_dir: str  # absolute: <storage>/<sweep name>
    log_level: str = "WARNING"  # of the trial's loggers (the driver's level; INFO with --verbose)
    resources: Mapping[str, float] = dataclasses.field(default_factory=dict)  # {cpu, gpu} per trial / per worker


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def _megabytes(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()) / 2**20


def reaches_ray(metrics: Mapping[str, float], checkpoint_dir: Path | None) -> bool:
    """Whether a report goes to Ray too: evaluations (FID) and checkpoints; losses go to MLflow only."""
    return checkpoint_dir is not None or any(split_variant_metric(k)[1].startswith("fid_") for k in metrics)


class TuneReporter:
    """The trainer's Reporter: every report goes to MLflow (sent in batches); evaluations (with
    checkpoints) go to Ray too, after the batch is sent. `where` ({node_id, ...}) rides along in Ray's results.
    With evaluated variants, Ray's value of the sweep's `metric` is the best variant's (`mode`)."""

    def __init__(
        self, tracker: RunGroup, where: Mapping[str, str], metric: str = "", mode: str = "min",
        storage_dir: Path | None = None,
    ) -> None:
        self.tracker = tracker
        self.where = dict(where)
        self.metric, self.mode = metric, mode
        self.storage_dir = storage_dir  # the trial's directory in Ray's storage: its checkpoints are pruned there
        self.latest: dict[str, float] = {}  # last value of every metric: Ray results carry them all

    def report(self, step: int, metrics: Mapping[str, float], checkpoint_dir: Path | None = None) -> None:
        """Log `metrics` at `step` to MLflow; at an evaluation also report to Ray (with the checkpoint)."""
        values = numeric_metrics(metrics)
        self.latest.update(values)
        self.tracker.log_metrics(values, step)
        if not reaches_ray(values, checkpoint_dir):
            return
        per_variant = [v for k, v in self.latest.items() if k.endswith(f"/{self.metric}")] if self.metric else []
        if per_variant:
            self.latest[self.metric] = best_of(per_variant, self.mode)
        self.tracker.flush()  # everything up to a checkpoint is in MLflow before Ray has the checkpoint
        result: dict[str, Any] = {**self.latest, "iteration": step, **self.where}
        if any(not math.isfinite(v) for v in values.values()):
            log.warning("non-finite metric at step %d: %s", step, values)
        if checkpoint_dir is not None and self.storage_dir is not None:  # room for Ray's copy, and to spare
            check_writable(self.storage_dir, need_mb=3 * _megabytes(Path(checkpoint_dir)))
        if checkpoint_dir is not None:
            meta = {"run_id": self.tracker.run_id, "run_ids": self.tracker.run_ids, "trial_id": self.tracker.trial_id,
                    "step": step}
            (Path(checkpoint_dir) / RUN_FILE).write_text(json.dumps(meta))
        self.send(result, checkpoint_dir)
        if checkpoint_dir is not None and self.storage_dir is not None:
            prune_ray_checkpoints(self.storage_dir)

    def send(self, result: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """To Ray Tune (a one-process trial)."""
        from ray import tune

        ckpt = None if checkpoint_dir is None else tune.Checkpoint.from_directory(str(checkpoint_dir))
        tune.report(result, checkpoint=ckpt)

    def log_artifact(self, path: Path) -> None:
        """Sample grids and other files: to the trial's MLflow run; a grid `grid_<k>step_it<n>.png` also as
        MLflow image `samples_<k>step` at step n (the run page's step slider)."""
        path = Path(path)
        self.tracker.log_artifact(path, schema.SAMPLES_DIR if path.suffix == ".png" else None)
        if (m := schema.GRID_RE.search(path.name)) and m.group(2) is not None:
            self.tracker.log_image(path, key=f"samples_{m.group(1)}step", step=int(m.group(2)))


TRAINER_DIR = "trainer_out"  # <results>/<sweep>/trainer_out/<trial id>: the trainer's own files of each trial


def trainer_dir(ctx: SweepContext, trial_id: str) -> Path:
    """Where a trial's trainer writes (its pruned checkpoints, sample grids) and restores Ray's checkpoint:
    in the sweep's storage, outside Ray's trial directory — whose whole content Ray copies to storage, so
    the trainer's pruning would not reach the copies (every checkpoint of a trial piled up there)."""
    return Path(ctx.results_dir) / TRAINER_DIR / trial_id


def _record_checkpoint(tracker: RunGroup, ckpt: Path | None) -> None:
    """Tag the run with its final checkpoint directory; upload `state.pt` too when the store is a server
    (its artifacts are then reachable from any machine)."""
    if ckpt is None:
        log.warning("trial %s: no final checkpoint to record", tracker.trial_id)
        return
    tracker.set_tag(schema.CHECKPOINT, str(ckpt))
    if not is_local(tracker.uri):
        tracker.log_artifact(Path(ckpt) / "state.pt", schema.CHECKPOINT_DIR)


def setup_logging(ctx: SweepContext) -> None:
    """The trial process's loggers at the driver's level; MLflow HTTP calls fail fast."""
    logging.basicConfig(level=ctx.log_level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("ray.train").setLevel(max(logging.INFO, logging.getLevelName(ctx.log_level)))  # per-ckpt lines
    tracking.fail_fast_http()


def trial_cfg(ctx: SweepContext, config: dict[str, Any], out_dir: Path) -> TrainConfig:
    """The TrainConfig one trial trains (its Ray config merged into the base), writing to `out_dir`."""
    return override(trial_config(ctx.spec, config), {"out_dir": out_dir})


def planned_config(ctx: SweepContext, cfg: TrainConfig) -> TrainConfig:
    """`cfg` as it will train: with the shared phase-one checkpoint, and a given EDM/EDM2 pickle's network."""
    from trainer.edm_pickle import pretrained_config

    cache = Path(ctx.pretrain_cache)
    planned = override(cfg, {"pretrain.checkpoint": cache_path(cfg, cache)}) if needs_pretrain(cfg) else cfg
    return pretrained_config(planned)


def trial_runs(
    ctx: SweepContext,
    config: dict[str, Any],
    cfg: TrainConfig,
    *,
    trial_id: str,
    run_ids: Sequence[str | None],
    tags: Mapping[str, str],
) -> RunGroup:
    """The trackers of the trial's MLflow runs, one per evaluated variant (not opened yet): the run ids a
    checkpoint names reattach to them, else each run is found by trial id (and variant) or created."""
    spec = ctx.spec
    swept = swept_values(spec, config)
    planned = planned_config(ctx, cfg)  # as trained: with the shared phase one
    variants = cfg.eval.variants or [{}]
    trackers = []
    for k, variant in enumerate(variants):
        as_evaluated = variant_config(planned, variant) if variant else planned
        params, path_tags = tracking.flatten(as_evaluated)
        axes = {**swept, **variant}
        trackers.append(TrialTracker(
            uri=ctx.tracking_uri,
            experiment_id=ctx.experiment_id,
            parent_run_id=ctx.parent_run_id,
            sweep=spec.name,
            trial_id=trial_id,
            run_name=run_name(as_evaluated, axes),
            tags={**{schema.axis_tag(p): str(v) for p, v in axes.items()}, **path_tags, **tags},
            params=params,
            lost_dir=Path(ctx.results_dir) / "mlflow_lost",
            run_id=run_ids[k] if k < len(run_ids) else None,
            flush_every_s=spec.mlflow_flush_s,
            variant=variant_key(variant) if variant else None,
        ))
    return RunGroup(trackers)


def checkpoint_run_ids(meta: Mapping[str, Any]) -> list[str | None]:
    """The run ids a trial checkpoint's RUN_FILE names, one per variant (older files name one run)."""
    return list(meta.get("run_ids") or [meta.get("run_id")])


def finished_run(runs: RunGroup, cfg: TrainConfig) -> Any | None:
    """The trial's (lead) MLflow run if every variant's run already finished the whole budget (the driver
    died before Ray knew)."""
    found = runs.peek_all()
    if all(r is not None and r.info.status == "FINISHED" and r.data.metrics.get("iteration") == cfg.iterations
           for r in found):
        log.info("trial %s already finished in MLflow runs %s", runs.trial_id, [r.info.run_id for r in found])
        return found[0]
    return None


# Errors a retry meets again: the loss diverges from the same checkpoint with the same RNG state, a setting
# or the data is wrong. Ray's retries of such a trial end at once instead of training again.
RECURRING_ERRORS = (DivergenceError, ConfigError, DataError)


def _refuse_a_recurring_error(tracker: RunGroup) -> None:
    """End this attempt at once, FAILED with the same error, if an earlier one ended in a recurring error."""
    run = tracker.peek()
    recurring = run.data.tags.get(schema.RECURRING) if run is not None else None
    if recurring:
        tracker.set_tag(schema.NOT_RETRIED, "an earlier attempt ended in an error that recurs on every attempt")
        tracker.finish("FAILED", error=recurring, keep_details=True)  # error.txt: the first attempt's traceback
        raise RecurringTrialError(recurring)


def _log_configs(runs: RunGroup, planned: TrainConfig, workdir: Path) -> None:
    """Artifact `config.yaml` of each run: the resolved TrainConfig as trained and evaluated (its variant's)."""
    variants = planned.eval.variants or [{}]
    for k, (tracker, variant) in enumerate(zip(runs.trackers, variants, strict=True)):
        as_evaluated = variant_config(planned, variant) if variant else planned
        config_file = workdir / "configs" / f"v{k}" / schema.CONFIG_ARTIFACT
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(yaml.safe_dump(as_evaluated.model_dump(mode="json"), sort_keys=False))
        tracker.log_artifact(config_file)


def train_tracked(
    tracker: RunGroup,
    cfg: TrainConfig,
    *,
    ctx: SweepContext,
    reporter: Any,
    restore: Restore,
    tags: Mapping[str, str],
    workdir: Path,
) -> None:
    """Open (or reattach) the trial's MLflow run, tag it, train (files in `workdir`), record the final
    checkpoint, and end the run with how training ended."""
    from trainer.train import train

    planned = planned_config(ctx, cfg)
    tracker.start()
    for key, value in tags.items():  # of the latest attempt
        tracker.set_tag(key, value)
    _refuse_a_recurring_error(tracker)
    try:
        cfg = with_pretrain(cfg, Path(ctx.pretrain_cache))
        if cfg.pretrain.checkpoint is not None:
            tracker.set_tag(schema.PRETRAIN_CHECKPOINT, str(cfg.pretrain.checkpoint))
        if restore.path is not None:
            log.info("trial %s resumes from %s", tracker.trial_id, restore.path)
            tracker.set_tag(schema.RESUMED_FROM, str(restore.meta.get("step", "?")))
            if restore.skipped:
                tracker.set_tag(schema.SKIPPED_CHECKPOINTS, restore.skipped)
        _log_configs(tracker, planned, workdir)
        result = train(cfg, reporter=reporter, resume_from=restore.path)
        final = final_checkpoint(Path(ctx.results_dir) / tracker.trial_id, cfg.iterations)
        _record_checkpoint(tracker, final or result.checkpoint_dir)
    except SystemExit:  # Ray stopped the trial (scheduler decision or sweep end) inside tune.report
        tracker.set_tag(schema.STOPPED, "by scheduler")
        tracker.finish("FINISHED", finish_wait_s=30.0)
        raise
    except KeyboardInterrupt:
        tracker.finish("KILLED", error="interrupted", finish_wait_s=10.0)
        raise
    except BaseException as e:
        message = f"{type(e).__name__}: {e}".strip().splitlines()[0]
        if isinstance(e, RECURRING_ERRORS):  # the same seed and checkpoint bring it back: retrying is waste
            tracker.set_tag(schema.RECURRING, message)
        tracker.finish("FAILED", error=message, details=traceback.format_exc())
        raise
    shutil.rmtree(workdir / "resume", ignore_errors=True)  # Ray's checkpoint, copied here to resume from
    lost = tracker.finish("FINISHED")
    if lost:
        log.error("trial %s finished, but %d MLflow entries were not delivered (see above)", tracker.trial_id, lost)


def run_trial(config: dict[str, Any], ctx: SweepContext) -> None:
    """Ray Tune function trainable: train one TrainConfig, logging to its one MLflow child run
    (`resources.workers > 1`: as a Ray Train run of that many data-parallel workers, `dataparallel.py`)."""
    import ray
    from ray import tune

    if ctx.spec.resources.workers > 1:
        from sct_sweeps.dataparallel import run_workers

        run_workers(config, ctx)
        return
    setup_logging(ctx)
    check_writable(Path(ctx.results_dir))  # a disk filled by the sweep: fail at once, before copying a checkpoint
    trial_id = tune.get_context().get_trial_id()
    workdir = trainer_dir(ctx, trial_id)
    workdir.mkdir(parents=True, exist_ok=True)
    node_id = ray.get_runtime_context().get_node_id()
    restore = restore_dir(tune.get_checkpoint(), workdir)
    tags = {schema.NODE_ID: node_id}
    cfg = trial_cfg(ctx, config, workdir / "out")
    tracker = trial_runs(ctx, config, cfg, trial_id=trial_id, run_ids=checkpoint_run_ids(restore.meta), tags=tags)
    done = finished_run(tracker, cfg)
    if done is not None:  # hand Ray the result, train nothing
        final = final_checkpoint(Path(ctx.results_dir) / trial_id, cfg.iterations)
        result = {**done.data.metrics, "iteration": cfg.iterations, "node_id": node_id}
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(str(final)) if final else None)
        return
    reporter = TuneReporter(tracker, {"node_id": node_id}, ctx.spec.metric, ctx.spec.mode,
                            storage_dir=Path(ctx.results_dir) / trial_id)
    train_tracked(tracker, cfg, ctx=ctx, reporter=reporter, restore=restore, tags=tags, workdir=workdir)
