"""Time to generate and score 10k digits samples (the evaluation inside every digits trial).

    python bench/fid_time.py [--threads 2] [--n 10000] [--repeats 3] [--channels 32] [--eval-batch 500]

Generation is trainer.evaluate.generate (1-step and 2-step, the digits network of TrainConfig's
defaults, untrained weights: the cost does not depend on them); scoring is FidEvaluator.score
(classifier features + Fréchet distance against the cached digits reference statistics). The
reference statistics are computed once cold in a private cache directory (reported apart: a trial
pays it once per process, later from the on-disk cache). Generation and scoring are timed in
alternation, `--repeats` times; the table gives medians. Goal: 1-step generate + score ≤ 30 s.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from common import conditions, load_average, median, print_conditions, set_threads, table

from trainer.config import TrainConfig
from trainer.data import load_dataset
from trainer.evaluate import generate
from trainer.networks import forward_flops
from trainer.train import build_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    ap.add_argument("--n", type=int, default=10_000, help="samples generated and scored")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--channels", type=int, default=32, help="network.model_channels (digits default 32)")
    ap.add_argument("--eval-batch", type=int, default=500, help="eval.batch_size (sampling batch)")
    args = ap.parse_args()
    threads = set_threads(args.threads)
    print_conditions(conditions(threads))
    os.environ["SCT_CACHE_DIR"] = tempfile.mkdtemp(prefix="sct-fid-bench-")  # cold reference statistics
    from trainer.metrics.fid import FidEvaluator

    cfg = TrainConfig.model_validate({"network": {"model_channels": args.channels},
                                      "eval": {"batch_size": args.eval_batch}})
    data = load_dataset(cfg.data)
    model = build_model(cfg, data).eval()
    t0 = time.perf_counter()
    fid = FidEvaluator.from_config(cfg)
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    FidEvaluator.from_config(cfg)  # again: in-process cache
    again_s = time.perf_counter() - t0

    gen: dict[int, list[float]] = {1: [], 2: []}
    score: list[float] = []
    images = None
    for r in range(args.repeats):
        for steps in (1, 2):
            t0 = time.perf_counter()
            images = generate(model, cfg, data, args.n, steps, seed=r)
            gen[steps].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fid.score(images)
        score.append(time.perf_counter() - t0)
    g1, g2, sc = median(gen[1]), median(gen[2]), median(score)
    nfe_flops = forward_flops(model.net, 1) * args.n
    print(f"# digits 8x8, model_channels {args.channels}, {args.n} samples, sampling batch {args.eval_batch}, "
          f"{args.repeats} repeats, medians")
    rows = [
        {"part": "generate 1-step", "s": f"{g1:.2f}", "µs/image": f"{g1 / args.n * 1e6:.0f}",
         "GFLOP/s": f"{nfe_flops / g1 / 1e9:.1f}"},
        {"part": "generate 2-step", "s": f"{g2:.2f}", "µs/image": f"{g2 / args.n * 1e6:.0f}",
         "GFLOP/s": f"{2 * nfe_flops / g2 / 1e9:.1f}"},
        {"part": "score (features + Fréchet)", "s": f"{sc:.2f}", "µs/image": f"{sc / args.n * 1e6:.0f}", "GFLOP/s": ""},
        {"part": "**1-step generate + score**", "s": f"**{g1 + sc:.2f}**", "µs/image": "", "GFLOP/s": ""},
        {"part": "reference statistics, cold (once per cache)", "s": f"{setup_s:.2f}", "µs/image": "",
         "GFLOP/s": ""},
        {"part": "evaluator set-up, warm (in-process cache)", "s": f"{again_s:.3f}", "µs/image": "", "GFLOP/s": ""},
    ]
    print(table(rows))
    print(f"# goal ≤ 30 s for 1-step generate + score: {'met' if g1 + sc <= 30 else 'missed'} "
          f"({(g1 + sc) / 30:.0%} of it)")
    print(f"# load (after): {load_average()}")


if __name__ == "__main__":
    main()
