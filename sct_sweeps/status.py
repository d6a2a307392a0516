"""What `sct-sweep status` shows: Ray's stored experiment state, read without starting Ray.

It reads the results directory only (a shared path on a cluster), so it works while a sweep runs,
after it was killed, and from any machine that sees the storage.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from sct_sweeps.config import SweepSpec
from sct_sweeps.errors import SweepNotFoundError
from sct_sweeps.record import SweepRecord, list_sweeps, load_record
from sct_sweeps.space import run_name, swept_values, trial_config, variant_config
from sct_sweeps.stores import resolve_stores
from sct_sweeps.variants import variant_grid
from trainer.config import variant_metric


def stored_analysis(results_dir: str) -> Any:
    """The sweep's stored Ray experiment state as an ExperimentAnalysis (None before the first save)."""
    from ray.tune import ExperimentAnalysis

    return None if _newest_state_file(results_dir) is None else ExperimentAnalysis(results_dir)


def _newest_state_file(results_dir: str) -> Path | None:
    from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint

    newest = _find_newest_experiment_checkpoint(results_dir) if Path(results_dir).is_dir() else None
    return None if newest is None else Path(newest)


def _record(name: str, storage: Path | None) -> SweepRecord:
    return load_record(name, resolve_stores(storage=storage).results)


def state_saved_at(name: str, storage: Path | None = None) -> float | None:
    """When the driver last saved the sweep's trial states (epoch seconds; None before the first save).

    A RUNNING trial in a snapshot much older than a few minutes means the driver is gone: resume it.
    """
    newest = _newest_state_file(_record(name, storage).results_dir)
    return None if newest is None else newest.stat().st_mtime


def trial_states(results_dir: str) -> dict[str, str]:
    """trial id -> Ray status (PENDING, RUNNING, TERMINATED, ERROR, PAUSED) as the driver last stored it.

    Read from the newest experiment_state file itself: loading it as Trial objects (ExperimentAnalysis)
    turns RUNNING into PENDING, the state a restored trial restarts in.
    """
    newest = _newest_state_file(results_dir)
    if newest is None:
        return {}
    states = {}
    for trial_json, _ in json.loads(newest.read_text())["trial_data"]:
        trial = json.loads(trial_json)
        states[trial["trial_id"]] = trial["status"]
    return states


def _best(trial: Any, metric: str, mode: str) -> float | None:
    stats = (trial.metric_analysis or {}).get(metric) or {}
    v = stats.get(mode)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _last_error(trial: Any) -> str:
    """Last line of the trial's error file in the results storage (`trial.error_file` needs a running Ray)."""
    name = trial.run_metadata.error_filename
    path = Path(trial.path, name) if name and trial.path else None
    if path is None or not path.is_file():
        return ""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return lines[-1][:80] if lines else ""


def _nodes(last: dict) -> str:
    """The node of a trial's latest result; of a multi-worker trial its workers' distinct nodes (rank 0's first)."""
    ids = str(last.get("nodes") or last.get("node_id") or "").split(",")
    short = list(dict.fromkeys(i[:12] for i in ids if i))
    return ",".join(short) or str(last.get("node_ip", "") or "-")


def trial_identity(spec: SweepSpec, config: dict[str, Any], variant: dict[str, Any] | None = None) -> tuple[str, str]:
    """A trial's (or one evaluated variant's) MLflow run name and its swept values (`seed=0, sct.ref_batch=all`)
    from its Ray config."""
    swept = {**swept_values(spec, config), **(variant or {})}
    text = ", ".join(f"{p}={v:.3g}" if isinstance(v, float) else f"{p}={v}" for p, v in swept.items())
    cfg = trial_config(spec, config)
    return run_name(variant_config(cfg, variant) if variant else cfg, swept), text


def trial_rows(name: str, storage: Path | None = None) -> tuple[str, list[tuple[str, ...]]]:
    """(metric, rows of trial id, run name, swept values, state, node, iteration, best metric so far,
    last error line): a row per trial, or per evaluated variant of each trial (sct_sweeps/variants.py)."""
    record = _record(name, storage)
    spec = record.spec
    analysis = stored_analysis(record.results_dir)
    if analysis is None:
        raise SweepNotFoundError(f"{name}: no Ray experiment state in {record.results_dir} yet")
    states = trial_states(record.results_dir)
    rows = []
    variants: list[dict[str, Any] | None] = [*variant_grid(spec)] or [None]
    for t in sorted(analysis.trials, key=lambda t: t.trial_id):
        last = t.last_result or {}
        it = last.get("iteration")
        state = states.get(t.trial_id, t.status)
        error = _last_error(t) if state == "ERROR" else ""
        for k, variant in enumerate(variants):
            best = _best(t, spec.metric if variant is None else variant_metric(k, spec.metric), spec.mode)
            rows.append((t.trial_id, *trial_identity(spec, t.config or {}, variant), state, _nodes(last),
                         "-" if it is None else str(int(it)), "-" if best is None else f"{best:.4g}", error))
    return spec.metric, rows


def sweep_rows(storage: Path | None = None) -> list[tuple[str, ...]]:
    """One row per sweep: name, trial count, states, MLflow store, results directory."""
    rows = []
    for r in list_sweeps(resolve_stores(storage=storage).results):
        states = Counter(trial_states(r.results_dir).values())
        text = ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) or "not started"
        rows.append((r.name, str(sum(states.values())), text, r.tracking_uri, r.results_dir))
    return rows


__all__ = ["sweep_rows", "trial_rows", "trial_states", "state_saved_at", "load_record"]
