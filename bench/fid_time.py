"""Time to generate and score 10k digits samples (the evaluation inside every digits trial).

    python bench/fid_time.py [--threads 1 2] [--steps 1] [--n 10000] [--repeats 3] [--channels 32]
                             [--eval-batch 500] [--precision fp32]

Generation is trainer.evaluate.generate (the digits network of TrainConfig's defaults, untrained
weights: the cost does not depend on them); scoring is FidEvaluator.score (classifier features +
Fréchet distance against the cached digits reference statistics). The reference statistics are
computed once, cold, in a private cache directory (reported apart: a process pays them once, later
runs read the on-disk cache). Each repeat generates and scores at every thread count in turn; the
table gives medians. Goal: 1-step generate + score ≤ 30 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch
from common import (
    OVERSUBSCRIBED,
    conditions,
    load_average,
    median,
    oversubscribed,
    print_conditions,
    set_threads,
    table,
)

from trainer.config import TrainConfig
from trainer.data import load_dataset
from trainer.evaluate import generate
from trainer.networks import forward_flops
from trainer.train import build_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()],
                    help="torch intra-op thread counts, alternated")
    ap.add_argument("--steps", type=int, nargs="+", default=[1], help="sampler step counts timed")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--n", type=int, default=10_000, help="samples generated and scored")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--channels", type=int, default=32, help="network.model_channels (digits default 32)")
    ap.add_argument("--eval-batch", type=int, default=500, help="eval.batch_size (sampling batch)")
    args = ap.parse_args()
    args.threads = sorted(set(args.threads))
    set_threads(args.threads[-1])
    print_conditions(conditions(",".join(map(str, args.threads))))
    cache = tempfile.mkdtemp(prefix="sct-fid-bench-")
    os.environ["SCT_CACHE_DIR"] = cache  # private: the reference statistics are computed cold
    from trainer.metrics.fid import FidEvaluator

    cfg = TrainConfig.model_validate({"network": {"model_channels": args.channels}, "precision": args.precision,
                                      "eval": {"batch_size": args.eval_batch}})
    data = load_dataset(cfg.data)
    model = build_model(cfg, data).eval()
    t0 = time.perf_counter()
    fid = FidEvaluator.from_config(cfg)
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    FidEvaluator.from_config(cfg)  # again: in-process cache
    again_s = time.perf_counter() - t0

    if len(args.threads) > 1:
        over = oversubscribed(lambda: generate(model, cfg, data, args.eval_batch, 1, seed=0), args.threads[-1])
        if over > OVERSUBSCRIBED:
            print(f"# {args.threads[-1]} threads {over:.1f}x slower than 1 right now (other jobs hold the cores): "
                  "only 1 thread timed")
            args.threads = [1]
    gen: dict[tuple[int, int], list[float]] = {(n, k): [] for n in args.threads for k in args.steps}
    score: dict[int, list[float]] = {n: [] for n in args.threads}
    for r in range(args.repeats):
        for n in args.threads:  # thread counts alternate within each repeat
            torch.set_num_threads(n)
            images = None
            for k in args.steps:
                t0 = time.perf_counter()
                images = generate(model, cfg, data, args.n, k, seed=r)
                gen[(n, k)].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fid.score(images)
            score[n].append(time.perf_counter() - t0)
    nfe_flops = forward_flops(model.net, 1) * args.n
    print(f"# digits 8x8, model_channels {args.channels}, {args.n} samples, sampling batch {args.eval_batch}, "
          f"{cfg.precision}, {args.repeats} repeats, medians")
    rows = []
    best = float("inf")
    for n in args.threads:
        sc = median(score[n])
        for k in args.steps:
            g = median(gen[(n, k)])
            rows.append({"threads": str(n), "part": f"generate {k}-step", "s": f"{g:.2f}",
                         "µs/image": f"{g / args.n * 1e6:.0f}", "GFLOP/s": f"{k * nfe_flops / g / 1e9:.1f}"})
        rows.append({"threads": str(n), "part": "score (classifier features + Fréchet)", "s": f"{sc:.2f}",
                     "µs/image": f"{sc / args.n * 1e6:.0f}", "GFLOP/s": ""})
        if 1 in args.steps:
            total = median(gen[(n, 1)]) + sc
            best = min(best, total)
            rows.append({"threads": str(n), "part": "**1-step generate + score**", "s": f"**{total:.2f}**",
                         "µs/image": "", "GFLOP/s": ""})
    rows.append({"threads": "", "part": "reference statistics, cold (once per cache)", "s": f"{setup_s:.2f}",
                 "µs/image": "", "GFLOP/s": ""})
    rows.append({"threads": "", "part": "evaluator set-up, warm (in-process cache)", "s": f"{again_s:.3f}",
                 "µs/image": "", "GFLOP/s": ""})
    print(table(rows))
    if best < float("inf"):
        print(f"# goal ≤ 30 s for 1-step generate + score (best thread count): {'met' if best <= 30 else 'missed'} "
              f"({best / 30:.0%} of it)")
    shutil.rmtree(cache, ignore_errors=True)
    print(f"# load (after): {load_average()}")


if __name__ == "__main__":
    main()
