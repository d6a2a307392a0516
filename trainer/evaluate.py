"""Evaluation at an iteration: sample with the EMA (and online) weights, score FID, save grids."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from trainer.config import VARIANT_PREFIX, TrainConfig, override, variant_metric
from trainer.data import ImageDataset
from trainer.distributed import World, gather_rows
from trainer.precond import ConsistencyModel
from trainer.runtime import autocast
from trainer.sampler import Guidance, sample, to_uint8

log = logging.getLogger(__name__)


def draw_labels(data: ImageDataset, n: int, generator: torch.Generator, conditional: bool) -> torch.Tensor | None:
    """Labels from the data's label distribution for a conditional model, else None (docs/algorithms.md §5)."""
    if not conditional:
        return None
    idx = torch.randint(0, len(data), (n,), generator=generator, device=data.labels.device)
    return data.labels[idx]


@torch.no_grad()
def generate(
    model: ConsistencyModel,
    cfg: TrainConfig,
    data: ImageDataset,
    n: int,
    steps: int,
    *,
    seed: int,
    guidance: Guidance | None = None,
    eta: float | None = None,
    mode: str | None = None,
    world: World = World(),
) -> torch.Tensor:
    """n images in [-1, 1] (on the model's device) from a `steps`-step sampler, batched, deterministic.

    One process draws every batch from one generator seeded with `seed`. With several ranks, batch k
    is drawn by rank k mod size from its own generator (seeded from `seed` and k) and each rank returns
    only its batches: the ranks split the sampling, whatever their number."""
    device = next(model.parameters()).device

    def one_batch(b: int, gen: torch.Generator) -> torch.Tensor:
        labels = draw_labels(data, b, gen, cfg.data.conditional)
        with autocast(device, cfg.precision):
            return sample(model, b, steps, cfg.sampler, cfg.precond, data.shape, labels=labels, guidance=guidance,
                          generator=gen, eta=eta, mode=mode, boundary=cfg.eval_boundary)

    bs = cfg.eval.batch_size
    if world.size == 1:
        gen = torch.Generator(device=device).manual_seed(seed)
        out = [one_batch(min(bs, n - start), gen) for start in range(0, n, bs)]
    else:
        out = [one_batch(min(bs, n - start), torch.Generator(device=device).manual_seed(seed * 100_003 + k))
               for k, start in enumerate(range(0, n, bs)) if k % world.size == world.rank]
    if not out:
        return torch.zeros((0, *data.shape), device=device)
    return torch.cat(out).float()


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> Path:
    """Save up to 100 images in [-1, 1] as one PNG grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = to_uint8(images[:100].cpu())
    n, c, h, w = x.shape
    nrow = nrow or int(n**0.5 + 0.999)
    ncol = (n + nrow - 1) // nrow
    grid = torch.zeros((c, ncol * (h + 1) + 1, nrow * (w + 1) + 1), dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + col * (w + 1): 1 + col * (w + 1) + w] = x[i]
    img = grid.permute(1, 2, 0).numpy()
    scale = max(1, 320 // img.shape[1])  # nearest-neighbour upscale so 8x8 digits are visible
    img = img.repeat(scale, axis=0).repeat(scale, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, img[..., 0] if c == 1 else img, cmap="gray" if c == 1 else None, vmin=0, vmax=255)
    return path


def variant_configs(cfg: TrainConfig) -> list[TrainConfig]:
    """The configs an evaluation scores: each of `eval.variants` applied to `cfg`, or `cfg` itself."""
    if not cfg.eval.variants:
        return [cfg]
    return [override(cfg, {"eval.variants": [], **v}) for v in cfg.eval.variants]


def guidance_for(cfg: TrainConfig, snapshots: Mapping[str, Mapping[str, torch.Tensor]], bad_model: ConsistencyModel,
                 num_classes: int) -> Guidance | None:
    """`cfg`'s guidance at this point (docs/algorithms.md §4.5): classic CFG, or auto guidance once the EMA
    snapshot at `guidance.bad_fraction` exists (loaded into `bad_model`); None for w = 1 or no snapshot yet."""
    g = cfg.guidance
    if g.strength == 1.0:
        return None
    if g.mode == "classic":
        return Guidance(g.strength, g.mode, None, num_classes)
    snapshot = snapshots.get(f"{g.bad_fraction:g}")
    if snapshot is None:
        return None
    bad_model.load_state_dict(snapshot)
    return Guidance(g.strength, g.mode, bad_model, num_classes)


class Evaluator:
    """FID at each evaluation point for every configured sampler, EMA and (optionally) online weights, of
    the config or of each of its evaluated variants (same weights, same noise per seed: paired)."""

    def __init__(self, cfg: TrainConfig, data: ImageDataset, device: torch.device, world: World = World()):
        self.cfg, self.data, self.device, self.world = cfg, data, device, world
        self.variants = variant_configs(cfg)
        self._fids: dict[tuple[str, int], Any] = {}  # FidEvaluator per (feature weights, batch size)

    def _fid(self, cfg: TrainConfig, images: torch.Tensor) -> float:
        """FID of this process's images; with several ranks, of every rank's images (features gathered)."""
        from trainer.metrics import FidEvaluator  # heavy import, only when evaluating

        key = (str(cfg.eval.inception_weights), cfg.eval.batch_size)
        if key not in self._fids:
            self._fids[key] = FidEvaluator.from_config(cfg, self.device)
        fid = self._fids[key]
        if self.world.size == 1:
            return fid.score(images)
        return fid.score_features(gather_rows(fid.features(images), self.world))

    def score(
        self, cfg: TrainConfig, ema: ConsistencyModel, online: ConsistencyModel, guidance: Guidance | None,
        grid_dir: Path | None, iteration: int,
    ) -> tuple[dict[str, float], list[Path]]:
        """`fid_{k}step` (EMA, guided) and `fid_{k}step_online` of one config at `iteration`; grids saved
        into `grid_dir`."""
        metrics: dict[str, float] = {"guided": float(guidance is not None)}
        grids = []
        models = [("", ema, guidance)] + ([("_online", online, None)] if cfg.eval.online else [])
        for suffix, model, guide in models:
            for steps in cfg.sampler.steps:
                seed = cfg.seed * 1000 + steps  # same noise at every evaluation point, and for every variant
                images = generate(model, cfg, self.data, cfg.eval.fid_samples, steps, seed=seed, guidance=guide,
                                  world=self.world)
                metrics[f"fid_{steps}step{suffix}"] = self._fid(cfg, images)
                if suffix == "" and grid_dir is not None and cfg.eval.save_grid and self.world.is_main:
                    grids.append(save_grid(images[:64], grid_dir / f"grid_{steps}step_it{iteration}.png"))
        return metrics, grids

    def __call__(
        self, ema: ConsistencyModel, online: ConsistencyModel, iteration: int,
        snapshots: Mapping[str, Mapping[str, torch.Tensor]], bad_model: ConsistencyModel, out_dir: Path,
    ) -> tuple[dict[str, float], list[Path]]:
        """Metrics `fid_{k}step` (EMA), `fid_{k}step_online`, `guided` (each as `v<j>/...` for variant j),
        `eval_s`, and the paths of the grids saved (`samples/`, a variant's in `samples/v<j>/`)."""
        metrics: dict[str, float] = {}
        grids: list[Path] = []
        t0 = time.perf_counter()
        for j, cfg in enumerate(self.variants):
            guidance = guidance_for(cfg, snapshots, bad_model, self.data.num_classes)
            several = bool(self.cfg.eval.variants)
            grid_dir = out_dir / "samples" / (f"{VARIANT_PREFIX}{j}" if several else "")
            m, g = self.score(cfg, ema, online, guidance, grid_dir, iteration)
            metrics.update({variant_metric(j, k) if several else k: v for k, v in m.items()})
            grids += g
        metrics["eval_s"] = time.perf_counter() - t0
        log.info("eval it %d: %s", iteration, {k: round(v, 3) for k, v in metrics.items()})
        return metrics, grids
