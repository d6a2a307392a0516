"""Evaluation-only axes: one training per distinct model against one training per value.

    python bench/eval_variants.py experiments/ablate_eta.yaml [--cpus 2] [--out bench/results/x.json]

Runs the sweep twice with the real CLI (`sct-sweep run`, embedded Ray, a private SCT_PROJECT_DIR under
/tmp, one shared pretraining cache): first with `share_training=false` (every η / guidance value
trains its own, identical model: how sweeps ran before), then as shipped (one training per distinct
model, every value evaluated on it). Prints each run's wall time (total, and the trial phase without
pretraining, which the first run pays for both), the number of trainings, and for every variant
(axis values) its FID history in both runs with the largest difference.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import conditions, load_average, print_conditions, table

ROOT = Path(__file__).resolve().parents[1]
WALL_RE = re.compile(r"wall (\d+) s = pretraining (\d+) s \+ trials (\d+) s")


def run(spec: Path, project: Path, name: str, share: bool, cpus: int) -> dict[str, Any]:
    """One `sct-sweep run`: its printed wall split and the elapsed time around it."""
    env = {**os.environ, "SCT_PROJECT_DIR": str(project)}
    cmd = [str(Path(sys.executable).parent / "sct-sweep"), "run", str(spec), f"name={name}",
           f"share_training={'true' if share else 'false'}", "--num-cpus", str(cpus), "--no-report"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3 * 3600)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    m = WALL_RE.search(done.stdout)
    wall, pre, trials = (int(g) for g in m.groups()) if m else (0, 0, 0)
    trainings = re.search(r"trainings: (\d+)", done.stdout)
    return {"name": name, "share_training": share, "elapsed_s": round(elapsed, 1), "wall_s": wall,
            "pretrain_s": pre, "trial_phase_s": trials, "trainings": int(trainings.group(1)) if trainings else 0}


def histories(uri: str, name: str, metric: str) -> dict[str, list[tuple[int, float]]]:
    """Axis values (`eta=0.2,seed=1`) -> the variant run's `metric` history."""
    from sct_sweeps import schema, tracking

    client = tracking.client(uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], f"tags.`{schema.ROLE}` = '{schema.ROLE_TRIAL}'", max_results=1000)
    out = {}
    for r in runs:
        tags = r.data.tags
        axes = {k.removeprefix(schema.AXIS_PREFIX): v for k, v in tags.items() if k.startswith(schema.AXIS_PREFIX)}
        key = ",".join(f"{k}={axes[k]}" for k in sorted(axes))
        out[key] = [(m.step, m.value) for m in sorted(client.get_metric_history(r.info.run_id, metric),
                                                      key=lambda m: m.step)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", type=Path)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--metric", default=None, help="default: the spec's metric")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import yaml

    raw = yaml.safe_load(args.spec.read_text())
    metric = args.metric or raw.get("metric", "fid_1step")
    info = conditions()
    print_conditions(info)
    project = Path(tempfile.mkdtemp(prefix="sct-bench-variants-"))
    try:
        rows = [run(args.spec, project, f"{raw['name']}_per_value", False, args.cpus),
                run(args.spec, project, f"{raw['name']}_shared", True, args.cpus)]
        print(f"load after: {load_average()}")
        print(table(rows))
        uri = f"sqlite:///{project / 'mlruns.db'}"
        a, b = (histories(uri, r["name"], metric) for r in rows)
        diffs = []
        for key in sorted(a):
            va, vb = a[key], b.get(key, [])
            worst = max((abs(x[1] - y[1]) for x, y in zip(va, vb, strict=False)), default=float("nan"))
            same_steps = [s for s, _ in va] == [s for s, _ in vb]
            diffs.append({"variant": key, f"{metric} per value": " ".join(f"{v:.2f}" for _, v in va),
                          f"{metric} shared": " ".join(f"{v:.2f}" for _, v in vb),
                          "max |diff|": f"{worst:.2g}", "same steps": same_steps})
        print(table(diffs))
        ratio = rows[1]["trial_phase_s"] / max(1, rows[0]["trial_phase_s"])
        print(f"trial-phase wall, shared / per value: {ratio:.3f}; "
              f"total wall: {rows[1]['wall_s'] / max(1, rows[0]['wall_s']):.3f}")
        if args.out:
            args.out.write_text(json.dumps({"conditions": info, "runs": rows, "variants": diffs,
                                            "trial_phase_ratio": ratio}, indent=1))
    finally:
        shutil.rmtree(project, ignore_errors=True)


if __name__ == "__main__":
    main()
