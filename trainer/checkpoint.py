"""Atomic checkpoints with a sha256 sidecar; loading uses `torch.load(weights_only=True)`.

A write goes to `<name>.tmp`, is fsynced and renamed, then the checksum file is written the same
way. `load_latest` falls back to the previous good checkpoint when the newest is truncated or corrupt.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

from trainer.errors import CheckpointError

log = logging.getLogger(__name__)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write `state` (tensors, numbers, strings, lists, dicts) atomically, with `<path>.sha256`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda f: torch.save(state, f))
    digest = sha256_file(path)
    _atomic_write(path.with_name(path.name + ".sha256"), lambda f: f.write(digest.encode()))
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint, verifying its sha256 sidecar when present; CheckpointError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.is_file() and sidecar.read_text().strip() != sha256_file(path):
        raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupt checkpoint)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle error, ...
        raise CheckpointError(f"{path}: cannot load checkpoint ({type(e).__name__})") from None


def load_latest(paths: list[Path], map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]]:
    """Load the first loadable checkpoint of `paths` (newest first), logging the ones skipped."""
    errors = []
    for p in paths:
        try:
            return p, load_checkpoint(p, map_location)
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
            errors.append(str(e))
    raise CheckpointError("; ".join(errors) if errors else "no checkpoint found")
