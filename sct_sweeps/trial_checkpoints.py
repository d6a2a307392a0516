"""A trial's checkpoints in Ray's storage: which one a trial restores from, and which ones may go.

Ray keeps every checkpoint a trial reports (`CheckpointConfig(num_to_keep=None)` in runner.py): with a
limit, Ray could delete the checkpoint its last experiment-state snapshot names before the next snapshot,
and a trial restored from that snapshot (after a driver died) could not start. Instead each trial prunes
its own after every checkpoint (`prune_ray_checkpoints`), keeping what the newest snapshot can name, and
an ended sweep keeps the newest two of each trial (`prune_ended_sweep`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUN_FILE = "sct_run.json"  # written into every checkpoint: which MLflow runs the trial logs to, and the step
SNAPSHOT_GLOB = "experiment_state-*.json"  # Ray's experiment-state snapshots, in the experiment directory
KEEP_BEFORE_SNAPSHOT = 3  # checkpoints kept from before the newest snapshot: it names one of them


def prune_ray_checkpoints(trial_dir: Path, keep: int = KEEP_BEFORE_SNAPSHOT) -> list[Path]:
    """Delete the trial's checkpoints in Ray's storage that no experiment-state snapshot can still name.

    A resumed sweep restores each trial from the checkpoint Ray's newest snapshot names, which may be
    several checkpoints old (snapshots are taken every 10 s or more). Kept: every checkpoint written
    after that snapshot, and the newest `keep` before it (the named one is among them: it was the newest
    Ray had registered when the snapshot was written). Returns what was deleted."""
    snapshots = list(trial_dir.parent.glob(SNAPSHOT_GLOB))
    if not snapshots:
        return []
    taken = max(p.stat().st_mtime for p in snapshots)
    before = [c for c in sorted(trial_dir.glob("checkpoint_*")) if c.is_dir() and c.stat().st_mtime <= taken]
    doomed = before[:-keep] if keep else before
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def prune_ended_sweep(results_dir: Path, keep: int = 2) -> int:
    """Once `Tuner.fit` has returned (Ray's final snapshot names each trial's newest checkpoint), keep only
    the newest `keep` checkpoints of every trial; the number of checkpoints deleted."""
    deleted = 0
    for trial_dir in Path(results_dir).iterdir():
        ckpts = sorted(c for c in trial_dir.glob("checkpoint_*") if c.is_dir()) if trial_dir.is_dir() else []
        for old in ckpts[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
            deleted += 1
    return deleted


def _older_checkpoints(ckpt: Any) -> list[Any]:
    """The trial's checkpoints in storage older than `ckpt`, newest first (`prune_ray_checkpoints` keeps some)."""
    from pyarrow import fs

    parent, _, name = ckpt.path.rstrip("/").rpartition("/")
    try:
        infos = ckpt.filesystem.get_file_info(fs.FileSelector(parent))
    except OSError:
        return []
    older = [i for i in infos if i.type == fs.FileType.Directory and i.base_name.startswith("checkpoint_")]
    older = sorted((i for i in older if i.base_name < name), key=lambda i: i.base_name, reverse=True)
    return [type(ckpt)(i.path, filesystem=ckpt.filesystem) for i in older]


def _copy_checkpoint(ckpt: Any, dest: Path) -> tuple[Path, dict[str, Any]]:
    """Ray checkpoint `ckpt` copied to local directory `dest`, and what it says (run id, step)."""
    shutil.rmtree(dest, ignore_errors=True)
    path = Path(ckpt.to_directory(str(dest)))
    run_file = path / RUN_FILE
    return path, (json.loads(run_file.read_text()) if run_file.is_file() else {})


@dataclasses.dataclass(frozen=True)
class Restore:
    """Where a trial goes on from: a local copy of its last good checkpoint (None: from the start), what
    the checkpoint says (run id, step), and why newer checkpoints were skipped."""

    path: Path | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    skipped: str | None = None


def restore_dir(ckpt: Any, workdir: Path) -> Restore:
    """Ray checkpoint `ckpt` (None: nothing to restore) or, if its `state.pt` is truncated or corrupt,
    the newest usable one before it, copied to `workdir`/resume."""
    from trainer.checkpoint import load_checkpoint
    from trainer.errors import CheckpointError

    if ckpt is None:
        return Restore()
    skipped: list[str] = []
    for candidate in [ckpt, *_older_checkpoints(ckpt)]:
        path, meta = _copy_checkpoint(candidate, workdir / "resume")
        try:
            load_checkpoint(path / "state.pt")
        except CheckpointError as e:
            reason = str(e).removeprefix(f"{path / 'state.pt'}: ")
            log.warning("trial checkpoint %s unusable (%s); trying the previous one", candidate.path, reason)
            skipped.append(f"{candidate.path}: {reason}")
            continue
        return Restore(path, meta, "; ".join(skipped) or None)
    # None usable: hand the trainer Ray's own choice, so the trial fails with the CheckpointError naming it.
    return Restore(*_copy_checkpoint(ckpt, workdir / "resume"), "; ".join(skipped))


def final_checkpoint(trial_dir: Path, iterations: int) -> Path | None:
    """The trial's checkpoint (in the results storage) written at its last iteration, if Ray persisted one."""
    for ckpt in sorted(trial_dir.glob("checkpoint_*"), reverse=True):
        run_file = ckpt / RUN_FILE
        if run_file.is_file() and json.loads(run_file.read_text()).get("step") == iterations:
            return ckpt
    return None


