"""Shared pretraining: each distinct phase-one config is trained once, into a content-addressed cache.

The cache key hashes everything phase one (EDM pretraining, docs/algorithms.md §2) depends on — data, network,
preconditioning, pretrain settings, seed, precision — plus the trainer's source, and nothing that
only the tuning phase reads. The driver builds every key the search space can produce before the
Tuner starts (as Ray tasks, so on a cluster they spread over its nodes); a trial whose key could
not be enumerated (a continuous axis on a pretraining field) builds it on first use, under a
file lock so concurrent trials wait instead of training it twice. The key is the trainer's own
(`trainer.fingerprint.pretrain_fingerprint`).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from sct_sweeps.config import SweepSpec
from trainer.config import TrainConfig, override
from trainer.errors import TrainerError
from trainer.fingerprint import is_pretrain_field, needs_pretrain, pretrain_fingerprint, pretrain_settings

log = logging.getLogger(__name__)


def cache_path(cfg: TrainConfig, cache_dir: Path) -> Path:
    """Where the phase-one checkpoint of `cfg` lives in the cache."""
    return Path(cache_dir) / f"{pretrain_fingerprint(cfg)}.pt"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_pretrained(cfg: TrainConfig, cache_dir: Path) -> Path:
    """The cached phase-one checkpoint of `cfg`, trained now (atomically, under a lock) if missing."""
    target = cache_path(cfg, cache_dir)
    if target.is_file():
        return target
    with _locked(target.with_suffix(".lock")):
        if target.is_file():  # another process built it while we waited
            return target
        from trainer.train import pretrain

        log.info("pretraining %s (%d iterations)", target.name, cfg.pretrain.iterations)
        # A fixed work path (the trainer resumes from its `.partial` beside it), renamed when complete.
        work = target.with_name(f"{target.stem}.building.pt")
        pretrain(cfg, work)
        meta = {"key": target.stem, "settings": pretrain_settings(cfg)}
        target.with_suffix(".json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        sidecar = work.with_name(work.name + ".sha256")  # the trainer's checksum file travels along
        if sidecar.is_file():
            os.replace(sidecar, target.with_name(target.name + ".sha256"))
        os.replace(work, target)
        for leftover in target.parent.glob(f"{work.name}.partial*"):  # the trainer's resume files
            leftover.unlink(missing_ok=True)
    return target


def with_pretrain(cfg: TrainConfig, cache_dir: Path) -> TrainConfig:
    """`cfg` with pretrain.checkpoint set to its cached phase one (built if missing) when it needs one."""
    if not needs_pretrain(cfg):
        return cfg
    return override(cfg, {"pretrain.checkpoint": ensure_pretrained(cfg, cache_dir)})


def enumerate_configs(spec: SweepSpec) -> tuple[list[TrainConfig], bool]:
    """Distinct phase-one configs the sweep can produce, and whether that list is complete.

    Only axes on pretraining fields matter; a continuous one (uniform / loguniform / randint)
    cannot be enumerated, so its trials build their phase one on first use.
    """
    axes = {p: a for p, a in spec.search.items() if is_pretrain_field(p)}
    complete = all(a.kind in ("grid", "choice") for a in axes.values())
    listed = {p: a.grid or a.choice for p, a in axes.items() if a.kind in ("grid", "choice")}
    configs: dict[str, TrainConfig] = {}
    for combo in itertools.product(*listed.values()):
        cfg = override(spec.base, dict(zip(listed, combo, strict=True)))
        if needs_pretrain(cfg):
            configs.setdefault(pretrain_fingerprint(cfg), cfg)
    return list(configs.values()), complete


def pretrain_all(
    spec: SweepSpec,
    cache_dir: Path,
    resources: dict[str, float],
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Path]:
    """Build every missing enumerable phase one of the sweep as parallel Ray tasks; key -> checkpoint.

    Needs ``ray.init`` first. A base with pretrain.checkpoint set needs nothing.
    """
    import ray

    configs, _ = enumerate_configs(spec)
    done = {pretrain_fingerprint(c): cache_path(c, cache_dir) for c in configs if cache_path(c, cache_dir).is_file()}
    todo = [c for c in configs if pretrain_fingerprint(c) not in done]
    if progress:
        progress(len(done), len(configs))
    if not todo:
        return done
    task = ray.remote(num_cpus=resources["cpu"], num_gpus=resources["gpu"], max_retries=1)(_pretrain_task)
    pending = {task.remote(c.model_dump_json(), str(cache_dir)): pretrain_fingerprint(c) for c in todo}
    log.info("pretraining %d distinct phase-one configs (%d cached)", len(todo), len(done))
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        key = pending.pop(ready[0])
        try:
            done[key] = Path(ray.get(ready[0]))
        except ray.exceptions.RayTaskError as e:  # a user error in phase one: show it, not Ray's wrapper
            for ref in pending:
                ray.cancel(ref, force=True)
            raise (e.cause if isinstance(e.cause, TrainerError) else e) from None
        if progress:
            progress(len(done), len(configs))
    return done


def _pretrain_task(cfg_json: str, cache_dir: str) -> str:
    return str(ensure_pretrained(TrainConfig.model_validate_json(cfg_json), Path(cache_dir)))
