"""Bytes a sweep keeps per trial in its results storage.

    python bench/storage_per_trial.py [--iterations 200] [--checkpoint-every 10] [--eval-every 50]

Runs a one-trial SCT sweep on digits (the tests' tiny network) with `sct-sweep run` in a private project
and prints the size of everything under the sweep's results directory, per top-level entry: Ray's trial
directory (its kept checkpoints, results) and the trainer's own files (`trainer_out/<trial>`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sct-storage-") as tmp:
        project = Path(tmp)
        spec = {
            "name": "storage", "search": {"seed": {"grid": [0]}}, "resources": {"cpu": 1},
            "base": {"method": "sct", "iterations": args.iterations, "checkpoint_every": args.checkpoint_every,
                     "log_every": 5, "network": {"model_channels": 8, "channel_mult": [1], "num_blocks": 1},
                     "pretrain": {"iterations": 20, "batch_size": 64}, "optim": {"batch_size": 64},
                     "ema": {"beta": 0.9}, "eval": {"every": args.eval_every, "fid_samples": 200, "batch_size": 200}},
        }
        (project / "spec.yaml").write_text(yaml.safe_dump(spec))
        cmd = [str(Path(sys.executable).parent / "sct-sweep"), "run", str(project / "spec.yaml"),
               "--num-cpus", "1", "--no-report"]
        out = subprocess.run(cmd, env={**os.environ, "SCT_PROJECT_DIR": str(project)}, capture_output=True,
                             text=True, cwd=ROOT)
        if out.returncode != 0:
            sys.exit(f"sweep failed: {out.stderr[-2000:]}")
        results = project / "ray_results" / "storage"
        print(f"one trial, {args.iterations} iterations, checkpoint every {args.checkpoint_every}, "
              f"evaluation every {args.eval_every}")
        for entry in sorted(results.iterdir()):
            print(f"  {entry.name}: {size(entry) / 1e6:.2f} MB")
        ckpts = sorted(p.relative_to(results) for p in results.rglob("state.pt"))
        print(f"  checkpoints kept: {len(ckpts)} ({', '.join(str(p.parent) for p in ckpts)})")
        print(f"total: {size(results) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
