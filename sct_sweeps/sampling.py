"""`sct-sweep sample`: a PNG grid from a trained checkpoint, with any sampler, eta and guidance."""

from __future__ import annotations

from pathlib import Path

from trainer.errors import CheckpointError, ConfigError


def sample_grid(
    checkpoint: Path,
    *,
    steps: int,
    eta: float | None,
    strength: float,
    n: int,
    seed: int,
    device: str,
    out: Path,
) -> Path:
    """Sample `n` images from the EMA weights of `checkpoint` and save them as a grid PNG at `out`."""
    from trainer.data import load_dataset
    from trainer.evaluate import generate, save_grid
    from trainer.sampler import Guidance
    from trainer.train import build_model, check_classic_guidance, load_for_sampling

    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise CheckpointError(f"{checkpoint}: checkpoint not found")
    model, cfg, state = load_for_sampling(checkpoint, device)
    data = load_dataset(cfg.data, "train").to(next(model.parameters()).device)
    guidance = None
    if strength != 1.0:
        g = cfg.guidance
        if g.mode == "classic":
            check_classic_guidance(checkpoint, state)
            guidance = Guidance(strength, "classic", None, data.num_classes)
        else:
            key = f"{g.bad_fraction:g}"
            snaps = state.get("snapshots") or {}
            if key not in snaps:
                raise ConfigError(
                    f"--cfg: {checkpoint} holds no EMA snapshot at guidance.bad_fraction {key} "
                    f"(has {sorted(snaps) or 'none'}); sample a later checkpoint or use --cfg 1"
                )
            bad = build_model(cfg, data).to(next(model.parameters()).device)
            bad.load_state_dict(snaps[key])
            guidance = Guidance(strength, "auto", bad.eval().requires_grad_(False), data.num_classes)
    images = generate(model, cfg, data, n, steps, seed=seed, guidance=guidance, eta=eta)
    return save_grid(images, Path(out))
