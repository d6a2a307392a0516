"""The training loop: phase one (EDM pretraining), phase two (ECT / SCT / iCT tuning), evaluation.

`train(cfg, reporter)` is the whole public entry point; `pretrain(cfg, path)` runs phase one alone
(the sweep shares its checkpoint between trials). Metrics leave through the `Reporter` only.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import load_checkpoint, load_latest, save_checkpoint
from trainer.config import TrainConfig
from trainer.data import ImageDataset, dataset_std, load_dataset
from trainer.distributed import World, broadcast_module, current_world, local_device
from trainer.edm_pickle import is_edm_pickle, load_pretrained_pickle, pretrained_config
from trainer.ema import Ema
from trainer.errors import CheckpointError, ConfigError, DivergenceError
from trainer.fingerprint import needs_pretrain
from trainer.loss import edm_loss, replays_dropout
from trainer.networks import build_network, count_parameters
from trainer.precond import ConsistencyModel
from trainer.reporting import JsonlReporter, Reporter, SilentReporter
from trainer.runtime import autocast, configure_backend, resolve_device
from trainer.schedule import phase_edges, stage
from trainer.step import LossStats, TrainState, draw_batch, make_optimizer, train_step, training_labels

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run leaves: last metrics, last checkpoint directory, iterations done."""

    metrics: dict[str, float]
    checkpoint_dir: Path | None
    iterations: int
    params: int
    history: list[dict[str, float]] = field(default_factory=list)


def build_model(cfg: TrainConfig, data: ImageDataset) -> ConsistencyModel:
    """U-Net + EDM preconditioning for this dataset (phase edges when `sct.phases` > 1)."""
    c, h, _ = data.shape
    net = build_network(cfg.network, h, c, data.num_classes if cfg.data.conditional else 0)
    edges = None
    if cfg.sct.phases > 1:
        edges = phase_edges(cfg.sct.phases, cfg.precond.sigma_min, cfg.precond.sigma_max, cfg.sampler.rho)
    return ConsistencyModel(net, cfg.precond, edges)


def _load_data(cfg: TrainConfig, device: torch.device) -> ImageDataset:
    data = load_dataset(cfg.data, "train")
    log.info("data std %.3f (sigma_data setting %.3f)", dataset_std(data), cfg.precond.sigma_data)
    return data.to(device) if cfg.data.on_device else data


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Mapping[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _check_finite(loss: float, where: str, done: int, advice: str) -> None:
    if not torch.isfinite(torch.tensor(loss)):
        raise DivergenceError(f"{where} loss became {loss} at iteration {done}; {advice}")


def pretrain(cfg: TrainConfig, path: Path, reporter: Reporter | None = None) -> Path:
    """Phase one: EDM diffusion pretraining (docs/algorithms.md §2) into checkpoint file `path` (EMA weights).

    Checkpoints as it goes (`<path>.partial`), so an interrupted pretrain continues where it stopped.
    """
    path = Path(path)
    if path.is_file():
        return path
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    configure_backend(device, cfg.precision)
    data = _load_data(cfg, device)
    model = build_model(cfg, data).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.pretrain.lr)
    ema = Ema(model, beta=0.999, warmup=True)
    partial = path.with_name(path.name + ".partial")
    start = 0
    if partial.is_file():
        state = load_checkpoint(partial, device)
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start = int(state["iteration"])
        _set_rng_state(state["rng"])
        log.info("pretrain resumes at iteration %d from %s", start, partial)
    p = cfg.pretrain
    t0, loss_sum = time.perf_counter(), torch.zeros((), device=device)
    for it in range(start, p.iterations):
        batch = draw_batch(data, p.batch_size, conditional=cfg.data.conditional, device=device)
        labels = training_labels(batch, cfg, data)
        with autocast(device, cfg.precision):
            out = edm_loss(model, batch.x, labels, p.p_mean, p.p_std)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        ema.update(model, it)
        loss_sum += out.loss.detach()
        done = it + 1
        if done % cfg.log_every == 0 or done == p.iterations:
            loss = float(loss_sum) / cfg.log_every
            _check_finite(loss, "pretrain", done, "lower pretrain.lr")
            loss_sum.zero_()
            log.info("pretrain it %d loss %.4f (%.1f s)", done, loss, time.perf_counter() - t0)
            if reporter is not None:
                reporter.report(done, {"pretrain_loss": loss, "wall_s": time.perf_counter() - t0})
        if done % cfg.checkpoint_every == 0 and done < p.iterations:
            save_checkpoint(partial, {"model": model.state_dict(), "ema": ema.model.state_dict(),
                                      "opt": opt.state_dict(), "iteration": done, "rng": _rng_state()})
    save_checkpoint(path, {"kind": "pretrain", "model": ema.model.state_dict(), "iteration": p.iterations,
                           "config": cfg.model_dump_json()})
    partial.unlink(missing_ok=True)
    log.info("pretrained %d iterations in %.0f s -> %s", p.iterations, time.perf_counter() - t0, path)
    return path


def load_pretrained(model: ConsistencyModel, path: Path) -> None:
    """Initialise the model from a pretrain checkpoint (EMA weights of phase one) or an EDM/EDM2 pickle."""
    if is_edm_pickle(path):
        return load_pretrained_pickle(model, path)
    state = load_checkpoint(path, next(model.parameters()).device)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path}: does not match this network config ({str(e).splitlines()[0]})") from None


def _clock() -> tuple[float, float]:
    """Wall seconds and this thread's CPU seconds now."""
    return time.perf_counter(), time.thread_time()


def _add_segment(cost: dict[str, float], since: tuple[float, float]) -> None:
    """Add the training-loop time since `since` (a `_clock()`) to `cost`'s wall_s and cpu_s."""
    wall, cpu = _clock()
    cost["wall_s"] += wall - since[0]
    cost["cpu_s"] += cpu - since[1]


@dataclass
class Run:
    """What one call of `train()` works with, besides the `TrainState` its checkpoints hold."""

    cfg: TrainConfig
    device: torch.device
    data: ImageDataset
    out_dir: Path
    reporter: Reporter
    state: TrainState
    n_params: int
    replay: bool  # the target pass reuses the prediction's dropout masks
    bad_model: ConsistencyModel  # holds the guidance snapshot at evaluation time
    world: World
    evaluator: Any = None  # trainer.evaluate.Evaluator, built at the first evaluation (loads the feature net)
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    last_ckpt: Path | None = None
    snap_at: dict[int, str] = field(default_factory=dict)  # iteration -> guidance snapshot key (`0.5`)


def _check_ref_batch(cfg: TrainConfig, data: ImageDataset) -> None:
    if cfg.method == "sct" and isinstance(cfg.sct.ref_batch, int) and cfg.sct.ref_batch > len(data):
        raise ConfigError(f"sct.ref_batch: {cfg.sct.ref_batch} is larger than the {cfg.data.name} training set "
                          f"({len(data)} images); use a smaller value or 'all'")


def _check_world(cfg: TrainConfig, world: World, pretraining: bool) -> None:
    if world.size == 1:
        return
    if cfg.optim.batch_size % world.size:
        raise ConfigError(f"optim.batch_size: {cfg.optim.batch_size} (the global batch) must divide evenly over "
                          f"{world.size} workers")
    if pretraining:
        raise ConfigError("pretrain.checkpoint: a run on several workers tunes from a finished phase one; pretrain "
                          "first (python -m trainer --pretrain-only, or a sweep's shared pretraining)")


def _start(cfg: TrainConfig, reporter: Reporter | None, resume_from: Path | None) -> Run:
    """Seed, device, data, the model (from phase one unless resuming), optimiser, EMA; restore a checkpoint."""
    cfg = pretrained_config(cfg)  # an EDM/EDM2 pickle as pretrain.checkpoint brings its network
    out_dir, world = Path(cfg.out_dir).absolute(), current_world()
    tuning = cfg.method != "edm"
    _check_world(cfg, world, needs_pretrain(cfg))
    torch.manual_seed(cfg.seed)
    device = local_device(resolve_device(cfg.device), world)
    configure_backend(device, cfg.precision)
    data = _load_data(cfg, device)
    _check_ref_batch(cfg, data)
    model = build_model(cfg, data).to(device)
    if tuning and cfg.pretrain.checkpoint is not None:
        load_pretrained(model, cfg.pretrain.checkpoint)
    elif needs_pretrain(cfg):
        load_pretrained(model, pretrain(cfg, out_dir / "pretrain.pt"))
    broadcast_module(model, world)  # identical weights on every rank from the first step
    state = TrainState(model, make_optimizer(cfg, model), Ema(model, cfg.ema.beta, cfg.ema.warmup))
    if resume_from is not None:
        state_path, saved = load_latest([Path(resume_from) / "state.pt"], device)
        state.load_state_dict(saved)
        _set_rng_state(saved["rng"])
        log.info("resumed at iteration %d from %s", state.iteration, state_path)
    if cfg.compile:
        model.net.compile()  # in place: checkpoint keys keep their names
    bad_model = build_model(cfg, data).to(device).eval().requires_grad_(False)
    if not world.is_main and not getattr(reporter, "every_rank", False):
        reporter = SilentReporter()
    return Run(cfg=cfg, device=device, data=data, out_dir=out_dir, reporter=reporter or JsonlReporter(out_dir),
               state=state, n_params=count_parameters(model.net), replay=replays_dropout(device, cfg.compile),
               bad_model=bad_model, world=world,
               snap_at={round(f * cfg.iterations): f"{f:g}" for f in cfg.snapshot_fractions_kept})


def save_state(run: Run, done: int) -> Path:
    """Checkpoint directory `checkpoints/it<done>` (atomic `state.pt`, rank 0 only); keeps the newest two."""
    d = run.out_dir / "checkpoints" / f"it{done:07d}"
    if not run.world.is_main:
        return d
    cfg = run.cfg
    save_checkpoint(d / "state.pt", {**run.state.state_dict(), "rng": _rng_state(), "config": cfg.model_dump_json(),
                                     "params": run.n_params,
                                     "label_dropout": cfg.guidance.label_dropout_rate(cfg.data.conditional)})
    prune_checkpoints(d.parent, done)
    return d


def prune_checkpoints(root: Path, done: int) -> None:
    """Keep the newest two checkpoints `it<i>` with i ≤ `done`. Newer ones are stale — left by an earlier
    attempt that got further than the checkpoint this one resumed from — and go too: sorted with them, the
    checkpoint just written could be the one dropped."""
    dirs = [d for d in root.glob("it*") if d.name[2:].isdigit()]
    current = sorted((d for d in dirs if int(d.name[2:]) <= done), key=lambda d: int(d.name[2:]))
    for old in [d for d in dirs if int(d.name[2:]) > done] + current[:-2]:
        shutil.rmtree(old, ignore_errors=True)


def evaluate(run: Run, done: int) -> None:
    """FID of every configured sampler at iteration `done`, a checkpoint, and the report of both."""
    from trainer.evaluate import Evaluator

    run.evaluator = run.evaluator or Evaluator(run.cfg, run.data, run.device, run.world)
    state = run.state
    t0 = time.perf_counter()
    fid, grids = run.evaluator(state.ema.model, state.model, done, state.snapshots, run.bad_model, run.out_dir)
    state.cost["eval_s"] += time.perf_counter() - t0
    run.last_ckpt = save_state(run, done)
    run.metrics = {"iteration": done, "images_seen": done * run.cfg.optim.batch_size, **state.cost, **fid}
    run.history.append(run.metrics)
    run.reporter.report(done, run.metrics, run.last_ckpt)
    for g in grids:
        run.reporter.log_artifact(g)


def _report_loss(run: Run, stats: LossStats, it: int) -> None:
    """The loss, cost, stage and ESS of the steps since the last report."""
    cfg, done = run.cfg, it + 1
    loss, ess = stats.drain((done - 1) % cfg.log_every + 1, run.world)
    _check_finite(loss, cfg.method, done, "lower optim.lr or check the data")
    logged: dict[str, Any] = {"loss": loss, "iteration": done, "images_seen": done * cfg.optim.batch_size,
                              **run.state.cost}
    if cfg.method not in ("edm", "ict"):
        logged["stage"] = stage(it, cfg.stage_iters, cfg.schedule.smooth)
    logged.update(ess)
    run.reporter.report(done, logged)


def _step(run: Run, stats: LossStats, it: int) -> None:
    """One training step (its FLOPs counted at the first one), the EMA update and the guidance snapshots."""
    cfg, state = run.cfg, run.state

    def step() -> None:
        stats.add(train_step(cfg, state, run.data, it, device=run.device, replay=run.replay, world=run.world))

    if state.flops_per_step is None:  # of all ranks together
        from trainer.metrics.flops import count_flops

        state.flops_per_step = float(count_flops(step)) * run.world.size
        log.info("training FLOPs per step: %.3g", state.flops_per_step)
    else:
        step()
    state.ema.update(state.model, it)
    state.iteration = it + 1
    state.cost["flops"] += state.flops_per_step
    if state.iteration in run.snap_at:  # EMA snapshots for SCT's guidance (docs/algorithms.md §4.5)
        state.snapshots[run.snap_at[state.iteration]] = {k: v.detach().clone()
                                                     for k, v in state.ema.model.state_dict().items()}


def train(cfg: TrainConfig, reporter: Reporter | None = None, resume_from: Path | None = None) -> TrainResult:
    """Run one training: pretrain (unless given or method is edm), tune for `cfg.iterations`, evaluate.

    `resume_from` is a checkpoint directory written by an earlier call (holding `state.pt`).
    Raises DivergenceError when the loss becomes NaN/inf.
    """
    run = _start(cfg, reporter, resume_from)
    start = run.state.iteration
    if start == 0:
        run.reporter.report(0, {"n_params": run.n_params, "data_std": dataset_std(run.data)})
        if cfg.eval.at_start:
            evaluate(run, 0)
    stats = LossStats(run.device)
    seg = _clock()  # start of the current training-loop segment (evaluations are not in wall_s / cpu_s)
    for it in range(start, cfg.iterations):
        _step(run, stats, it)
        done = it + 1
        if done % cfg.log_every == 0 or done == cfg.iterations:
            _add_segment(run.state.cost, seg)
            seg = _clock()
            _report_loss(run, stats, it)
        if done % cfg.eval.every == 0 or done == cfg.iterations:
            _add_segment(run.state.cost, seg)
            evaluate(run, done)
            seg = _clock()
        elif done % cfg.checkpoint_every == 0:  # reported, so a sweep can restore from it (Ray's checkpoint)
            run.last_ckpt = save_state(run, done)
            run.reporter.report(done, {}, run.last_ckpt)
    if start >= cfg.iterations and not run.history:
        evaluate(run, cfg.iterations)
    return TrainResult(metrics=run.metrics, checkpoint_dir=run.last_ckpt, iterations=cfg.iterations,
                       params=run.n_params, history=run.history)


def check_classic_guidance(path: Path, state: Mapping[str, Any]) -> None:
    """Classic CFG mixes with the null label: refuse a checkpoint whose training never dropped labels to it
    (checkpoints older than label dropout carry no `label_dropout` and are refused too)."""
    if not state.get("label_dropout"):
        raise ConfigError(f"guidance.mode: classic needs a model trained with label dropout; {path} was trained "
                          "without it (its null label is untrained): use guidance.mode auto")


def train_rank(cfg_json: str, resume_from: Path | None = None) -> None:
    """One rank of a data-parallel run started by `trainer.distributed.spawn` (rank 0 prints the metrics)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = train(TrainConfig.model_validate_json(cfg_json), resume_from=resume_from)
    if current_world().is_main:
        print({k: round(v, 4) for k, v in result.metrics.items()}, flush=True)


def load_for_sampling(path: Path, device: str = "auto") -> tuple[ConsistencyModel, TrainConfig, dict[str, Any]]:
    """Load the EMA model of a checkpoint (file or directory with state.pt) with its config."""
    path = Path(path)
    state = load_checkpoint(path / "state.pt" if path.is_dir() else path)
    if "config" not in state:
        raise CheckpointError(f"{path}: not a sct-sweeps checkpoint (no config inside)")
    cfg = TrainConfig.model_validate_json(state["config"])
    dev = resolve_device(device)
    data = load_dataset(cfg.data, "train")
    model = build_model(cfg, data).to(dev)
    model.load_state_dict(state.get("ema", state["model"]))
    return model.eval(), cfg, state
