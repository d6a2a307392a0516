"""`sct-sweep evaluate`: new sampling settings scored on a finished sweep's saved checkpoints, no training.

Every finished training of the sweep (a Ray trial and its runs, tag ``sct.training``) is evaluated under
every combination of the settings given (`--set sampler.eta=0,0.2,0.5`): at each checkpoint its trial
kept, with the same noise per seed as the sweep's own evaluations. Each combination becomes a variant
run in the sweep's experiment, under its parent run, tagged like the sweep's own variants (plus
``sct.evaluated_after``), with the FID history and the training's cost at those iterations — so Compare,
the report and the scaling fits take it in. Only evaluation-only settings (trainer/config.py EVAL_ONLY)
are accepted. A variant run that already holds every checkpoint's FID is skipped, so an interrupted
command picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from sct_sweeps import schema, tracking
from sct_sweeps.record import SweepRecord
from sct_sweeps.space import run_name, variant_config
from sct_sweeps.trial_checkpoints import RUN_FILE
from sct_sweeps.trial_tracker import TrialTracker
from sct_sweeps.variants import eval_axes, variant_key
from trainer.config import EVAL_ONLY, TrainConfig, is_eval_only, leaf_field
from trainer.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

COST = ("iteration", "images_seen", "flops", "wall_s", "n_params")  # the training's, copied at each step


def parse_sets(sets: Sequence[str], file: Path | None = None) -> dict[str, list[Any]]:
    """`path=v1,v2` options (and a YAML mapping path -> value or list) as path -> values; a path that is not
    an evaluation-only setting is refused with one line (ConfigError)."""
    grid: dict[str, list[Any]] = {}
    if file is not None:
        from trainer.yaml_io import read_yaml

        raw = read_yaml(file)
        if not isinstance(raw, dict):
            raise ConfigError(f"{file}: expected a mapping of setting -> values, e.g. sampler.eta: [0, 0.2]")
        grid.update({str(k): v if isinstance(v, list) else [v] for k, v in raw.items()})
    for item in sets:
        path, sep, values = item.partition("=")
        if not sep or not values:
            raise ConfigError(f"--set {item}: expected SETTING=VALUE[,VALUE...], e.g. sampler.eta=0,0.2")
        try:
            grid[path.strip()] = yaml.safe_load(f"[{values}]")
        except yaml.YAMLError:
            raise ConfigError(f"--set {item}: values are not a comma-separated list") from None
    if not grid:
        raise ConfigError("give at least one --set SETTING=VALUES (or --file), e.g. --set sampler.eta=0,0.2")
    for path, values in grid.items():
        why = leaf_field(path)
        if why is not None:
            raise ConfigError(f"--set {path}: {why}")
        if not is_eval_only(path) or path == "eval.variants":
            allowed = ", ".join(p for p in EVAL_ONLY if p != "eval.variants")
            raise ConfigError(f"--set {path}: a training setting; evaluate only changes how trained models are "
                              f"sampled and scored ({allowed}); run a sweep to train with it")
        if not values:
            raise ConfigError(f"--set {path}: no values")
    return grid


def combinations(grid: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    return [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]


@dataclasses.dataclass(frozen=True)
class Training:
    """A finished training of the sweep: its trial id, one of its runs, and its checkpoints by step."""

    trial_id: str
    run: Any
    checkpoints: dict[int, Path]


def trainings(client: Any, record: SweepRecord) -> list[Training]:
    """The sweep's finished trainings that still have checkpoints in the results directory."""
    runs = client.search_runs([record.experiment_id], schema.trial_runs_filter(record.parent_run_id),
                              max_results=10000)
    found: dict[str, Training] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        trial = run.data.tags.get(schema.TRAINING) or run.data.tags.get(schema.TRIAL_ID)
        if not trial or trial in found or run.info.status != "FINISHED" or run.data.tags.get(schema.EVALUATED_AFTER):
            continue
        ckpts = {}
        for d in (Path(record.results_dir) / trial).glob("checkpoint_*"):
            meta = d / RUN_FILE
            if meta.is_file() and (d / "state.pt").is_file():
                ckpts[int(json.loads(meta.read_text())["step"])] = d
        if ckpts:
            found[trial] = Training(trial, run, dict(sorted(ckpts.items())))
        else:
            log.warning("training %s has no checkpoint left in %s; skipped", trial, record.results_dir)
    return list(found.values())


def _variant_settings(cfg: TrainConfig, record: SweepRecord, given: Mapping[str, Any]) -> dict[str, Any]:
    """The variant's full identity: the sweep's own evaluation axes at this config's values, then `given`."""
    out: dict[str, Any] = {}
    for path in eval_axes(record.spec):
        node: Any = cfg
        for part in path.split("."):
            node = getattr(node, part)
        out[path] = node
    return {**out, **given}


def _tracker(record: SweepRecord, training: Training, cfg: TrainConfig, settings: dict[str, Any]) -> TrialTracker:
    tags = training.run.data.tags
    axes: dict[str, Any] = {k.removeprefix(schema.AXIS_PREFIX): v for k, v in tags.items()
                            if k.startswith(schema.AXIS_PREFIX)}
    axes.update(settings)
    params, path_tags = tracking.flatten(cfg)
    return TrialTracker(
        uri=record.tracking_uri, experiment_id=record.experiment_id, parent_run_id=record.parent_run_id,
        sweep=record.name, trial_id=training.trial_id, run_name=run_name(cfg, axes),
        tags={**{schema.axis_tag(p): str(v) for p, v in axes.items()}, **path_tags, schema.EVALUATED_AFTER: "true",
              schema.CHECKPOINT: str(training.checkpoints[max(training.checkpoints)])},
        params=params, lost_dir=Path(record.results_dir) / "mlflow_lost", variant=variant_key(settings),
    )


def _cost_at(client: Any, run_id: str, step: int) -> dict[str, float]:
    """The training's cost metrics logged at `step` (as its runs have them)."""
    out = {}
    for key in COST:
        values = [m.value for m in client.get_metric_history(run_id, key) if m.step == step]
        if values:
            out[key] = values[-1]
    return out


def score(
    checkpoint: Path, cfg: TrainConfig, step: int, device: str, work: Path,
) -> tuple[dict[str, float], list[Path]]:
    """The FID metrics of `cfg` (a variant's config) on the weights of `checkpoint`, as the trainer scores them."""
    from trainer.data import load_dataset
    from trainer.evaluate import Evaluator
    from trainer.train import build_model, check_classic_guidance, load_for_sampling

    ema, _, state = load_for_sampling(checkpoint, device)
    dev = next(ema.parameters()).device
    data = load_dataset(cfg.data, "train").to(dev)
    g = cfg.guidance
    if g.strength != 1.0 and g.mode == "classic":
        check_classic_guidance(checkpoint, state)
    elif g.strength != 1.0 and f"{g.bad_fraction:g}" not in (state.get("snapshots") or {}) and \
            step >= round(g.bad_fraction * cfg.iterations):
        kept = sorted(state.get("snapshots") or {})
        raise ConfigError(f"guidance.bad_fraction: {g.bad_fraction:g} was not kept by this training (EMA snapshots "
                          f"at {', '.join(kept) or 'none'}); choose one of those")
    online = build_model(cfg, data).to(dev)
    online.load_state_dict(state["model"])
    bad = build_model(cfg, data).to(dev).eval().requires_grad_(False)
    return Evaluator(cfg, data, dev)(ema, online.eval(), step, state.get("snapshots") or {}, bad, work)


def evaluate_variant(
    client: Any, record: SweepRecord, training: Training, given: Mapping[str, Any], device: str,
) -> str:
    """Evaluate one variant of one training at every kept checkpoint not yet in its run; what was done."""
    from trainer.checkpoint import load_checkpoint

    last = training.checkpoints[max(training.checkpoints)]
    trained = TrainConfig.model_validate_json(load_checkpoint(last / "state.pt")["config"])
    settings = _variant_settings(trained, record, given)
    cfg = variant_config(trained, settings)
    tracker = _tracker(record, training, cfg, settings)
    tracker.start()
    if tracker.run_id is None:
        raise CheckpointError(f"{record.tracking_uri}: MLflow store not reachable")
    have = {m.step for m in client.get_metric_history(tracker.run_id, f"fid_{cfg.sampler.steps[0]}step")}
    todo = [s for s in training.checkpoints if s not in have]
    with tempfile.TemporaryDirectory(prefix="sct-evaluate-") as work:
        for step in todo:
            metrics, grids = score(training.checkpoints[step] / "state.pt", cfg, step, device, Path(work))
            tracker.log_metrics({**_cost_at(client, training.run.info.run_id, step), **metrics}, step)
            for grid in grids:
                tracker.log_artifact(grid, schema.SAMPLES_DIR)
            tracker.flush(force=True)
    lost = tracker.finish("FINISHED")
    if lost:
        raise CheckpointError(f"{lost} MLflow entries of training {training.trial_id} were not delivered")
    return f"{tracker.run_name}: {len(todo)} checkpoint(s) scored" if todo else f"{tracker.run_name}: already done"


def evaluate_sweep(record: SweepRecord, grid: Mapping[str, list[Any]], device: str = "auto") -> list[str]:
    """Every combination of `grid` on every finished training of the sweep; a line per variant run."""
    client = tracking.client(record.tracking_uri)
    found = trainings(client, record)
    if not found:
        raise CheckpointError(f"sweep {record.name}: no finished training with a checkpoint in {record.results_dir}")
    return [evaluate_variant(client, record, t, given, device) for t in found for given in combinations(grid)]
