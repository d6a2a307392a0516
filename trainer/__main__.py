"""`python -m trainer --config run.yaml [--resume] [--workers N]`: one training run from the command line.

With `--workers N` the run is data-parallel over N processes on this machine (gloo on CPUs, NCCL on
GPUs); `optim.batch_size` stays the global batch. Phase one, if needed, runs first in this process.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from trainer.checkpoint import load_latest
from trainer.config import TrainConfig, load_train_config
from trainer.errors import TrainerError
from trainer.footprint import check_fits


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train, print the final metrics; user errors exit 2 with one line."""
    ap = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    ap.add_argument("--config", type=Path, required=True, help="TrainConfig YAML file")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    ap.add_argument("--pretrain-only", action="store_true", help="run phase one only, into out_dir/pretrain.pt")
    ap.add_argument("--workers", type=int, default=1, help="data-parallel processes (default 1)")
    args = ap.parse_args(argv)
    if args.workers < 1:
        print("error: --workers: must be at least 1", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from trainer.train import pretrain, train

    try:
        cfg = load_train_config(args.config)
        check_fits(cfg)
        if args.pretrain_only:
            print(pretrain(cfg, Path(cfg.out_dir).absolute() / "pretrain.pt"))
            return 0
        resume = None
        if args.resume:  # the newest checkpoint that loads; a corrupt one falls back to the previous
            ckpts = sorted((Path(cfg.out_dir) / "checkpoints").glob("it*"), reverse=True)
            resume = load_latest([c / "state.pt" for c in ckpts])[0].parent if ckpts else None
        if args.workers > 1:
            return _data_parallel(cfg, resume, args.workers)
        result = train(cfg, resume_from=resume)
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print({k: round(v, 4) for k, v in result.metrics.items()})
    return 0


def _data_parallel(cfg: TrainConfig, resume: Path | None, workers: int) -> int:
    """Phase one here (if needed), then the tuning on `workers` processes."""
    from trainer.distributed import backend_for, spawn
    from trainer.fingerprint import needs_pretrain
    from trainer.runtime import resolve_device
    from trainer.train import pretrain, train_rank

    if needs_pretrain(cfg):
        cfg = cfg.model_copy(deep=True)
        cfg.pretrain.checkpoint = pretrain(cfg, Path(cfg.out_dir).absolute() / "pretrain.pt")
    spawn(train_rank, (cfg.model_dump_json(), resume), workers=workers,
          backend=backend_for(resolve_device(cfg.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
