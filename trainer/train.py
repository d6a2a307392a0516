"""The training loop: phase one (EDM pretraining), phase two (ECT / SCT / iCT tuning), evaluation.

`train(cfg, reporter)` is the whole public entry point; `pretrain(cfg, path)` runs phase one alone
(the sweep shares its checkpoint between trials). Metrics leave through the `Reporter` only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from trainer.checkpoint import load_checkpoint, load_latest, save_checkpoint
from trainer.config import TrainConfig
from trainer.data import ImageDataset, dataset_std, load_dataset
from trainer.ema import Ema
from trainer.errors import CheckpointError, ConfigError, DivergenceError
from trainer.loss import consistency_loss, edm_loss, replays_dropout
from trainer.networks import build_network, count_parameters
from trainer.precond import ConsistencyModel
from trainer.runtime import autocast, configure_backend, resolve_device
from trainer.schedule import phase_edges, sample_t_r, stage
from trainer.target import reference_set

log = logging.getLogger(__name__)
ESS_BUCKETS = (0.1, 1.0, 10.0)  # t-bucket edges for the SCT effective-sample-size metric


class Reporter(Protocol):
    """Where metrics, checkpoints and artifacts go (Ray Tune + MLflow in a sweep, a log file alone)."""

    def report(self, step: int, metrics: Mapping[str, float], checkpoint_dir: Path | None = None) -> None: ...

    def log_artifact(self, path: Path) -> None: ...


class JsonlReporter:
    """Default reporter: appends metrics to `<out_dir>/metrics.jsonl` and logs them."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def report(self, step: int, metrics: Mapping[str, float], checkpoint_dir: Path | None = None) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        log.info("step %d %s", step, {k: round(float(v), 4) for k, v in metrics.items()})

    def log_artifact(self, path: Path) -> None:
        log.info("artifact %s", path)


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


def _batch(
    data: ImageDataset, b: int, conditional: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A minibatch without repeats on `device`: (indices, images, labels or None)."""
    idx = torch.randperm(len(data), device=data.images.device)[:b]
    x, labels = data.images[idx], (data.labels[idx] if conditional else None)
    if x.device != device:  # dataset kept on the host (data.on_device: false)
        x = x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)
        labels = labels.to(device) if labels is not None else None
    return idx.to(device), x, labels


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


def pretrain(cfg: TrainConfig, path: Path, reporter: Reporter | None = None) -> Path:
    """Phase one: EDM diffusion pretraining (docs/algorithms.md §2) into checkpoint file `path` (EMA weights).

    Checkpoints as it goes (`<path>.partial`), so an interrupted pretrain continues where it stopped.
    """
    path = Path(path)
    if path.is_file():
        return path
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    configure_backend(device)
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
        _, x, labels = _batch(data, p.batch_size, cfg.data.conditional, device)
        with autocast(device, cfg.precision):
            out = edm_loss(model, x, labels, p.p_mean, p.p_std)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        ema.update(model, it)
        loss_sum += out.loss.detach()
        done = it + 1
        if done % cfg.log_every == 0 or done == p.iterations:
            loss = float(loss_sum) / cfg.log_every
            if not torch.isfinite(torch.tensor(loss)):
                raise DivergenceError(f"pretrain loss became {loss} at iteration {done}; lower pretrain.lr")
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
    """Initialise the model from a pretrain checkpoint (EMA weights of phase one)."""
    state = load_checkpoint(path, next(model.parameters()).device)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path}: does not match this network config ({str(e).splitlines()[0]})") from None


def _ess_metrics(ess_sum: torch.Tensor, ess_cnt: torch.Tensor) -> dict[str, float]:
    mean = (ess_sum / ess_cnt.clamp_min(1)).tolist()
    return {f"ess_t{j}": v for j, (v, c) in enumerate(zip(mean, ess_cnt.tolist(), strict=True)) if c > 0}


def _clock() -> tuple[float, float]:
    """Wall seconds and this thread's CPU seconds now."""
    return time.perf_counter(), time.thread_time()


def _add_segment(cost: dict[str, float], since: tuple[float, float]) -> None:
    """Add the training-loop time since `since` (a `_clock()`) to `cost`'s wall_s and cpu_s."""
    wall, cpu = _clock()
    cost["wall_s"] += wall - since[0]
    cost["cpu_s"] += cpu - since[1]


def train(cfg: TrainConfig, reporter: Reporter | None = None, resume_from: Path | None = None) -> TrainResult:
    """Run one training: pretrain (unless given or method is edm), tune for `cfg.iterations`, evaluate.

    `resume_from` is a checkpoint directory written by an earlier call (holding `state.pt`).
    Raises DivergenceError when the loss becomes NaN/inf.
    """
    from trainer.evaluate import Evaluator

    out_dir = Path(cfg.out_dir).absolute()
    reporter = reporter or JsonlReporter(out_dir)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    configure_backend(device)
    data = _load_data(cfg, device)
    if cfg.method == "sct" and isinstance(cfg.sct.ref_batch, int) and cfg.sct.ref_batch > len(data):
        raise ConfigError(f"sct.ref_batch: {cfg.sct.ref_batch} is larger than the {cfg.data.name} training set "
                          f"({len(data)} images); use a smaller value or 'all'")
    model = build_model(cfg, data).to(device)
    n_params = count_parameters(model.net)
    tuning = cfg.method != "edm"

    if tuning and cfg.pretrain.checkpoint is not None:
        load_pretrained(model, cfg.pretrain.checkpoint)
    elif tuning and cfg.pretrain.iterations > 0 and cfg.method != "ict":  # iCT trains from scratch
        load_pretrained(model, pretrain(cfg, out_dir / "pretrain.pt"))

    lr, betas = cfg.optim.lr, cfg.optim.betas
    opt_cls = torch.optim.RAdam if cfg.optim.name == "radam" else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=lr, betas=betas)
    ema = Ema(model, cfg.ema.beta, cfg.ema.warmup)
    snapshots: dict[str, dict[str, torch.Tensor]] = {}
    # wall_s / cpu_s: the training loop's wall time and its thread's CPU time (blind to other jobs)
    start, cost = 0, {"flops": 0.0, "wall_s": 0.0, "cpu_s": 0.0, "eval_s": 0.0}
    flops_per_step: float | None = None

    if resume_from is not None:
        state_path, state = load_latest([Path(resume_from) / "state.pt"], device)
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start, cost = int(state["iteration"]), {**cost, **state["cost"]}  # older checkpoints lack cpu_s
        snapshots = dict(state["snapshots"])
        flops_per_step = state.get("flops_per_step")
        _set_rng_state(state["rng"])
        log.info("resumed at iteration %d from %s", start, state_path)

    if cfg.compile:
        model.net.compile()  # in place: checkpoint keys keep their names
    replay = replays_dropout(device, cfg.compile)  # the target pass reuses the prediction's dropout masks
    evaluator: Evaluator | None = None  # built at the first evaluation (loads the feature network)
    snap_at = {round(f * cfg.iterations): f"{f:g}" for f in cfg.guidance.snapshot_fractions}
    bad_key = f"{cfg.guidance.bad_fraction:g}"
    bad_model = build_model(cfg, data).to(device).eval().requires_grad_(False)
    history: list[dict[str, float]] = []
    last_ckpt: Path | None = None
    metrics: dict[str, float] = {}

    def checkpoint(done: int) -> Path:
        d = out_dir / "checkpoints" / f"it{done:07d}"
        save_checkpoint(d / "state.pt", {
            "model": model.state_dict(), "ema": ema.model.state_dict(), "opt": opt.state_dict(),
            "iteration": done, "cost": cost, "snapshots": snapshots, "rng": _rng_state(),
            "flops_per_step": flops_per_step, "config": cfg.model_dump_json(), "params": n_params,
        })
        for old in sorted((out_dir / "checkpoints").glob("it*"))[:-2]:  # keep the newest two
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        return d

    def evaluate(done: int) -> None:
        nonlocal last_ckpt, metrics, evaluator
        evaluator = evaluator or Evaluator(cfg, data, device)
        guide = None
        if bad_key in snapshots:
            bad_model.load_state_dict(snapshots[bad_key])
            guide = bad_model
        t0 = time.perf_counter()
        fid, grids = evaluator(ema.model, model, done, guide, out_dir)
        cost["eval_s"] += time.perf_counter() - t0
        last_ckpt = checkpoint(done)
        metrics = {"iteration": done, "images_seen": done * batch, **cost, **fid}
        history.append(metrics)
        reporter.report(done, metrics, last_ckpt)
        for g in grids:
            reporter.log_artifact(g)

    batch = cfg.optim.batch_size
    if start == 0:
        reporter.report(0, {"params": n_params, "data_std": dataset_std(data)})
        if cfg.eval.at_start:
            evaluate(0)
    ess_sum = torch.zeros(len(ESS_BUCKETS) + 1, device=device)
    ess_cnt = torch.zeros_like(ess_sum)
    loss_sum = torch.zeros((), device=device)
    edges = torch.tensor(ESS_BUCKETS, device=device)

    def step(it: int) -> None:
        nonlocal loss_sum
        idx, x, labels = _batch(data, batch, cfg.data.conditional, device)
        with autocast(device, cfg.precision):
            if not tuning:
                out = edm_loss(model, x, labels, cfg.pretrain.p_mean, cfg.pretrain.p_std)
            else:
                t, r = sample_t_r(batch, it, cfg.iterations, cfg.stage_iters, cfg.method, cfg.schedule, cfg.ict,
                                  cfg.precond.sigma_min, cfg.precond.sigma_max, device)
                refs = valid = None
                if cfg.method == "sct":
                    refs, valid, _ = reference_set(x, idx, data.images, cfg.sct.ref_batch, labels,
                                                   data.labels if cfg.data.conditional else None)
                out = consistency_loss(model, x, labels, t, r, cfg.loss, cfg.method, refs, valid,
                                       cfg.precond.sigma_min, replay_dropout=replay)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        for g in grads:  # non-finite gradients become 0 before the step (ECT)
            torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
        if cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        loss_sum += out.loss.detach()
        if out.ess is not None:
            bucket = torch.bucketize(out.t, edges)
            ess_sum.index_add_(0, bucket, out.ess.float())
            ess_cnt.index_add_(0, bucket, torch.ones_like(out.ess, dtype=torch.float32))

    seg = _clock()  # start of the current training-loop segment (evaluations are not in wall_s / cpu_s)
    for it in range(start, cfg.iterations):
        if flops_per_step is None:
            from trainer.metrics.flops import count_flops

            flops_per_step = float(count_flops(lambda it=it: step(it)))
            log.info("training FLOPs per step: %.3g", flops_per_step)
        else:
            step(it)
        ema.update(model, it)
        done = it + 1
        cost["flops"] += flops_per_step
        if done in snap_at:  # EMA snapshots for SCT's guidance (docs/algorithms.md §4.5)
            snapshots[snap_at[done]] = {k: v.detach().clone() for k, v in ema.model.state_dict().items()}
        if done % cfg.log_every == 0 or done == cfg.iterations:
            loss = float(loss_sum) / ((done - 1) % cfg.log_every + 1)
            if not torch.isfinite(torch.tensor(loss)):
                raise DivergenceError(f"{cfg.method} loss became {loss} at iteration {done}; lower optim.lr "
                                      "or check the data")
            loss_sum.zero_()
            _add_segment(cost, seg)
            seg = _clock()
            logged: dict[str, Any] = {"loss": loss, "iteration": done, "images_seen": done * batch, **cost}
            if tuning and cfg.method != "ict":
                logged["stage"] = stage(it, cfg.stage_iters, cfg.schedule.smooth)
            logged.update(_ess_metrics(ess_sum, ess_cnt))
            ess_sum.zero_()
            ess_cnt.zero_()
            reporter.report(done, logged)
        if done % cfg.eval.every == 0 or done == cfg.iterations:
            _add_segment(cost, seg)
            evaluate(done)
            seg = _clock()
        elif done % cfg.checkpoint_every == 0:
            last_ckpt = checkpoint(done)
    if start >= cfg.iterations and not history:
        evaluate(cfg.iterations)
    return TrainResult(metrics=metrics, checkpoint_dir=last_ckpt, iterations=cfg.iterations, params=n_params,
                       history=history)


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
