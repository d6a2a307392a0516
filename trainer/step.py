"""One training step: draw a minibatch, compute the phase's loss, update the weights.

`TrainState` is what a checkpoint holds (weights, optimiser, EMA, guidance snapshots, cost, position);
`train_step` is the step `train()` runs and the benchmarks time. Formulas: docs/algorithms.md §2
(EDM), §3 (ECT), §4 (SCT), §6 (iCT); label dropout for classic guidance: §4.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from trainer.config import TrainConfig
from trainer.data import ImageDataset
from trainer.distributed import World, all_sum, average_gradients, own_dropout_stream
from trainer.ema import Ema
from trainer.loss import LossOutput, consistency_loss, edm_loss
from trainer.precond import ConsistencyModel
from trainer.runtime import autocast
from trainer.schedule import sample_t_r
from trainer.target import reference_set

ESS_BUCKETS = (0.1, 1.0, 10.0)  # t-bucket edges for the SCT effective-sample-size metric


@dataclass
class Batch:
    """A minibatch on the training device: dataset indices, images, labels (None if unconditional)."""

    idx: torch.Tensor
    x: torch.Tensor
    labels: torch.Tensor | None


def draw_batch(data: ImageDataset, b: int, *, conditional: bool, device: torch.device) -> Batch:
    """A minibatch without repeats on `device`."""
    idx = torch.randperm(len(data), device=data.images.device)[:b]
    x, labels = data.images[idx], (data.labels[idx] if conditional else None)
    if x.device != device:  # dataset kept on the host (data.on_device: false)
        x = x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)
        labels = labels.to(device) if labels is not None else None
    return Batch(idx.to(device), x, labels)


def drop_labels(labels: torch.Tensor | None, p: float, null_label: int) -> torch.Tensor | None:
    """Each label becomes the null label with probability p, so classic CFG's unconditional branch is
    trained (docs/algorithms.md §4.5). Draws nothing when p = 0 or the model is unconditional."""
    if labels is None or p <= 0.0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def training_labels(batch: Batch, cfg: TrainConfig, data: ImageDataset) -> torch.Tensor | None:
    """The batch's labels as the network sees them in training: with label dropout to the null label."""
    rate = cfg.guidance.label_dropout_rate(cfg.data.conditional)
    return drop_labels(batch.labels, rate, data.num_classes)


def make_optimizer(cfg: TrainConfig, model: ConsistencyModel) -> torch.optim.Optimizer:
    """The tuning optimiser (RAdam or Adam, docs/algorithms.md §3 step 7)."""
    opt_cls = torch.optim.RAdam if cfg.optim.name == "radam" else torch.optim.Adam
    return opt_cls(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas)


@dataclass
class TrainState:
    """What changes as a run goes, and what its checkpoint holds."""

    model: ConsistencyModel
    opt: torch.optim.Optimizer
    ema: Ema
    snapshots: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # guidance EMA snapshots
    # wall_s / cpu_s: the training loop's wall time and its thread's CPU time (blind to other jobs)
    cost: dict[str, float] = field(default_factory=lambda: {"flops": 0.0, "wall_s": 0.0, "cpu_s": 0.0, "eval_s": 0.0})
    iteration: int = 0
    flops_per_step: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "ema": self.ema.model.state_dict(), "opt": self.opt.state_dict(),
                "iteration": self.iteration, "cost": self.cost, "snapshots": self.snapshots,
                "flops_per_step": self.flops_per_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.model.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.iteration = int(state["iteration"])
        self.cost = {**self.cost, **state["cost"]}  # older checkpoints lack cpu_s
        self.snapshots = dict(state["snapshots"])
        self.flops_per_step = state.get("flops_per_step")


class LossStats:
    """Running sums between two reports: the loss and SCT's effective sample size per t bucket."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.edges = torch.tensor(ESS_BUCKETS, device=device)
        self.ess_sum = torch.zeros(len(ESS_BUCKETS) + 1, device=device)
        self.ess_cnt = torch.zeros_like(self.ess_sum)

    def add(self, out: LossOutput) -> None:
        self.loss_sum += out.loss.detach()
        if out.ess is not None:
            bucket = torch.bucketize(out.t, self.edges)
            self.ess_sum.index_add_(0, bucket, out.ess.float())
            self.ess_cnt.index_add_(0, bucket, torch.ones_like(out.ess, dtype=torch.float32))

    def drain(self, steps: int, world: World = World()) -> tuple[float, dict[str, float]]:
        """The mean loss over `steps` steps (and over the ranks) and the ESS metrics `ess_t<j>`; zeroes the sums."""
        for t in (self.loss_sum, self.ess_sum, self.ess_cnt):
            all_sum(t, world)
        loss = float(self.loss_sum) / (steps * world.size)
        mean = (self.ess_sum / self.ess_cnt.clamp_min(1)).tolist()
        ess = {f"ess_t{j}": v for j, (v, c) in enumerate(zip(mean, self.ess_cnt.tolist(), strict=True)) if c > 0}
        for t in (self.loss_sum, self.ess_sum, self.ess_cnt):
            t.zero_()
        return loss, ess


def step_loss(
    cfg: TrainConfig, model: ConsistencyModel, data: ImageDataset, batch: Batch, it: int, *, replay: bool,
    world: World = World(),
) -> LossOutput:
    """The loss of this rank's rows of the global minibatch at iteration `it`: EDM for method edm, else the
    consistency loss. Every random draw is made for the whole global batch (in the order a single process
    makes it), so the ranks together compute one process's per-sample losses exactly."""
    labels = training_labels(batch, cfg, data)
    x, b, device = batch.x, batch.x.shape[0], batch.x.device
    rows = world.shard(b)
    own = labels[rows] if labels is not None else None
    with autocast(device, cfg.precision):
        if cfg.method == "edm":
            sigma = (cfg.pretrain.p_mean + cfg.pretrain.p_std * torch.randn(b, device=device)).exp()
            noise = torch.randn_like(x)
            with own_dropout_stream(world, cfg.seed, it, device):
                return edm_loss(model, x[rows], own, cfg.pretrain.p_mean, cfg.pretrain.p_std, sigma=sigma[rows],
                                noise=noise[rows])
        t, r, dt = sample_t_r(b, it, total_iters=cfg.iterations, stage_iters=cfg.stage_iters, method=cfg.method,
                              sched=cfg.schedule, ict=cfg.ict, sigma_min=cfg.precond.sigma_min,
                              sigma_max=cfg.precond.sigma_max, device=device)
        refs = valid = None
        if cfg.method == "sct":
            refs, valid, _ = reference_set(x, batch.idx, data.images, n=cfg.sct.ref_batch, labels=labels,
                                           dataset_labels=data.labels if cfg.data.conditional else None,
                                           null_label=data.num_classes)
            valid = valid[rows]
        eps = torch.randn_like(x)
        with own_dropout_stream(world, cfg.seed, it, device):
            return consistency_loss(model, x[rows], own, t[rows], r[rows], cfg=cfg.loss, method=cfg.method, refs=refs,
                                    valid=valid, sigma_min=cfg.precond.sigma_min, replay_dropout=replay,
                                    dt=dt[rows], eps=eps[rows])


def train_step(
    cfg: TrainConfig, state: TrainState, data: ImageDataset, it: int, *, device: torch.device, replay: bool,
    world: World = World(),
) -> LossOutput:
    """One optimiser step of `cfg.method` at iteration `it` (the EMA update follows it in the loop).

    With several ranks, each computes the loss of its shard and the gradients are averaged before the
    non-finite-gradient rule and the step, so every rank takes the same step."""
    batch = draw_batch(data, cfg.optim.batch_size, conditional=cfg.data.conditional, device=device)
    out = step_loss(cfg, state.model, data, batch, it, replay=replay, world=world)
    opt = state.opt
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    average_gradients(state.model.parameters(), world)
    for p in state.model.parameters():  # non-finite gradients become 0 before the step (ECT)
        if p.grad is not None:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
    if cfg.optim.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.optim.grad_clip)
    opt.step()
    return out
