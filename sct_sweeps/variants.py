"""Evaluation-only axes: train once per distinct training, evaluate every sampling variant on it.

A grid axis on an evaluation-only setting (trainer/config.py EVAL_ONLY: sampler steps, η, edge-skip mode,
t_mid, guidance strength and bad fraction, the FID sample count, ...) never changes the trained weights.
Such axes leave Ray's search space: one Ray trial trains each combination of the other axes (a
*training*), and at every evaluation point its trainer scores every combination of the evaluation axes
(a *variant*, `eval.variants`) on the same weights with the same noise per seed. Each variant is its own
MLflow child run (tags ``sct.variant`` and ``sct.training``), so Compare, the report, export and the
scaling fits treat it as a trial; the training's cost is counted once.

Optuna samples the training axes, and each of its trials evaluates the whole variant grid; Ray (ASHA,
Optuna) sees for the sweep's metric the training's best variant. An evaluation-only axis given as a
distribution (choice, uniform, ...) stays an ordinary trial axis, sampled per trial. `share_training:
false` in the YAML trains every variant separately (the control the benchmark compares against).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from trainer.config import is_eval_only

if TYPE_CHECKING:
    from sct_sweeps.config import Axis, SweepSpec


def is_variant_axis(spec: SweepSpec, path: str, axis: Axis) -> bool:
    """Whether the search axis at `path` is evaluated on every training instead of trained per value."""
    return spec.share_training and axis.kind == "grid" and is_eval_only(path)


def eval_axes(spec: SweepSpec) -> dict[str, list[Any]]:
    """The evaluation-only grid axes: path -> values (each training evaluates all their combinations)."""
    return {p: list(a.grid or []) for p, a in spec.search.items() if is_variant_axis(spec, p, a)}


def training_axes(spec: SweepSpec) -> dict[str, Axis]:
    """The search axes Ray searches: every axis but the evaluation-only grids."""
    return {p: a for p, a in spec.search.items() if not is_variant_axis(spec, p, a)}


def variant_grid(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every combination of the evaluation axes, in the spec's order ([] when there are none)."""
    axes = eval_axes(spec)
    if not axes:
        return []
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]


def variants_per_training(spec: SweepSpec) -> int:
    """How many variant runs each training gets (1 without evaluation axes)."""
    return math.prod(len(v) for v in eval_axes(spec).values())


def variant_key(variant: Mapping[str, Any]) -> str:
    """A variant's identity, its tag ``sct.variant``: `guidance.strength=1.5,sampler.eta=0.2` (sorted)."""
    return ",".join(f"{p}={variant[p]}" for p in sorted(variant))


def best_of(values: list[float], mode: str) -> float:
    """The best of the variants' values of one metric (NaN ones ignored; NaN when none is a number)."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan
    return min(finite) if mode == "min" else max(finite)
