"""Shared by the benchmarks: the trainer's own training step (trainer.step.train_step), its timing,
interleaved paired timing for ratios on a shared machine, and the measurement conditions.

Scripts in bench/ import this as `common` (they run as `python bench/<script>.py`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from trainer.config import TrainConfig
from trainer.data import ImageDataset
from trainer.ema import Ema
from trainer.loss import replays_dropout
from trainer.precond import ConsistencyModel
from trainer.step import TrainState, train_step


def make_step(
    method: str,
    ref: int | str,
    cfg: TrainConfig,
    model: ConsistencyModel,
    data: ImageDataset,
    opt: torch.optim.Optimizer,
    batch: int,
    iteration: int = 0,
    ema: Ema | None = None,
    replay_dropout: bool | None = None,
) -> Callable[[], torch.Tensor]:
    """One optimiser step of `method` (edm | ect | sct | ict): the trainer's own `trainer.step.train_step`;
    returns the detached loss.

    `ref` is SCT's reference-set size. Runs on the device of `data.images` under `cfg.precision`
    autocast; the stage is that of `iteration`. With `ema`, the EMA update that follows every step in
    train.py's loop is part of the step. `replay_dropout` (default: as train.py decides,
    `trainer.loss.replays_dropout`) False redraws the target pass's dropout masks from the restored RNG
    instead of reusing the prediction pass's.
    """
    device = data.images.device
    cfg = cfg.model_copy(update={"method": method}, deep=True)
    cfg.sct.ref_batch = ref
    cfg.optim.batch_size = batch
    state = TrainState(model, opt, ema)  # type: ignore[arg-type]  (ema None: no EMA update)
    replay = replays_dropout(device, compiled=False) if replay_dropout is None else replay_dropout

    def step() -> torch.Tensor:
        out = train_step(cfg, state, data, iteration, device=device, replay=replay)
        if ema is not None:
            ema.update(model, iteration)
        return out.loss.detach()

    return step


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int = 2,
    block_s: float = 0.5,
    blocks: int = 3,
    max_iters: int = 200,
) -> dict[str, float]:
    """Seconds per call of `fn`: one untimed first call, `warmup` calls to size the blocks, then
    `blocks` timed blocks of k calls each (about `block_s` seconds), synchronised at each block's ends.

    Returns the median seconds per call, the spread (max − min) / median over blocks, and the calls timed.
    """
    fn()
    synchronize(device)
    k = 1
    if warmup > 0:
        t0 = time.perf_counter()
        for _ in range(warmup):
            fn()
        synchronize(device)
        est = (time.perf_counter() - t0) / warmup
        k = max(1, min(max_iters, round(block_s / max(est, 1e-6))))
    per_call = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        synchronize(device)
        per_call.append((time.perf_counter() - t0) / k)
    med = statistics.median(per_call)
    return {"s": med, "spread": (max(per_call) - min(per_call)) / med if med > 0 else 0.0, "calls": k * blocks}


# -- paired, interleaved timing (ratios on a machine shared with other jobs) ----------------------


def interleaved(
    fns: Mapping[str, Callable[[], object]],
    rounds: int,
    block_s: float = 0.5,
    device: torch.device | None = None,
    max_calls: int = 200,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of every fn, one value per round: in each round every fn runs one timed block
    (about `block_s` seconds of calls) back to back with the others, in an order rotated each round.

    Load from other jobs then hits all fns of a round alike, so per-round ratios cancel it. Each fn
    is called twice untimed first (warm-up, block sizing). `clock` = `time.thread_time` measures the
    CPU time of this thread instead of wall time: with one torch thread it is the compute the fn
    got, nearly blind to other jobs (time spent descheduled does not count).
    """
    device = device or torch.device("cpu")
    names = list(fns)
    calls = {}
    for name in names:
        fns[name]()
        synchronize(device)
        t0 = clock()
        fns[name]()
        synchronize(device)
        calls[name] = max(1, min(max_calls, round(block_s / max(clock() - t0, 1e-6))))
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn, k = fns[name], calls[name]
            t0 = clock()
            for _ in range(k):
                fn()
            synchronize(device)
            out[name].append((clock() - t0) / k)
    return out


def median(xs: Sequence[float]) -> float:
    """The median of `xs`."""
    return statistics.median(xs)


def spread(xs: Sequence[float], spec: str = ".2f") -> str:
    """`median [min–max]` of `xs`, each formatted with format spec `spec`."""
    return f"{median(xs):{spec}} [{min(xs):{spec}}–{max(xs):{spec}}]"


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) over rounds of num[i] / den[i]: the ratio of two fns timed in the same rounds."""
    r = [a / b for a, b in zip(num, den, strict=True)]
    return statistics.median(r), min(r), max(r)


OVERSUBSCRIBED = 1.5  # all-core step slower than this × a 1-thread step: other jobs hold the cores


def oversubscribed(step: Callable[[], object], cores: int) -> float:
    """Wall time of `step()` at `cores` torch threads over 1 thread (alternated, median of 3 pairs).

    Above 1 when other jobs hold the cores: every parallel region then waits at its barrier for a
    descheduled thread (measured here: 5–20x slower at load 6–9 on 2 cores). Leaves `cores` threads set.
    """
    r = []
    for _ in range(3):
        t = []
        for n in (1, cores):
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            step()
            t.append(time.perf_counter() - t0)
        r.append(t[1] / t[0])
    return statistics.median(r)


def run_child(script: str, args: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 600) -> Any:
    """Run `python script --child *args` in a fresh process (this environment plus `env`); the JSON
    object on the last line of its output. RuntimeError with the end of its stderr if it fails."""
    cmd = [sys.executable, script, "--child", *args]
    out = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- measurement conditions --------------------------------------------------------------------------


def set_threads(n: int | None) -> int:
    """Use `n` torch intra-op threads (None: leave torch's choice); returns the number in use."""
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def load_average() -> str:
    """The 1/5/15-minute load averages, e.g. `4.50 6.31 6.08`."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def conditions(threads: int | str | None = None) -> dict[str, str]:
    """What a figure depends on: date, command, load, cores, threads, versions."""
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv),
        "load": load_average(),
        "cores": str(os.cpu_count()),
        "torch threads": str(threads if threads is not None else torch.get_num_threads()),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }


def print_conditions(info: Mapping[str, str], label: str = "before") -> None:
    """Print the conditions as `# key: value` lines (the load twice: before and after a run)."""
    for k, v in info.items():
        print(f"# {k if k != 'load' else f'load ({label})'}: {v}")


def table(rows: Sequence[Mapping[str, object]], cols: Sequence[str] | None = None) -> str:
    """Rows as a Markdown table (values printed as given)."""
    cols = list(cols or rows[0].keys())
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
