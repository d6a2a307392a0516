"""Phase one's fingerprint: what EDM pretraining depends on, as a content address for a shared cache.

A pretrained checkpoint is reusable by every run whose phase one reads the same settings
(declared in trainer/config.py: PHASE_ONE_READS less PHASE_ONE_IGNORES) and the same trainer code.
The code is every ``trainer/**/*.py`` except ``trainer/metrics/`` (measurement only: FID, FLOPs; it
never changes trained weights), so no list of file names needs keeping up to date; a change to any
other trainer file retires the cached checkpoints.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from trainer.config import EVAL_ONLY, PHASE_ONE_IGNORES, PHASE_ONE_LEAVES, PHASE_ONE_READS, PLACEMENT, TrainConfig

_ROOT = Path(__file__).resolve().parent
_NOT_READ = ("metrics",)  # trainer sub-packages phase one does not depend on


def is_pretrain_field(path: str) -> bool:
    """Whether the dotted TrainConfig path can change phase one (a search axis on it needs its own)."""
    return (path.split(".")[0] in PHASE_ONE_READS and path != "pretrain.checkpoint") or path in PHASE_ONE_LEAVES


def needs_pretrain(cfg: TrainConfig) -> bool:
    """Phase one is needed: ECT / SCT (iCT trains from scratch), pretrain iterations > 0, no checkpoint."""
    return cfg.method in ("ect", "sct") and cfg.pretrain.iterations > 0 and cfg.pretrain.checkpoint is None


def pretrain_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The settings phase one depends on (the fingerprint's content), as JSON-ready data."""
    dump = cfg.model_dump(mode="json")
    out = {k: dump[k] for k in PHASE_ONE_READS}
    for path in PHASE_ONE_IGNORES:
        section, leaf = path.split(".")
        out[section] = {k: v for k, v in out[section].items() if k != leaf}
    out["label_dropout"] = cfg.guidance.label_dropout_rate(cfg.data.conditional)  # PHASE_ONE_LEAVES, resolved
    return out


@functools.cache
def trainer_digest() -> str:
    """sha256 of the trainer's own source files phase one may run (computed once per process)."""
    h = hashlib.sha256()
    for path in sorted(_ROOT.rglob("*.py")):
        rel = path.relative_to(_ROOT)
        if rel.parts[0] in _NOT_READ:
            continue
        h.update(rel.as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def pretrain_fingerprint(cfg: TrainConfig) -> str:
    """Content address of phase one: sha256 of its settings and the trainer source (16 hex digits)."""
    blob = json.dumps({"settings": pretrain_settings(cfg), "trainer": trainer_digest()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def training_settings(cfg: TrainConfig) -> dict[str, Any]:
    """Every setting that can change a training's weights, snapshots or checkpoints: the config less its
    evaluation-only and placement settings (trainer/config.py EVAL_ONLY, PLACEMENT), with the label-dropout
    rate as applied. A training serves every `guidance.bad_fraction` in its `guidance.snapshot_fractions`."""
    dump = cfg.model_dump(mode="json")
    for path in (*EVAL_ONLY, *PLACEMENT):
        *parents, leaf = path.split(".")
        node = dump
        for p in parents:
            node = node[p]
        node.pop(leaf)
    dump["guidance"]["label_dropout"] = cfg.guidance.label_dropout_rate(cfg.data.conditional)
    return dump


def training_fingerprint(cfg: TrainConfig) -> str:
    """Content address of a training (16 hex digits): equal for configs that differ only in evaluation."""
    blob = json.dumps({"settings": training_settings(cfg), "trainer": trainer_digest()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
