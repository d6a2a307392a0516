"""Power-law scaling of FID with compute: FID(C) = a·C^(−b) + c, the log-log line, a bootstrap CI.

Points are the Pareto frontier of (compute, FID) over all trials and evaluation steps (the lowest
FID reached at or below each compute), as in compute-optimal scaling studies. Fits are least
squares in log space, so every decade of FID weighs the same.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from dashboards.errors import DashboardError
from sct_sweeps import schema

log = logging.getLogger(__name__)

MIN_DISTINCT = 4  # three parameters need at least four distinct compute values
X_QUANTITIES = ("flops", "images_seen", "n_params")
X_LABELS = {"flops": "training compute C (FLOPs)", "images_seen": "training images seen",
            "n_params": "parameter count"}


class ScalingError(DashboardError, ValueError):
    """The points cannot support a power-law fit (too few, degenerate, or the fit failed)."""


@dataclass(frozen=True, kw_only=True)
class PowerLawFit:
    """FID(C) = a·C^(−b) + c and the pure line log FID = log a_ll − b_ll log C; R² in log space."""

    a: float
    b: float
    c: float
    r2: float
    loglog_a: float
    loglog_b: float
    loglog_r2: float
    n_points: int

    def predict(self, C: np.ndarray) -> np.ndarray:
        return self.a * np.asarray(C, float) ** (-self.b) + self.c

    def predict_loglog(self, C: np.ndarray) -> np.ndarray:
        return self.loglog_a * np.asarray(C, float) ** (-self.loglog_b)


@dataclass(frozen=True, kw_only=True)
class ExponentCI:
    """Bootstrap distribution of the fits; `low`/`high` bound the exponent b (95% percentile)."""

    low: float
    high: float
    loglog_low: float
    loglog_high: float
    params: np.ndarray  # (n_ok, 3): a, b, c of each successful resample
    n_boot: int

    @property
    def n_ok(self) -> int:
        return len(self.params)

    def band(self, C: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise percentile band of the resampled curves a·C^(−b) + c."""
        C = np.asarray(C, float)
        curves = self.params[:, :1] * C[None, :] ** (-self.params[:, 1:2]) + self.params[:, 2:3]
        q = 50 * (1 - level)
        return np.percentile(curves, q, axis=0), np.percentile(curves, 100 - q, axis=0)


def _clean(C: Sequence[float], fid: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    C, fid = np.asarray(C, float).ravel(), np.asarray(fid, float).ravel()
    if C.shape != fid.shape:
        raise ScalingError(f"compute and FID differ in length ({C.size} vs {fid.size})")
    if not (np.all(np.isfinite(C)) and np.all(np.isfinite(fid))):
        raise ScalingError("compute or FID contains NaN or infinite values")
    if np.any(C <= 0):
        raise ScalingError("compute must be positive for a power law (found a value <= 0)")
    if np.any(fid <= 0):
        raise ScalingError("FID must be positive for a fit in log space (found a value <= 0)")
    if np.unique(C).size < MIN_DISTINCT:
        raise ScalingError(f"need at least {MIN_DISTINCT} distinct compute values, got {np.unique(C).size}")
    if np.ptp(fid) <= 1e-12 * np.abs(fid).max():
        raise ScalingError("FID is constant across compute; there is no trend to fit")
    return C, fid


def _r2(y: np.ndarray, yhat: np.ndarray) -> float:
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - yhat) ** 2)) / ss_tot if ss_tot > 0 else float("nan")


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope and intercept of y on x."""
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def fit_power_law(C: Sequence[float], fid: Sequence[float],
                  init: tuple[float, float, float] | None = None) -> PowerLawFit:
    """Fit FID(C) = a·C^(−b) + c (c >= 0) and log FID = log a − b log C; raise ScalingError on failure."""
    C, fid = _clean(C, fid)
    y = np.log(fid)
    # Work in u = C / C0 (C0 the geometric mean) so the parameters are of order one.
    log_c0 = float(np.mean(np.log(C)))
    x = np.log(C) - log_c0
    slope, intercept = _line(x, y)  # log FID = log a − b log C (pure log-log line)
    ll_b = -slope
    if ll_b <= 0:
        raise ScalingError(f"FID does not fall with compute (log-log slope {slope:+.3g}); no power law to fit")
    ll_r2 = _r2(y, intercept + slope * x)

    c_max = float(fid.min()) * (1 - 1e-9)  # a·C^(−b) + c > c, so c must stay below the lowest FID

    def residual(p: np.ndarray) -> np.ndarray:
        log_a0, b, c = p  # a0 = a·C0^(−b): the power-law term at the geometric-mean compute
        return np.logaddexp(log_a0 - b * x, np.log(max(c, 1e-300))) - y

    starts = []
    if init is not None:
        a, b, c = init
        starts.append((np.log(a) - b * log_c0, b, min(max(c, 0.0), c_max)))
    else:
        for frac in (0.0, 0.5, 0.9):
            c0 = frac * c_max
            s, i = _line(x, np.log(fid - c0))
            starts.append((i, max(-s, 1e-3), c0))
    best = None
    for p0 in starts:
        try:
            res = least_squares(residual, p0, bounds=([-np.inf, 0.0, 0.0], [np.inf, 20.0, c_max]),
                                method="trf", x_scale=[1.0, 0.1, max(c_max, 1e-12)])
        except (ValueError, FloatingPointError) as e:
            log.debug("start %s failed: %s", p0, e)
            continue
        if np.all(np.isfinite(res.x)) and (best is None or res.cost < best.cost):
            best = res
    if best is None or not best.success:
        raise ScalingError("the power-law least-squares fit did not converge")
    log_a0, b, c = (float(v) for v in best.x)
    a = float(np.exp(log_a0 + b * log_c0))
    if not (np.isfinite(a) and a > 0 and b > 0):
        raise ScalingError(f"the power-law fit is degenerate (a={a:.3g}, b={b:.3g})")
    r2 = _r2(y, y + best.fun)
    return PowerLawFit(a=a, b=b, c=c, r2=r2, loglog_a=float(np.exp(intercept - slope * log_c0)), loglog_b=ll_b,
                       loglog_r2=ll_r2, n_points=int(C.size))


def pareto_frontier(C: Sequence[float], fid: Sequence[float]) -> np.ndarray:
    """Indices (by increasing compute) of the points with the lowest FID at or below their compute."""
    C, fid = np.asarray(C, float), np.asarray(fid, float)
    order = np.lexsort((fid, C))  # by compute, ties by FID
    keep, best = [], np.inf
    for i in order:
        if fid[i] < best:
            keep.append(i)
            best = fid[i]
    return np.asarray(keep, dtype=int)


def _pooled(points_by_trial: Mapping[str, tuple[Sequence[float], Sequence[float]]], keys: Sequence[str],
            frontier: bool) -> tuple[np.ndarray, np.ndarray]:
    C = np.concatenate([np.asarray(points_by_trial[k][0], float) for k in keys])
    fid = np.concatenate([np.asarray(points_by_trial[k][1], float) for k in keys])
    if frontier:
        idx = pareto_frontier(C, fid)
        return C[idx], fid[idx]
    return C, fid


def bootstrap_exponent(points_by_trial: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                       n_boot: int = 200, seed: int = 0, level: float = 0.95,
                       frontier: bool = True) -> ExponentCI:
    """Percentile CI of b, resampling whole trials (seeds) with replacement and refitting."""
    keys = list(points_by_trial)
    if len(keys) < 2:
        raise ScalingError(f"bootstrap needs at least 2 trials to resample, got {len(keys)}")
    full = fit_power_law(*_pooled(points_by_trial, keys, frontier))
    rng = np.random.default_rng(seed)
    fits = []
    for _ in range(n_boot):
        pick = [keys[i] for i in rng.integers(0, len(keys), len(keys))]
        try:
            f = fit_power_law(*_pooled(points_by_trial, pick, frontier), init=(full.a, full.b, full.c))
        except ScalingError:
            continue
        fits.append((f.a, f.b, f.c, f.loglog_b))
    if len(fits) < max(10, n_boot // 2):
        raise ScalingError(f"only {len(fits)} of {n_boot} bootstrap resamples could be fitted")
    arr = np.asarray(fits)
    q = 50 * (1 - level)
    lo, hi = np.percentile(arr[:, 1], [q, 100 - q])
    llo, lhi = np.percentile(arr[:, 3], [q, 100 - q])
    return ExponentCI(low=float(lo), high=float(hi), loglog_low=float(llo), loglog_high=float(lhi), params=arr[:, :3],
                      n_boot=n_boot)


@dataclass
class ScalingResult:
    """One fit of the sweep: FID of the k-step sampler against one cost quantity."""

    x: str
    steps: int
    C: np.ndarray  # every (trial, evaluation) point
    fid: np.ndarray
    frontier: np.ndarray  # indices into C / fid
    fit: PowerLawFit | None = None
    ci: ExponentCI | None = None
    error: str | None = None
    ci_error: str | None = None


def _cumulative_at(steps: pd.Series, known_steps: pd.Series, known: pd.Series) -> np.ndarray:
    """A cumulative cost at `steps`: linear between logged steps, extended along the last slope."""
    s, ks, kv = (np.asarray(v, float) for v in (steps, known_steps, known))
    out = np.interp(s, ks, kv)
    if ks.size >= 2 and ks[-1] > ks[-2]:
        slope = (kv[-1] - kv[-2]) / (ks[-1] - ks[-2])
        out = np.where(s > ks[-1], kv[-1] + slope * (s - ks[-1]), out)
    return out


def points_by_trial(history: pd.DataFrame, x: str, fid_col: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(cost, FID) at each evaluation of each trial; cost interpolated over steps where not logged."""
    out = {}
    for tid, g in history.groupby("trial_id", sort=True):
        g = g.sort_values("step")
        if fid_col not in g or x not in g or g[x].notna().sum() == 0:
            continue
        known = g[x].notna()
        if x == "n_params":  # logged once: constant per trial
            cost = pd.Series(g.loc[known, x].iloc[-1], index=g.index)
        else:
            cost = pd.Series(_cumulative_at(g["step"], g.loc[known, "step"], g.loc[known, x]), index=g.index)
        ev = g[fid_col].notna()
        usable = ev & np.isfinite(g[fid_col].where(ev, 0.0)) & (g[fid_col] > 0) & np.isfinite(cost) & (cost > 0)
        before_training = ev & (cost == 0)  # the evaluation at step 0: zero compute, off a log axis by design
        if (ev & ~usable & ~before_training).any():  # a diverged trial (inf FID) cannot sit on a log axis
            log.warning("trial %s: %d %s evaluations skipped (non-finite or non-positive)", tid,
                        int((ev & ~usable & ~before_training).sum()), fid_col)
        ev = usable
        if ev.any():
            out[str(tid)] = (cost[ev].to_numpy(float), g.loc[ev, fid_col].to_numpy(float))
    return out


def varied_quantities(history: pd.DataFrame) -> list[str]:
    """Cost quantities worth a fit: flops always; images_seen if not proportional to flops; params if varied."""
    out = ["flops"] if "flops" in history else []
    if "images_seen" in history:
        ok = history[["flops", "images_seen"]].dropna() if "flops" in history else history[["images_seen"]]
        ratio = ok["flops"] / ok["images_seen"].where(ok["images_seen"] > 0) if "flops" in ok else None
        if ratio is None or ratio.dropna().round(6).nunique() > 1:
            out.append("images_seen")
    if "n_params" in history and history.groupby("trial_id")["n_params"].max().nunique() >= MIN_DISTINCT:
        out.append("n_params")
    return out


def fit_sweep(history: pd.DataFrame, fid_steps: Sequence[int], n_boot: int = 200,
              seed: int = 0) -> list[ScalingResult]:
    """Every fit of a sweep: each sampler (k-step FID) against each varied cost quantity."""
    results = []
    for x in varied_quantities(history):
        for k in fid_steps:
            pts = points_by_trial(history, x, schema.fid_metric(k))
            if x == "n_params":  # a trial's best FID at its size: one point per trial
                pts = {t: (c[-1:], np.asarray([f.min()])) for t, (c, f) in pts.items()}
            if not pts:
                continue
            C = np.concatenate([p[0] for p in pts.values()])
            fid = np.concatenate([p[1] for p in pts.values()])
            front = pareto_frontier(C, fid)
            r = ScalingResult(x, k, C, fid, front)
            try:
                if np.unique(C[front]).size < MIN_DISTINCT:  # say why when there are many evaluations
                    raise ScalingError(f"only {np.unique(C[front]).size} distinct {x} values on the Pareto frontier "
                                       f"of {C.size} evaluations; a fit needs at least {MIN_DISTINCT}")
                r.fit = fit_power_law(C[front], fid[front])
            except ScalingError as e:
                r.error = str(e)
                log.warning("scaling fit of %d-step FID vs %s: %s", k, x, e)
            if r.fit is not None and n_boot <= 0:
                r.ci_error = "bootstrap off (n_boot = 0)"
            elif r.fit is not None:
                try:
                    r.ci = bootstrap_exponent(pts, n_boot=n_boot, seed=seed)
                except ScalingError as e:
                    r.ci_error = str(e)
            results.append(r)
    return results
