"""PNG figures of a sweep: FID curves, the scaling fit, one ablation panel per axis, sample grids.

Figures are built with `matplotlib.figure.Figure` (Agg canvas, no pyplot state), so drawing is
safe in any thread or process. One colour per trial group (trials that differ only in seed).
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from dashboards.loader import SweepResults, Trial, parse_value
from dashboards.scaling import X_LABELS, ScalingResult
from sct_sweeps import schema

log = logging.getLogger(__name__)

SEED_AXES = ("seed",)
# Ablation axes drawn whenever they vary across trials, tagged as an axis or not.
ABLATION_PARAMS = ("schedule.mapping", "schedule.q", "schedule.double_every", "schedule.smooth",
                   "sct.ref_batch", "sampler.eta", "guidance.strength")
STEP_STYLES = {1: "-", 2: "--"}
DPI = 110


def _style(k: int) -> str:
    return STEP_STYLES.get(k, ":")


def _steps_label(k: int) -> str:
    return f"{k}-step"


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    log.info("wrote %s", path)
    return path


def _short(name: str, names: Sequence[str]) -> str:
    """Last dotted component when it is unambiguous among `names`, else the full path."""
    last = name.rsplit(".", 1)[-1]
    return last if sum(n.rsplit(".", 1)[-1] == last for n in names) == 1 else name


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def trial_value(t: Trial, axis: str) -> object:
    """A trial's value on an axis: its `sct.axis.*` tag, else its logged param."""
    return t.axes[axis] if axis in t.axes else parse_value(t.params.get(axis))


def group_axes(res: SweepResults) -> list[str]:
    """Axes that define a trial group: every swept axis except the seed."""
    return [a for a in res.axis_names if a not in SEED_AXES]


def group_label(t: Trial, axes: Sequence[str]) -> str:
    if not axes:
        return t.trial_id
    return ", ".join(f"{_short(a, axes)}={_fmt(trial_value(t, a))}" for a in axes)


def group_colours(labels: Sequence[str]) -> dict[str, tuple]:
    """One colour per distinct label, in first-seen order (tab10, then viridis for many groups)."""
    import matplotlib

    uniq = list(dict.fromkeys(labels))
    cmap = matplotlib.colormaps["tab10" if len(uniq) <= 10 else "viridis"]
    n = max(len(uniq) - 1, 1)
    return {g: cmap(i if len(uniq) <= 10 else i / n) for i, g in enumerate(uniq)}


def _log_if_wide(ax, axis: str, values: np.ndarray, ratio: float = 10.0) -> None:
    """Log scale when the values span `ratio` or more; plain-number tick labels within two decades."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v) & (v > 0)]
    if not (v.size and v.max() / v.min() >= ratio):
        return
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    if v.max() / v.min() < 100:
        target = ax.yaxis if axis == "y" else ax.xaxis
        target.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
        target.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        target.set_minor_formatter(NullFormatter())


def seed_curves(res: SweepResults) -> pd.DataFrame:
    """FID vs iteration per trial group and sampler over the group's seeds: columns group, k, step,
    mean, min, max, n (steps that every seed of the group evaluated)."""
    axes = group_axes(res)
    labels = {t.trial_id: group_label(t, axes) for t in res.trials}
    rows = []
    for k in res.fid_steps:
        col = schema.fid_metric(k)
        if col not in res.history:
            continue
        pts = res.history[["trial_id", "step", col]].dropna()
        pts = pts.assign(group=pts.trial_id.map(labels))
        for (group, step), g in pts.groupby(["group", "step"], sort=True):
            rows.append({"group": group, "k": k, "step": int(step), "mean": g[col].mean(), "min": g[col].min(),
                         "max": g[col].max(), "n": g.trial_id.nunique()})
    out = pd.DataFrame(rows, columns=["group", "k", "step", "mean", "min", "max", "n"])
    if out.empty:
        return out
    seeds = pd.Series(labels).value_counts()  # trials per group
    return out[out.n == out.group.map(seeds)].reset_index(drop=True)


_LINES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


@dataclass(frozen=True)
class CurveStyle:
    """How one trial group's curve looks: colour by its first swept axis, line and marker by the others."""

    colour_label: str
    colour: tuple
    style_label: str
    ls: str
    marker: str


def curve_styles(res: SweepResults) -> dict[str, CurveStyle]:
    """Trial group label (as in `seed_curves`) -> its CurveStyle."""
    axes = group_axes(res)
    first, rest = (axes[:1] or res.axis_names[:1]), axes[1:]  # a seeds-only sweep: one colour per seed
    labels = {group_label(t, axes): (group_label(t, first) if first else t.trial_id, group_label(t, rest)
                                     if rest else "") for t in res.trials}
    colours = group_colours([c for c, _ in labels.values()])
    others = list(dict.fromkeys(r for _, r in labels.values()))
    return {g: CurveStyle(c, colours[c], r, _LINES[others.index(r) % len(_LINES)],
                          _MARKERS[others.index(r) % len(_MARKERS)]) for g, (c, r) in labels.items()}


def _curve_legends(fig: Figure, res: SweepResults, styles: dict[str, CurveStyle]) -> None:
    """Every colour (first swept axis) and every line style (the other axes) in the legend."""
    axes = group_axes(res) or res.axis_names[:1]
    colours = {s.colour_label: s.colour for s in styles.values()}
    fig.legend(handles=[Line2D([], [], color=c, lw=2, label=lab) for lab, c in colours.items()],
               title=f"colour: {axes[0]}" if axes else "trial", fontsize=8, title_fontsize=8,
               loc="outside right upper", ncols=1 if len(colours) <= 16 else 2)
    looks = {s.style_label: (s.ls, s.marker) for s in styles.values() if s.style_label}
    if looks:
        fig.legend(handles=[Line2D([], [], color="k", ls=ls, marker=m, label=lab) for lab, (ls, m) in looks.items()],
                   title="line: " + ", ".join(axes[1:]), fontsize=8, title_fontsize=8, loc="outside right lower")


def plot_fid_curves(res: SweepResults, path: Path) -> Path:
    """`fid_curves_figure` as a PNG at `path`."""
    return _save(fid_curves_figure(res), path)


def fid_curves_figure(res: SweepResults) -> Figure:
    """FID vs tuning iteration, one panel per sampler (1-step, 2-step, ...); colour by the first swept axis,
    line style by the others; a group of several seeds is drawn as its mean with a min-max band."""
    styles = curve_styles(res)
    curves = seed_curves(res)
    steps = res.fid_steps or [1]
    fig = Figure(figsize=(5.2 * len(steps) + 2.5, 4.8), layout="constrained")
    shared = None
    for i, k in enumerate(steps):
        ax = fig.add_subplot(1, len(steps), i + 1, sharey=shared)
        shared = shared or ax
        mine = curves[curves.k == k]
        for group, c in mine.groupby("group", sort=False):
            st = styles[group]
            ax.plot(c["step"], c["mean"], ls=st.ls, marker=st.marker, ms=4, lw=1.8, color=st.colour)
            if c.n.max() > 1:
                ax.fill_between(c["step"], c["min"], c["max"], color=st.colour, alpha=0.15, lw=0)
        if mine.empty:
            ax.text(0.5, 0.5, f"no {_steps_label(k)} FID logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{_steps_label(k)} sampler")
        ax.set_xlabel("tuning iteration")
        ax.grid(True, which="both", alpha=0.3)
    if len(curves):
        _log_if_wide(shared, "y", curves[["min", "max"]].to_numpy().ravel())
    shared.set_ylabel("FID (EMA weights; lower is better)")
    seeds = "; mean over seeds, min-max band" if len(curves) and curves.n.max() > 1 else ""
    fig.suptitle(f"{res.sweep}: FID during training ({len(res.trials)} trials{seeds})")
    _curve_legends(fig, res, styles)
    return fig


def _num(v: float, scale: float) -> str:
    """3 significant digits; values negligible next to `scale` print as 0."""
    return "0" if abs(v) < 1e-6 * scale else f"{v:.3g}"


def _fit_text(r: ScalingResult, xname: str) -> str:
    f = r.fit
    lines = [rf"FID = $a\,{xname}^{{-b}} + c$", f"a = {f.a:.3g}, b = {f.b:.3f}, c = {_num(f.c, r.fid.min())}",
             f"R² (log) = {f.r2:.3f}, n = {f.n_points}"]
    if r.ci is not None:
        lines.append(f"b 95% CI [{r.ci.low:.3f}, {r.ci.high:.3f}] ({r.ci.n_ok} resamples)")
    elif r.ci_error:
        lines.append(f"no CI: {r.ci_error}")
    lines.append(f"log-log line: b = {f.loglog_b:.3f}, R² = {f.loglog_r2:.3f}")
    return "\n".join(lines)


def _points_label(x: str) -> str:
    return "each trial's best FID" if x == "n_params" else "every evaluation of every trial"


def plot_scaling(results: Sequence[ScalingResult], path: Path) -> Path:
    """FID vs one cost quantity, one panel per sampler: Pareto points, the fit, its CI band."""
    if not results or len({r.x for r in results}) != 1:
        raise ValueError("plot_scaling takes the fits of exactly one cost quantity")
    x = results[0].x
    xname = {"flops": "C", "images_seen": "D", "n_params": "N"}.get(x, "x")
    fig = Figure(figsize=(6.2 * len(results), 6.4), layout="constrained")
    gs = fig.add_gridspec(2, len(results), height_ratios=[5, 1.4])
    for i, r in enumerate(sorted(results, key=lambda r: r.steps)):
        ax = fig.add_subplot(gs[0, i])
        ax.scatter(r.C, r.fid, s=12, color="0.7", label=_points_label(x), zorder=1)
        fc, ff = r.C[r.frontier], r.fid[r.frontier]
        ax.scatter(fc, ff, s=36, color="C0", edgecolor="k", lw=0.5, zorder=3,
                   label="Pareto frontier (fitted)" if r.fit else "Pareto frontier (not fitted)")
        if r.fit is not None:
            grid = np.logspace(np.log10(r.C.min()), np.log10(r.C.max()), 200)
            if r.ci is not None:
                lo, hi = r.ci.band(grid)
                ax.fill_between(grid, lo, hi, color="C3", alpha=0.18, lw=0, label="95% bootstrap band")
            ax.plot(grid, r.fit.predict(grid), color="C3", lw=2, label=rf"fit $a\,{xname}^{{-b}} + c$")
            ax.plot(grid, r.fit.predict_loglog(grid), color="k", ls="--", lw=1, label="log-log line")
            text, colour = _fit_text(r, xname), "0.6"
        else:
            text, colour = textwrap.fill(f"no fit: {r.error}", 48), "C3"
        note = fig.add_subplot(gs[1, i])
        note.set_axis_off()
        note.text(0.0, 1.0, text, transform=note.transAxes, fontsize=8.5, va="top", ha="left",
                  bbox={"boxstyle": "round", "fc": "white" if r.fit else "#fff3f3", "ec": colour})
        ax.set_xscale("log")
        _log_if_wide(ax, "y", r.fid, ratio=3.0)
        ax.set_xlabel(X_LABELS.get(x, x))
        ax.set_ylabel(f"FID, {_steps_label(r.steps)} sampler")
        ax.set_title(f"{_steps_label(r.steps)} FID vs {X_LABELS.get(x, x).split(' (')[0]}")
        ax.grid(True, which="both", alpha=0.3)
        note.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="upper right")  # keeps the data clear
    what = X_LABELS.get(x, x).split(" (")[0]
    fig.supxlabel(f"Fits use the Pareto frontier (lowest FID reached at or below each {what}) over all "
                  f"trials; grey: {_points_label(x)}." + (" Band: 95% bootstrap over trials." if any(
                      r.ci for r in results) else ""), fontsize=8.5,
                  style="italic")
    return _save(fig, path)


def ablation_axes(res: SweepResults) -> list[str]:
    """Swept axes (except the seed) plus the known ablation params that vary across trials."""
    axes = group_axes(res)
    for p in ABLATION_PARAMS:
        if p not in axes and len({t.params.get(p) for t in res.trials}) > 1:
            axes.append(p)
    return axes


def _positions(values: list[object]) -> tuple[list[object], bool]:
    """Sorted distinct axis values and whether the axis is numeric."""
    uniq = list(dict.fromkeys(values))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in uniq)
    return (sorted(uniq) if numeric else sorted(uniq, key=str)), numeric


def plot_ablation(res: SweepResults, axis: str, path: Path) -> Path:
    """Final FID vs one axis, per sampler; mean ± s.d. over seeds, one colour per other-axes group."""
    others = [a for a in ablation_axes(res) if a != axis]
    steps = res.fid_steps or [1]
    fig = Figure(figsize=(5.6 * len(steps), 5.0), layout="constrained")
    values = [trial_value(t, axis) for t in res.trials]
    order, numeric = _positions(values)
    colours = group_colours([group_label(t, others) if others else "all trials" for t in res.trials])
    for i, k in enumerate(steps):
        ax = fig.add_subplot(1, len(steps), i + 1)
        series: dict[str, dict[object, list[float]]] = {}
        for t, v in zip(res.trials, values, strict=True):
            fid = t.final.get(schema.fid_metric(k))
            if fid is not None and np.isfinite(fid):
                series.setdefault(group_label(t, others) if others else "all trials", {}).setdefault(v, []).append(fid)
        n_series = max(len(series), 1)
        for j, (label, by_value) in enumerate(series.items()):
            xs = [v for v in order if v in by_value]
            pos = np.asarray(xs, float) if numeric else np.asarray([order.index(v) for v in xs], float)
            if not numeric:
                pos = pos + 0.08 * (j - (n_series - 1) / 2)  # dodge series on a categorical axis
            means = np.asarray([np.mean(by_value[v]) for v in xs])
            sds = np.asarray([np.std(by_value[v], ddof=1) if len(by_value[v]) > 1 else 0.0 for v in xs])
            ns = sorted({len(by_value[v]) for v in xs})
            colour = colours[label]
            ax.errorbar(pos, means, yerr=sds, color=colour, marker="o", ms=5, capsize=4, lw=1.5,
                        ls="-" if numeric else "none", label=f"{label} (n={'/'.join(map(str, ns))})")
            for p, v in zip(pos, xs, strict=True):
                ax.scatter([p] * len(by_value[v]), by_value[v], s=10, color=colour, alpha=0.4, zorder=1)
        if not series:
            ax.text(0.5, 0.5, f"no final {_steps_label(k)} FID logged", ha="center", va="center",
                    transform=ax.transAxes)
        if numeric:
            _log_if_wide(ax, "x", np.asarray(order, float), ratio=20.0)
            if len(order) <= 8:
                ax.set_xticks(np.asarray(order, float), [_fmt(v) for v in order])
                ax.minorticks_off()
        else:
            ax.set_xticks(range(len(order)), [_fmt(v) for v in order])
            ax.set_xlim(-0.5, len(order) - 0.5)
        ax.set_xlabel(axis)
        ax.set_ylabel(f"final FID, {_steps_label(k)} sampler")
        ax.set_title(f"{_steps_label(k)} FID vs {axis}")
        ax.grid(True, alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    if handles:  # one legend for all panels, below them, so it never hides a point
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize=8,
                   title="mean ± s.d. over seeds; faint dots: single seeds", title_fontsize=8)
    return _save(fig, path)


def plot_sample_grids(grids: dict[int, Path], path: Path, title: str) -> Path:
    """The best trial's sample grids side by side, one panel per sampler step count."""
    if not grids:
        raise ValueError("no sample grids to draw")
    fig = Figure(figsize=(4 * len(grids), 4.4))
    for i, (k, p) in enumerate(sorted(grids.items())):
        ax = fig.add_subplot(1, len(grids), i + 1)
        img = mpimg.imread(str(p))
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
        ax.set_title(f"{_steps_label(k)} sampler")
        ax.set_axis_off()
    fig.suptitle(title)
    return _save(fig, path)
