"""`sct-sweep sample`: a PNG grid from a trained checkpoint, with any sampler, eta and guidance."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from sct_sweeps import schema
from trainer.errors import CheckpointError, ConfigError

_RUN_ID = re.compile(r"[0-9a-f]{32}")


def _find_run(client: Any, ref: str) -> Any | None:
    """The trial run whose id or name is `ref` (None if none); a name shared by several sweeps is refused."""
    if _RUN_ID.fullmatch(ref):
        try:
            return client.get_run(ref)
        except Exception:
            return None
    exps = [e.experiment_id for e in client.search_experiments()]
    name = ref.replace("'", "\\'")
    trials = f"attributes.run_name = '{name}' and tags.`{schema.ROLE}` = '{schema.ROLE_TRIAL}'"
    runs = client.search_runs(exps, trials) if exps else []
    if len(runs) > 1:
        ids = ", ".join(r.info.run_id for r in runs[:5])
        raise CheckpointError(f"{ref}: {len(runs)} MLflow runs have this name ({ids}); give a run id instead")
    return runs[0] if runs else None


def resolve_checkpoint(ref: str, tracking_uri: str | None) -> Path:
    """A checkpoint path as given, else the final checkpoint of MLflow run `ref` (a run name or id): its tag
    ``sct.checkpoint``, or its uploaded ``checkpoint/state.pt`` where that path is not on this machine."""
    from sct_sweeps.tracking import client

    path = Path(ref)
    if path.exists() or "/" in ref or path.suffix == ".pt":  # a path (run names hold no "/")
        return path
    if tracking_uri is None:
        raise CheckpointError(f"{ref}: no such checkpoint file, and no MLflow store to look the run up in")
    mlflow_client = client(tracking_uri)
    run = _find_run(mlflow_client, ref)
    if run is None:
        raise CheckpointError(f"{ref}: neither a checkpoint path nor a trial run name or id in {tracking_uri}")
    tagged = run.data.tags.get(schema.CHECKPOINT)
    if tagged and Path(tagged).exists():
        return Path(tagged)
    try:
        dst = tempfile.mkdtemp(prefix="sct-sample-")
        return Path(mlflow_client.download_artifacts(run.info.run_id, f"{schema.CHECKPOINT_DIR}/state.pt", dst))
    except Exception:
        where = f"its checkpoint {tagged} is not on this machine" if tagged else "it has no final checkpoint"
        raise CheckpointError(f"{ref}: MLflow run {run.info.run_id}: {where} (tag {schema.CHECKPOINT})") from None


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
                    f"--guidance: {checkpoint} holds no EMA snapshot at guidance.bad_fraction {key} "
                    f"(has {sorted(snaps) or 'none'}); sample a later checkpoint or use --guidance 1"
                )
            bad = build_model(cfg, data).to(next(model.parameters()).device)
            bad.load_state_dict(snaps[key])
            guidance = Guidance(strength, "auto", bad.eval().requires_grad_(False), data.num_classes)
    images = generate(model, cfg, data, n, steps, seed=seed, guidance=guidance, eta=eta)
    return save_grid(images, Path(out))
