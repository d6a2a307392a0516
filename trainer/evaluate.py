"""Evaluation at an iteration: sample with the EMA (and online) weights, score FID, save grids."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from trainer.config import TrainConfig
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


class Evaluator:
    """FID at each evaluation point for every configured sampler, EMA and (optionally) online weights."""

    def __init__(self, cfg: TrainConfig, data: ImageDataset, device: torch.device, world: World = World()):
        from trainer.metrics import FidEvaluator  # heavy import, only when evaluating

        self.cfg, self.data, self.world = cfg, data, world
        self.fid = FidEvaluator.from_config(cfg, device)

    def _fid(self, images: torch.Tensor) -> float:
        """FID of this process's images; with several ranks, of every rank's images (features gathered)."""
        if self.world.size == 1:
            return self.fid.score(images)
        return self.fid.score_features(gather_rows(self.fid.features(images), self.world))

    def __call__(
        self, ema: ConsistencyModel, online: ConsistencyModel, iteration: int, guide_with: ConsistencyModel | None,
        out_dir: Path,
    ) -> tuple[dict[str, float], list[Path]]:
        """Metrics `fid_{k}step` (EMA), `fid_{k}step_online`, and paths of the grids saved."""
        cfg, metrics, grids = self.cfg, {}, []
        g = cfg.guidance
        guidance = None
        if g.strength != 1.0 and (g.mode == "classic" or guide_with is not None):
            guidance = Guidance(g.strength, g.mode, guide_with, self.data.num_classes)
        metrics["guided"] = float(guidance is not None)
        t0 = time.perf_counter()
        models = [("", ema, guidance)] + ([("_online", online, None)] if cfg.eval.online else [])
        for suffix, model, guide in models:
            for steps in cfg.sampler.steps:
                seed = cfg.seed * 1000 + steps  # same noise at every evaluation point
                images = generate(model, cfg, self.data, cfg.eval.fid_samples, steps, seed=seed, guidance=guide,
                                  world=self.world)
                metrics[f"fid_{steps}step{suffix}"] = self._fid(images)
                if suffix == "" and cfg.eval.save_grid and self.world.is_main:
                    grids.append(save_grid(images[:64], out_dir / "samples" / f"grid_{steps}step_it{iteration}.png"))
        metrics["eval_s"] = time.perf_counter() - t0
        log.info("eval it %d: %s", iteration, {k: round(v, 3) for k, v in metrics.items()})
        return metrics, grids
