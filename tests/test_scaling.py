"""Power-law fit, Pareto frontier and bootstrap CI of dashboards.scaling on synthetic points."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dashboards.scaling import (
    ScalingError,
    bootstrap_exponent,
    fit_power_law,
    fit_sweep,
    pareto_frontier,
    points_by_trial,
    varied_quantities,
)

A, B, C0 = 1e6, 0.3, 10.0  # true FID(C) = A·C^(−B) + C0


def power_law(C: np.ndarray) -> np.ndarray:
    return A * C ** (-B) + C0


def noisy_trials(rng: np.random.Generator, n_trials: int = 6, n_evals: int = 8,
                 noise: float = 0.03) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    C = np.logspace(12, 17, n_evals)
    return {f"t{i}": (C, power_law(C) * np.exp(rng.normal(0, noise, C.size))) for i in range(n_trials)}


def test_fit_recovers_a_b_c_within_5_percent() -> None:
    rng = np.random.default_rng(0)
    C = np.logspace(12, 17, 30)
    fid = power_law(C) * np.exp(rng.normal(0, 0.01, C.size))  # 1% multiplicative noise
    f = fit_power_law(C, fid)
    assert f.a == pytest.approx(A, rel=0.05)
    assert f.b == pytest.approx(B, rel=0.05)
    assert f.c == pytest.approx(C0, rel=0.05)
    assert f.r2 > 0.99 and f.n_points == 30
    assert np.allclose(f.predict(C), power_law(C), rtol=0.03)


def test_loglog_line_is_exact_on_a_pure_power_law() -> None:
    C = np.logspace(9, 15, 12)
    f = fit_power_law(C, 500.0 * C ** -0.25)
    assert f.loglog_b == pytest.approx(0.25, rel=1e-6)
    assert f.loglog_a == pytest.approx(500.0, rel=1e-6)
    assert f.loglog_r2 == pytest.approx(1.0)
    assert f.c == pytest.approx(0.0, abs=1e-3)  # no floor in the data: the fit finds none


def test_fit_does_not_depend_on_compute_units() -> None:
    rng = np.random.default_rng(1)
    C = np.logspace(12, 17, 20)
    fid = power_law(C) * np.exp(rng.normal(0, 0.02, C.size))
    f1, f2 = fit_power_law(C, fid), fit_power_law(C / 1e12, fid)  # FLOPs vs TFLOPs
    assert f1.b == pytest.approx(f2.b, rel=1e-4) and f1.c == pytest.approx(f2.c, rel=1e-3)


@pytest.mark.parametrize(("C", "fid", "needle"), [
    ([1e9, 1e10], [50.0, 30.0], "at least 4 distinct"),
    ([1e9, 1e9, 1e10, 1e10, 1e11, 1e11], [60, 50, 40, 30, 20, 10], "at least 4 distinct"),
    ([1e9, 1e10, 1e11, 1e12], [30.0, 30.0, 30.0, 30.0], "constant"),
    ([1e9, 1e10, np.nan, 1e12], [40.0, 30.0, 20.0, 10.0], "NaN"),
    ([1e9, 1e10, 1e11, 1e12], [40.0, np.nan, 20.0, 10.0], "NaN"),
    ([-1e9, 1e10, 1e11, 1e12], [40.0, 30.0, 20.0, 10.0], "positive"),
    ([0.0, 1e10, 1e11, 1e12], [40.0, 30.0, 20.0, 10.0], "positive"),
    ([1e9, 1e10, 1e11, 1e12], [40.0, 30.0, 0.0, 10.0], "positive"),
    ([1e9, 1e10, 1e11, 1e12], [10.0, 20.0, 30.0, 40.0], "does not fall"),
    ([1e9, 1e10, 1e11], [40.0, 30.0, 20.0], "at least 4 distinct"),
    ([1e9, 1e10, 1e11, 1e12], [40.0, 30.0, 20.0], "differ in length"),
])
def test_degenerate_inputs_raise_scaling_error(C: list, fid: list, needle: str) -> None:
    with pytest.raises(ScalingError, match=needle) as e:
        fit_power_law(C, fid)
    assert "\n" not in str(e.value)


def test_pareto_frontier_keeps_lowest_fid_at_or_below_each_compute() -> None:
    C = np.array([4.0, 1.0, 2.0, 2.0, 3.0, 5.0, 6.0])
    fid = np.array([25.0, 50.0, 40.0, 45.0, 42.0, 20.0, 21.0])
    idx = pareto_frontier(C, fid)
    assert list(idx) == [1, 2, 0, 5]  # (3, 42) is beaten by (2, 40); (6, 21) by (5, 20)
    assert np.all(np.diff(C[idx]) > 0) and np.all(np.diff(fid[idx]) < 0)


def test_bootstrap_needs_two_trials() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ScalingError, match="at least 2 trials"):
        bootstrap_exponent(noisy_trials(rng, n_trials=1), n_boot=20)


@pytest.mark.slow
@pytest.mark.parametrize(("frontier", "min_cover"), [(False, 17), (True, 14)])
def test_bootstrap_ci_covers_true_exponent_in_most_repeats(frontier: bool, min_cover: int) -> None:
    covered, widths = 0, []
    for rep in range(20):
        ci = bootstrap_exponent(noisy_trials(np.random.default_rng(rep)), n_boot=40, seed=rep, frontier=frontier)
        assert ci.n_ok >= 20 and ci.low < ci.high
        covered += ci.low <= B <= ci.high
        widths.append(ci.high - ci.low)
    assert covered >= min_cover, f"CI covered b={B} in {covered}/20 repeats"
    assert np.median(widths) < 0.1  # informative, not a trivially wide interval


def _history() -> pd.DataFrame:
    rows = []
    for t, width in enumerate((1.0, 2.0, 4.0, 8.0)):
        for step in (0, 50, 100, 150, 200):
            row = {"trial_id": f"t{t}", "run_id": f"r{t}", "step": step, "flops": width * 1e9 * step,
                   "images_seen": 128.0 * step, "n_params": 1e5 * width if step == 0 else np.nan}
            if step in (100, 200):  # evaluations logged at their own steps, cost not logged there
                C = width * 1e9 * step
                row.update(flops=np.nan, images_seen=np.nan, fid_1step=power_law(C), fid_2step=0.5 * power_law(C))
            rows.append(row)
    return pd.DataFrame(rows)


def test_points_interpolate_cost_to_evaluation_steps() -> None:
    pts = points_by_trial(_history(), "flops", "fid_1step")
    C, fid = pts["t1"]
    assert list(C) == [2e11, 4e11] and len(fid) == 2
    assert list(points_by_trial(_history(), "n_params", "fid_1step")["t2"][0]) == [4e5, 4e5]


def test_varied_quantities_skips_images_seen_proportional_to_flops() -> None:
    h = _history()
    assert varied_quantities(h) == ["flops", "images_seen", "n_params"]
    h1 = h[h.trial_id == "t0"]
    assert varied_quantities(h1) == ["flops"]


def test_fit_sweep_reports_failures_without_a_curve() -> None:
    h = _history()
    fits = fit_sweep(h[h.trial_id.isin(["t0", "t1"])], [1, 2], n_boot=20)
    assert {r.x for r in fits} == {"flops", "images_seen"}  # params: only 2 sizes, not a varied quantity
    assert all(r.fit is None and r.ci is None and "distinct" in r.error for r in fits)


def test_fit_sweep_skips_diverged_evaluations() -> None:
    h = _history()
    h.loc[(h.trial_id == "t3") & (h.step == 200), "fid_1step"] = np.inf  # a diverged trial
    fits = {(r.x, r.steps): r for r in fit_sweep(h, [1], n_boot=20)}
    r = fits[("flops", 1)]
    assert np.all(np.isfinite(r.fid)) and r.C.size == 7 and r.fit is not None
    assert r.ci is not None or "resamples could be fitted" in r.ci_error  # 4 trials: most resamples too few
    off = fit_sweep(h, [1], n_boot=0)[0]
    assert off.fit is not None and off.ci is None and "n_boot = 0" in off.ci_error


def test_dashboard_errors_are_their_own_and_one_line_in_the_cli() -> None:
    from dashboards.errors import DashboardError
    from dashboards.loader import ResultsError
    from sct_sweeps.errors import user_message
    from trainer.errors import TrainerError

    rng = np.random.default_rng(0)
    with pytest.raises(DashboardError) as info:
        bootstrap_exponent(noisy_trials(rng, n_trials=1), n_boot=20)
    assert not isinstance(info.value, TrainerError) and issubclass(ResultsError, DashboardError)
    assert user_message(info.value) == str(info.value).splitlines()[0]
