"""GPU benchmark of the trainer (issue 12): training steps, SCT's overhead, sampling, FID features.

    python bench/gpu_bench.py OUTDIR [--budget-s 270] [--smoke] [--device cpu]

Synthetic tensors of CIFAR-10 shape (3×32×32, batch 128, a 50k-image training set on the device);
nothing is downloaded. Measures, each as the median of timed blocks after warm-up (synchronised):
- iterations/s of EDM, ECT and SCT steps (SCT at reference sets 128, 1024, 8192) for the DDPM++-size
  U-Net (~56M parameters) and the small U-Net (1.5M, the Fashion-MNIST one), in fp32 (true fp32),
  tf32 (TF32 matmuls and convolutions) and bf16 autocast, with achieved TFLOP/s
  (torch.utils.flop_counter) and the ratio to ECT; then the ECT and SCT (n=1024) steps of EDM's exact
  DDPM++ (network.arch ddpmpp, 32x32) and EDM2-S (arch edm2, 64x64, 1000 classes);
- host synchronisations inside each step (torch.cuda sync debug mode, with file:line);
- sampling throughput (images/s, 1- and 2-step, trainer.evaluate.generate);
- FID-feature throughput (images/s of trainer.metrics.fid.compute_stats) for the digits and
  Fashion-MNIST classifiers and the FID Inception-v3 (random weights of the right shapes when the
  real ones are absent; the JSON says which);
- if time remains: torch.compile on/off for the small net (compile time too), then cudnn.benchmark
  and channels_last for the DDPM++ bf16 ECT step.
After every measurement OUTDIR/gpu_bench.json and OUTDIR/gpu_bench.md are rewritten, so a timeout
keeps what was measured. Needs CUDA; `--smoke` runs every part once at tiny sizes (CPU allowed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import make_step, synchronize, time_call

from trainer.config import TrainConfig
from trainer.data import ImageDataset
from trainer.ema import Ema
from trainer.errors import CheckpointError
from trainer.evaluate import generate
from trainer.metrics.classifier import ClassifierFeatures, build_classifier, load_classifier
from trainer.metrics.fid import compute_stats
from trainer.metrics.flops import count_flops
from trainer.metrics.inception import FidInceptionV3, load_inception
from trainer.networks import count_parameters
from trainer.runtime import configure_backend
from trainer.train import build_model

DDPMPP = {"model_channels": 128, "channel_mult": [2, 2, 2], "num_blocks": 4, "attn_resolutions": [16], "dropout": 0.2}
SMALL = {"model_channels": 20, "channel_mult": [1, 2, 4], "num_blocks": 2, "dropout": 0.1}  # fmnist_pretrain.yaml
# Original-architecture nets (network.arch) as (knobs, resolution, classes): EDM's exact CIFAR-10 DDPM++
# (edm-cifar10-32x32-uncond-vp.pkl) and EDM2-S at ImageNet-64 (edm2-img64-s-*.pkl).
EXACT = {**DDPMPP, "arch": "ddpmpp", "augment_dim": 9}
EDM2_S = {"arch": "edm2", "model_channels": 192, "channel_mult": [1, 2, 3, 4], "num_blocks": 3,
          "attn_resolutions": [16, 8], "dropout": 0.0}


@dataclass
class Sizes:
    """What is measured and how long each timing runs."""

    batch: int = 128
    dataset: int = 50_000  # CIFAR-10's training-set size; ≥ the largest reference set
    refs: tuple[int, ...] = (128, 1024, 8192)
    nets: dict[str, dict[str, Any]] = field(default_factory=lambda: {"ddpmpp": DDPMPP, "small": SMALL})
    arch_nets: dict[str, tuple[dict[str, Any], int, int]] = field(
        default_factory=lambda: {"ddpmpp_exact": (EXACT, 32, 0), "edm2_s": (EDM2_S, 64, 1000)})
    sample_n: int = 1000
    eval_batch: int = 500
    fid_n: int = 2000
    inception_n: int = 1000
    warmup: int = 2
    block_s: float = 0.4
    blocks: int = 3


SMOKE = Sizes(
    batch=8, dataset=64, refs=(8, 16, 32), sample_n=8, eval_batch=4, fid_n=8, inception_n=2, warmup=0, block_s=0.0,
    blocks=1, nets={"ddpmpp": {**DDPMPP, "model_channels": 8, "num_blocks": 1},
                    "small": {**SMALL, "model_channels": 4, "num_blocks": 1}},
    arch_nets={"ddpmpp_exact": ({**EXACT, "model_channels": 8, "num_blocks": 1}, 32, 0),
               "edm2_s": ({**EDM2_S, "model_channels": 16, "num_blocks": 1}, 64, 1000)},
)


class Bench:
    """Runs the measurements within a deadline and keeps the results written to `out`."""

    def __init__(self, out: Path, device: torch.device, sizes: Sizes, budget_s: float, smoke: bool) -> None:
        self.out, self.device, self.sz, self.smoke = out, device, sizes, smoke
        self.deadline = time.perf_counter() + budget_s
        self.res: dict[str, Any] = {"env": environment(device, sizes, smoke), "train": [], "sync_audit": {},
                                    "sampling": [], "fid_features": [], "extras": [], "compile": [],
                                    "skipped": [], "errors": []}
        g = torch.Generator(device=device).manual_seed(0)
        images = torch.rand(sizes.dataset, 3, 32, 32, generator=g, device=device) * 2 - 1
        labels = torch.randint(0, 10, (sizes.dataset,), generator=g, device=device)
        self.data = ImageDataset(images, labels, 10, "synthetic-cifar10")

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def run(self, section: str, what: str, need_s: float, fn: Callable[[], dict[str, Any] | None]) -> None:
        """Run one measurement unless under `need_s` seconds remain; record its row or its error."""
        if not self.smoke and self.left() < need_s:
            self.res["skipped"].append(f"{section}: {what} (budget: {self.left():.0f} s left, needs {need_s:.0f})")
            print(f"skip {section} {what}: budget", flush=True)
            return
        try:
            row = fn()
        except Exception as e:  # a failed measurement is recorded; the rest still runs
            self.res["errors"].append(f"{section}: {what}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            traceback.print_exc()
            row = None
        finally:
            synchronize(self.device)
        if row is not None:
            self.res[section].append(row)
            print(f"{section:<12} {what:<40} " + ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("net",)),
                  flush=True)
        self.save()

    def save(self) -> None:
        (self.out / "gpu_bench.json").write_text(json.dumps(self.res, indent=1))
        (self.out / "gpu_bench.md").write_text(markdown(self.res))

    def timing(self, fn: Callable[[], object], warmup: int | None = None) -> dict[str, float]:
        sz = self.sz
        return time_call(fn, self.device, sz.warmup if warmup is None else warmup, sz.block_s, sz.blocks)

    def config(self, net: str, precision: str) -> TrainConfig:
        knobs, _, classes = self.sz.arch_nets.get(net, (self.sz.nets.get(net), 0, 0))
        return TrainConfig.model_validate({
            "network": knobs, "precision": precision, "device": str(self.device),
            "data": {"conditional": classes > 0},  # a conditional net gets EDM's "no class" (labels None)
            "optim": {"batch_size": self.sz.batch}, "eval": {"batch_size": self.sz.eval_batch},
        })

    def arch_data(self, net: str) -> ImageDataset:
        """Synthetic images of the resolution (and classes) of an original-architecture net."""
        _, res, classes = self.sz.arch_nets[net]
        g = torch.Generator(device=self.device).manual_seed(0)
        n = max(self.sz.refs[1], self.sz.batch)
        images = torch.rand(n, 3, res, res, generator=g, device=self.device) * 2 - 1
        labels = torch.randint(0, max(classes, 1), (n,), generator=g, device=self.device)
        return ImageDataset(images, labels, max(classes, 1), f"synthetic-{res}px")

    def model(self, cfg: TrainConfig, data: ImageDataset | None = None) -> tuple[torch.nn.Module, Any]:
        model = build_model(cfg, data or self.data).to(self.device)
        return model, torch.optim.RAdam(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas)

    # --- measurements --------------------------------------------------------------------------------
    def methods(self) -> list[tuple[str, str, int]]:
        """(label, method, reference-set size) of the training-step table."""
        return [("edm", "edm", 1), ("ect", "ect", 1)] + [(f"sct n={n}", "sct", n) for n in self.sz.refs]

    def sync_audit(self) -> None:
        """Host synchronisations in one step + EMA update of each method (small net, fp32), with file:line."""
        if self.device.type != "cuda":
            self.res["sync_audit"] = {"note": "not measured: sync debug mode needs CUDA"}
            return
        cfg = self.config("small", "fp32")
        model, opt = self.model(cfg)
        ema = Ema(model, cfg.ema.beta)
        for label, method, ref in [*self.methods()[:3], (f"sct n={self.sz.refs[-1]}", "sct", self.sz.refs[-1]),
                                   ("ict", "ict", 1)]:
            step = make_step(method, ref, cfg, model, self.data, opt, self.sz.batch)
            try:  # the step and the EMA update after it, as train.py's loop runs them
                self.res["sync_audit"][label] = sync_points(lambda step=step: (step(), ema.update(model, 1)))
            except Exception as e:
                self.res["sync_audit"][label] = [f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"]
            print(f"sync audit {label}: {self.res['sync_audit'][label] or 'none'}", flush=True)
        self.save()

    def train_and_sample(self, net: str, data: ImageDataset | None = None,
                         methods: list[tuple[str, str, int]] | None = None) -> None:
        """Training-step rows (both precisions, every method) and sampling rows of one network.

        With `data` (an original-architecture net's images): only `methods`' steps, no sampling."""
        cfg = self.config(net, "fp32")
        model, opt = self.model(cfg, data)
        params = count_parameters(model.net)
        flops: dict[str, float] = {}
        need = 6.0 if net == "small" else 12.0
        for precision in ("bf16", "tf32", "fp32"):  # fp32 = true fp32 (TF32 off), as ECT's code
            cfg = self.config(net, precision)
            configure_backend(self.device, precision)
            ect_ms: float | None = None
            for label, method, ref in methods or self.methods():
                step = make_step(method, ref, cfg, model, data or self.data, opt, self.sz.batch)

                def row(label=label, step=step, precision=precision) -> dict[str, Any]:
                    nonlocal ect_ms
                    if label not in flops:
                        flops[label] = float(count_flops(step))
                    t = self.timing(step)
                    ms = t["s"] * 1e3
                    ect_ms = ms if label == "ect" else ect_ms
                    return {"net": net, "params_M": round(params / 1e6, 2), "precision": precision, "method": label,
                            "ms_per_step": round(ms, 2), "it_per_s": round(1e3 / ms, 2),
                            "img_per_s": round(self.sz.batch * 1e3 / ms, 1),
                            "gflop_per_step": round(flops[label] / 1e9, 1),
                            "tflop_per_s": round(flops[label] / t["s"] / 1e12, 1),
                            "vs_ect": round(ms / ect_ms, 3) if ect_ms else None,
                            "spread": round(t["spread"], 3), "calls": t["calls"]}

                self.run("train", f"{net} {precision} {label}", need, row)
            for steps in (1, 2) if data is None else ():
                self.run("sampling", f"{net} {precision} {steps}-step", need / 2,
                         lambda steps=steps, cfg=cfg, m=model: self.sampling(net, cfg, m, params, steps))
        del model, opt
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def sampling(self, net: str, cfg: TrainConfig, model: torch.nn.Module, params: int, steps: int) -> dict[str, Any]:
        n = self.sz.sample_n
        t = self.timing(lambda: generate(model, cfg, self.data, n, steps, seed=0), warmup=min(1, self.sz.warmup))
        return {"net": net, "params_M": round(params / 1e6, 2), "precision": cfg.precision, "steps": steps,
                "batch": cfg.eval.batch_size, "img_per_s": round(n / t["s"], 1), "spread": round(t["spread"], 3)}

    def fid_features(self) -> None:
        """images/s of compute_stats (features + float64 mean/covariance) for each feature network."""
        for name, shape, n in [("digits", (1, 8, 8), self.sz.fid_n), ("fashion_mnist", (1, 32, 32), self.sz.fid_n),
                               ("inception", (3, 32, 32), self.sz.inception_n)]:
            def row(name=name, shape=shape, n=n) -> dict[str, Any]:
                net, weights = feature_net(name)
                net = net.to(self.device)
                images = torch.rand(n, *shape, device=self.device) * 2 - 1
                t = self.timing(lambda: compute_stats(net, images, self.device, self.sz.eval_batch), warmup=1)
                return {"network": name, "weights": weights, "input": "x".join(map(str, shape)),
                        "batch": self.sz.eval_batch, "img_per_s": round(n / t["s"], 1), "spread": round(t["spread"], 3)}

            self.run("fid_features", name, 10.0, row)

    def extras(self) -> None:
        """DDPM++ bf16 ECT step: default vs cudnn.benchmark vs channels_last (one run, same conditions)."""
        cfg = self.config("ddpmpp", "bf16")
        for label, autotune, channels_last in [("default", False, False), ("cudnn.benchmark", True, False),
                                               ("channels_last", False, True), ("both", True, True)]:
            def row(label=label, autotune=autotune, channels_last=channels_last) -> dict[str, Any]:
                model = build_model(cfg, self.data).to(self.device)
                if channels_last:  # weights (and so activations) NHWC; before the optimiser state exists
                    model.to(memory_format=torch.channels_last)
                opt = torch.optim.RAdam(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas)
                step = make_step("ect", 1, cfg, model, self.data, opt, self.sz.batch)
                torch.backends.cudnn.benchmark = autotune
                try:
                    t = self.timing(step)
                finally:
                    torch.backends.cudnn.benchmark = False
                return {"net": "ddpmpp", "precision": "bf16", "method": "ect", "variant": label,
                        "ms_per_step": round(t["s"] * 1e3, 2), "it_per_s": round(1 / t["s"], 2),
                        "spread": round(t["spread"], 3)}

            self.run("extras", f"ddpmpp bf16 ect {label}", 12.0, row)

    def compile(self) -> None:
        """Small net ECT step: eager vs torch.compile(model.net) as train.py applies it (compile time too)."""
        backend = "eager" if self.smoke else "inductor"
        for precision in ("bf16", "fp32"):
            def row(precision=precision) -> dict[str, Any]:
                cfg = self.config("small", precision)
                model, opt = self.model(cfg)
                step = make_step("ect", 1, cfg, model, self.data, opt, self.sz.batch)
                eager = self.timing(step)
                model.net = torch.compile(model.net, backend=backend)
                t0 = time.perf_counter()
                step()
                step()
                synchronize(self.device)
                compile_s = time.perf_counter() - t0
                comp = self.timing(step)
                return {"net": "small", "precision": precision, "method": "ect", "backend": backend,
                        "eager_ms": round(eager["s"] * 1e3, 2), "compiled_ms": round(comp["s"] * 1e3, 2),
                        "speedup": round(eager["s"] / comp["s"], 3), "compile_s": round(compile_s, 1)}

            self.run("compile", f"small {precision} ect", 100.0, row)


SYNC_WARNING = "called a synchronizing CUDA operation"  # what sync debug mode "warn" says at a sync


def sync_points(step: Callable[[], object]) -> list[str]:
    """Distinct 'file:line: message' of synchronising CUDA calls in one call of `step` (after a warm call)."""
    step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    where = []
    for w in caught:
        if SYNC_WARNING in str(w.message):  # not torch's other notice, "sync debug mode is a prototype"
            where.append(f"{'/'.join(Path(w.filename).parts[-2:])}:{w.lineno}: {str(w.message).splitlines()[0][:120]}")
    return sorted(set(where))


def feature_net(name: str) -> tuple[torch.nn.Module, str]:
    """The FID feature network `name` and which weights it has (shipped, or random of the right shapes)."""
    if name == "inception":
        try:
            return load_inception()[0], "official"
        except CheckpointError:
            return FidInceptionV3().eval().requires_grad_(False), "random (official weights absent)"
    try:
        return ClassifierFeatures(load_classifier(name)[0]), "shipped"
    except CheckpointError:
        return ClassifierFeatures(build_classifier(name).eval().requires_grad_(False)), "random (weights absent)"


def environment(device: torch.device, sizes: Sizes, smoke: bool) -> dict[str, Any]:
    """Device, versions and settings the numbers belong to."""
    env: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device), "smoke": smoke,
        "batch": sizes.batch, "dataset": sizes.dataset, "image": "3x32x32",
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
    else:
        env["name"] = platform.processor() or platform.machine()
    return env


def _table(rows: list[dict[str, Any]], cols: list[str]) -> list[str]:
    if not rows:
        return ["(none measured)"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in rows]
    return out


def markdown(res: dict[str, Any]) -> str:
    """The results as markdown tables (what docs/benchmarks.md quotes)."""
    e = res["env"]
    smoke = " SMOKE RUN: not a measurement." if e["smoke"] else ""
    lines = [f"# GPU benchmark: {e.get('name')} ({e['device']})", "",
             f"torch {e['torch']}, CUDA {e['cuda']}, cuDNN {e.get('cudnn')}, Python {e['python']}, "
             f"{e['date_utc']} UTC; batch {e['batch']} of {e['image']}, synthetic data ({e['dataset']} images on "
             f"the device); fp32 = true fp32 (TF32 off), tf32 = TF32 matmuls and convolutions; "
             f"bf16 = autocast.{smoke}", "",
             "## Training steps", ""]
    lines += _table(res["train"], ["net", "params_M", "precision", "method", "ms_per_step", "it_per_s", "img_per_s",
                                   "gflop_per_step", "tflop_per_s", "vs_ect", "spread"])
    lines += ["", "## Host synchronisations in one step + EMA update (small net, fp32)", ""]
    audit = res["sync_audit"]
    lines += [f"- {k}: {'; '.join(v) if isinstance(v, list) and v else ('none' if isinstance(v, list) else v)}"
              for k, v in audit.items()] or ["(not run)"]
    lines += ["", "## Sampling", ""] + _table(res["sampling"], ["net", "precision", "steps", "batch", "img_per_s",
                                                               "spread"])
    lines += ["", "## FID features (compute_stats: features + float64 statistics)", ""]
    lines += _table(res["fid_features"], ["network", "weights", "input", "batch", "img_per_s", "spread"])
    lines += ["", "## DDPM++ bf16 ECT step: cuDNN autotuning and channels_last", ""]
    lines += _table(res["extras"], ["variant", "ms_per_step", "it_per_s", "spread"])
    lines += ["", "## torch.compile (small net, ECT step)", ""]
    lines += _table(res["compile"], ["precision", "backend", "eager_ms", "compiled_ms", "speedup", "compile_s"])
    if res["skipped"] or res["errors"]:
        lines += ["", "## Skipped / failed", ""] + [f"- skipped: {s}" for s in res["skipped"]]
        lines += [f"- FAILED: {s}" for s in res["errors"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="results folder (gpu_bench.json, gpu_bench.md)")
    ap.add_argument("--budget-s", type=float, default=270.0, help="stop starting measurements after this long")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one call each: proves the script runs")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cuda:N; cpu only with --smoke")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparison")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not (args.smoke and args.device == "cpu"):
        print(f"gpu_bench: CUDA is not available (torch {torch.__version__}, torch.cuda.is_available() is False); "
              "this benchmark needs a GPU (a CPU dry run: --smoke --device cpu)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.manual_seed(0)
    configure_backend(device, "fp32")
    args.out.mkdir(parents=True, exist_ok=True)
    b = Bench(args.out, device, SMOKE if args.smoke else Sizes(), args.budget_s, args.smoke)
    t0 = time.perf_counter()
    b.sync_audit()
    for net in b.sz.nets:
        b.train_and_sample(net)
    tuning = [("ect", "ect", 1), (f"sct n={b.sz.refs[1]}", "sct", b.sz.refs[1])]
    for net in b.sz.arch_nets:  # EDM's exact DDPM++ and EDM2-S: the tuning steps only
        try:
            b.train_and_sample(net, data=b.arch_data(net), methods=tuning)
        except ModuleNotFoundError as e:  # a network module not on this branch
            b.res["errors"].append(f"train: {net}: {e}")
    b.fid_features()
    if not args.no_compile:
        b.compile()
    b.extras()
    b.res["env"]["wall_s"] = round(time.perf_counter() - t0, 1)
    b.save()
    print(markdown(b.res))
    return 1 if b.res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
