"""Ship an EDM pretrain as an EMA-only checkpoint, with its denoising loss and FID measured.

    python scripts/ship_pretrain.py runs/fmnist_pretrain/pretrain.pt[.partial] trainer/assets/fmnist_edm_c20.pt \
        --config experiments/fmnist_pretrain.yaml [--samples 2000] [--heun-steps 10]

Accepts a finished pretrain or its `.partial` (an interrupted run: its EMA weights and iteration
count are taken as they are). Writes the checkpoint (weights_only-loadable, sha256 sidecar) and a
JSON beside it with: iterations, parameters, test-split denoising loss (EDM weighting, fixed seed),
and the Fréchet distance of `--samples` images from EDM's Heun sampler (2·steps − 1 evaluations).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.config import load_train_config
from trainer.data import load_dataset
from trainer.loss import edm_loss
from trainer.metrics import FidEvaluator
from trainer.networks import count_parameters
from trainer.sampler import sample_edm_heun
from trainer.train import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--heun-steps", type=int, default=10)
    args = ap.parse_args()
    cfg = load_train_config(args.config)
    state = load_checkpoint(args.source)
    ema, iters = state["ema"] if "ema" in state else state["model"], int(state["iteration"])
    cfg = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"iterations": iters})})
    test = load_dataset(cfg.data, "test")
    model = build_model(cfg, test)
    model.load_state_dict(ema)
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        losses = [float(edm_loss(model, test.images[i : i + 500], None, cfg.pretrain.p_mean, cfg.pretrain.p_std).loss)
                  for i in range(0, 5000, 500)]
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    images = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(0, args.samples, 250):
            z = torch.randn((250, *test.shape), generator=gen)
            images.append(sample_edm_heun(model, z, args.heun_steps, cfg.precond).float())
    sample_s = time.perf_counter() - t0
    fid = FidEvaluator.from_config(cfg, "cpu").score(torch.cat(images)[: args.samples])
    save_checkpoint(args.dest, {"kind": "pretrain", "model": model.state_dict(), "iteration": iters,
                                "config": cfg.model_dump_json()})
    info = {"source_config": str(args.config), "iterations": iters, "params": count_parameters(model.net),
            "test_denoising_loss": sum(losses) / len(losses), "heun_steps": args.heun_steps,
            "nfe": 2 * args.heun_steps - 1, "fid_samples": args.samples, "fid": fid, "sampling_s": sample_s,
            "bytes": args.dest.stat().st_size}
    args.dest.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
