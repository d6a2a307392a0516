"""EDM's exact DDPM++ (network.arch ddpmpp) vs the compact U-Net of the same width: one tuning step on the CPU.

    python bench/arch_step.py [--threads 2] [--batch 8] [--rounds 5] [--block-s 1.0] [--method ect]

Both nets are CIFAR-10's DDPM++ size (128 channels, mults 2-2-2, 4 blocks, attention at 16, dropout
0.2) on synthetic 3x32x32 data; the exact one also has EDM's 9 augmentation inputs. Each round times
one block of steps of each (train.py's step + EMA update, order rotated), so other jobs' load
cancels in the per-round ratio exact / compact; prints the median [min–max] of that ratio, the
ms/step of each and their parameter counts and forward FLOPs.
"""

from __future__ import annotations

import argparse

import torch
from common import conditions, interleaved, make_step, paired_ratio, print_conditions, set_threads, spread, table

from trainer.config import TrainConfig
from trainer.data import ImageDataset
from trainer.ema import Ema
from trainer.networks import count_parameters, forward_flops
from trainer.train import build_model

WIDTH = {"model_channels": 128, "channel_mult": [2, 2, 2], "num_blocks": 4, "attn_resolutions": [16], "dropout": 0.2}
NETS = {"compact": {}, "ddpmpp": {"arch": "ddpmpp", "augment_dim": 9}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block-s", type=float, default=1.0)
    ap.add_argument("--method", default="ect", choices=["edm", "ect", "sct"])
    args = ap.parse_args()
    set_threads(args.threads)
    info = conditions(args.threads)
    print_conditions(info)
    torch.manual_seed(0)
    data = ImageDataset(images=torch.randn(256, 3, 32, 32).clamp(-1, 1), labels=torch.zeros(256, dtype=torch.long),
                        num_classes=10, name="synthetic")
    steps, rows = {}, []
    for name, extra in NETS.items():
        cfg = TrainConfig.model_validate({"method": args.method, "device": "cpu", "network": {**WIDTH, **extra},
                                          "data": {"name": "cifar10"}, "iterations": 1000})
        model = build_model(cfg, data)
        opt = torch.optim.RAdam(model.parameters(), lr=1e-4)
        steps[name] = make_step(args.method, 64, cfg, model, data, opt, args.batch, ema=Ema(model, 0.9999, False))
        rows.append({"net": name, "params (M)": f"{count_parameters(model.net) / 1e6:.2f}",
                     "fwd GFLOP/img": f"{forward_flops(model.net, 1) / 1e9:.2f}"})
    times = interleaved(steps, args.rounds, args.block_s)
    for row in rows:
        row["ms/step"] = spread([1e3 * t for t in times[row["net"]]], ".0f")
    print(table(rows))
    med, lo, hi = paired_ratio(times["ddpmpp"], times["compact"])
    print(f"exact DDPM++ / compact ({args.method}, batch {args.batch}, {args.threads} threads, {args.rounds} rounds): "
          f"{med:.3f} [{lo:.3f}–{hi:.3f}]")
    print_conditions(conditions(args.threads), "after")


if __name__ == "__main__":
    main()
