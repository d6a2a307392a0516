"""The sweep report: one self-contained HTML page (plots embedded) and its publication to MLflow.

`build_report` writes `<out_dir>/index.html` plus the PNGs beside it; `publish_report` also logs
them under `report/` of the sweep's parent run, with the scaling fits as parent-run metrics.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dashboards import plots
from dashboards.loader import SweepResults, fetch_sample_grids, load_sweep, run_url
from dashboards.scaling import X_LABELS, ScalingResult, fit_sweep
from sct_sweeps import schema

log = logging.getLogger(__name__)

ARTIFACT_DIR = "report"
COST_COLUMNS = ("images_seen", "flops", "n_params", "wall_s", "loss")


@dataclass
class Report:
    """What one build produced: the page, its figures (title, png) and the fits behind them."""

    path: Path
    figures: list[tuple[str, Path]]
    fits: list[ScalingResult]
    results: SweepResults


def best_trial(res: SweepResults) -> str | None:
    """The trial with the lowest final FID of the fewest-step sampler."""
    for k in res.fid_steps:
        scored = [(t.final[schema.fid_metric(k)], t.trial_id) for t in res.trials
                  if math.isfinite(t.final.get(schema.fid_metric(k), math.nan))]
        if scored:
            return min(scored)[1]
    return None


def fit_metrics(fits: list[ScalingResult]) -> tuple[dict[str, float], dict[str, str]]:
    """Parent-run metrics (`scaling_{k}step_b`, ..., `scaling_{k}step_{x}_b` for x != flops) and status tags."""
    metrics, tags = {}, {}
    for r in fits:
        prefix = f"scaling_{r.steps}step" + ("" if r.x == "flops" else f"_{r.x}")
        tags[schema.SCALING_PREFIX + prefix] = "ok" if r.fit else f"no fit: {r.error}"[:5000]
        if r.fit is None:
            continue
        f = r.fit
        metrics.update({f"{prefix}_a": f.a, f"{prefix}_b": f.b, f"{prefix}_c": f.c, f"{prefix}_r2": f.r2,
                        f"{prefix}_loglog_a": f.loglog_a, f"{prefix}_loglog_b": f.loglog_b,
                        f"{prefix}_loglog_r2": f.loglog_r2, f"{prefix}_n_points": float(f.n_points)})
        if r.ci is not None:
            metrics.update({f"{prefix}_b_ci_low": r.ci.low, f"{prefix}_b_ci_high": r.ci.high,
                            f"{prefix}_loglog_b_ci_low": r.ci.loglog_low,
                            f"{prefix}_loglog_b_ci_high": r.ci.loglog_high})
    return metrics, tags


def make_figures(res: SweepResults, fits: list[ScalingResult], out_dir: Path) -> list[tuple[str, Path]]:
    """Draw every figure of the report into out_dir; returns (title, png) in page order."""
    figs: list[tuple[str, Path]] = []
    for x in dict.fromkeys(r.x for r in fits):
        label = X_LABELS.get(x, x).split(" (")[0]
        png = plots.plot_scaling([r for r in fits if r.x == x], out_dir / f"scaling_{x}.png")
        figs.append((f"FID vs {label}", png))
    figs.append(("FID during training", plots.plot_fid_curves(res, out_dir / "fid_curves.png")))
    for axis in plots.ablation_axes(res):
        name = axis.replace(".", "_")
        figs.append((f"Ablation: {axis}", plots.plot_ablation(res, axis, out_dir / f"ablation_{name}.png")))
    best = best_trial(res)
    if best is not None:
        with tempfile.TemporaryDirectory() as tmp:
            grids = fetch_sample_grids(res, best, Path(tmp))
            if grids:
                title = f"Samples of the best trial {best}"
                figs.append((title, plots.plot_sample_grids(grids, out_dir / "samples_best.png", title)))
            else:
                log.info("best trial %s has no samples/grid_*.png artifacts", best)
    return figs


def _cell(v: object) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return '<td data-v="">–</td>'
        return f'<td data-v="{v!r}">{v:.4g}</td>'
    if isinstance(v, int) and not isinstance(v, bool):
        return f'<td data-v="{v}">{v}</td>'
    return f"<td>{html.escape(str(v))}</td>"


def trials_table(res: SweepResults) -> str:
    """The sortable trials table (click a header; `?sort=<column>` pre-sorts)."""
    axes = res.axis_names
    online = [schema.fid_metric(k, online=True) for k in res.fid_steps]
    fids = [schema.fid_metric(k) for k in res.fid_steps] + [m for m in online if m in res.metric_names]
    costs = [c for c in COST_COLUMNS if c in res.metric_names]
    cols = ["run", "trial", "status", *axes, *fids, *costs]
    head = "".join(f'<th data-key="{html.escape(c)}">{html.escape(c)}</th>' for c in cols)
    rows = []
    for t in res.trials:
        link = html.escape(run_url(res.tracking_uri, res.experiment_id, t.run_id))
        run = f'<td><a href="{link}" title="MLflow run {t.run_id}">{html.escape(t.run_name or t.run_id)}</a></td>'
        vals = [t.trial_id, t.status, *(plots.trial_value(t, a) for a in axes),
                *(t.final.get(c, math.nan) for c in fids + costs)]
        rows.append("<tr>" + run + "".join(_cell(v) for v in vals) + "</tr>")
    return (f'<div class="scroll"><table id="trials" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def fits_table(fits: list[ScalingResult]) -> str:
    if not fits:
        return "<p>No cost metric (flops) was logged, so there is no scaling fit.</p>"
    rows = []
    for r in fits:
        what = f"{r.steps}-step FID vs {html.escape(r.x)}"
        if r.fit is None:
            rows.append(f'<tr><td>{what}</td><td colspan="7" class="err">no fit: {html.escape(str(r.error))}</td></tr>')
            continue
        f = r.fit
        ci = f"[{r.ci.low:.3f}, {r.ci.high:.3f}]" if r.ci else html.escape(f"none: {r.ci_error}")
        c = "0" if f.c < 1e-6 * float(r.fid.min()) else f"{f.c:.4g}"
        rows.append(f"<tr><td>{what}</td><td>{f.a:.4g}</td><td>{f.b:.4f}</td><td>{ci}</td><td>{c}</td>"
                    f"<td>{f.r2:.4f}</td><td>{f.loglog_b:.4f} (R² {f.loglog_r2:.3f})</td><td>{f.n_points}</td></tr>")
    head = ("<tr><th>fit</th><th>a</th><th>b</th><th>b 95% CI (bootstrap over trials)</th><th>c</th>"
            "<th>R² (log)</th><th>log-log line b</th><th>Pareto points</th></tr>")
    return f'<table class="fits"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _img(title: str, png: Path) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    t = html.escape(title)
    return f'<figure><img src="data:image/png;base64,{data}" alt="{t}"><figcaption>{t}</figcaption></figure>'


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:not([data-v]){text-align:left}.scroll{overflow-x:auto}th{background:#f2f2f2;cursor:pointer;user-select:none}
th[data-dir=asc]::after{content:" ▲"}th[data-dir=desc]::after{content:" ▼"}.err{color:#a00;text-align:left}
figure{margin:1.5em 0}img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:13px}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}.meta{color:#555;font-size:13px}"""

_JS = """function sortBy(th){const tb=th.closest('table').tBodies[0],i=th.cellIndex,asc=th.dataset.dir!=='asc';
for(const h of th.parentNode.children)delete h.dataset.dir;th.dataset.dir=asc?'asc':'desc';
const key=r=>{const c=r.cells[i];if(c.dataset.v!==undefined)return c.dataset.v===''?null:parseFloat(c.dataset.v);
return c.textContent;};
[...tb.rows].sort((a,b)=>{const x=key(a),y=key(b);if(x===null||y===null)return (x===null)-(y===null);
const d=(typeof x==='number'&&typeof y==='number')?x-y:String(x).localeCompare(String(y),undefined,{numeric:true});
return asc?d:-d;}).forEach(r=>tb.appendChild(r));}
document.querySelectorAll('table.sortable th').forEach(th=>th.addEventListener('click',()=>sortBy(th)));
window.addEventListener('load',()=>{const im=[...document.images];
document.body.dataset.imgTotal=im.length;document.body.dataset.imgOk=im.filter(i=>i.complete&&i.naturalWidth>0).length;
const s=new URLSearchParams(location.search).get('sort');
if(s){const th=[...document.querySelectorAll('#trials th')].find(h=>h.dataset.key===s);if(th)sortBy(th);}});"""


def render_html(res: SweepResults, fits: list[ScalingResult], figures: list[tuple[str, Path]]) -> str:
    """The whole page as one string (images inlined as base64 data URIs)."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    spec = html.escape(res.spec_yaml) if res.spec_yaml else "(no spec.yaml artifact on the parent run)"
    meta = (f"parent run <code>{res.parent_run_id}</code> · experiment {html.escape(res.experiment_id)} · "
            f"{len(res.trials)} trials · tracking <code>{html.escape(res.tracking_uri)}</code> · built {now}")
    body = "\n".join([
        f"<h1>Sweep {html.escape(res.sweep)}</h1>", f'<p class="meta">{meta}</p>',
        "<h2>Scaling fits</h2>", "<p>FID(C) = a·C<sup>−b</sup> + c, least squares in log space on the Pareto "
        "frontier; CI: bootstrap over trials.</p>", fits_table(fits),
        "<h2>Figures</h2>", *(_img(t, p) for t, p in figures),
        "<h2>Trials</h2><p>Final metric values; click a column header to sort, a run name to open its MLflow "
        "run (<code>sct-sweep ui</code> serves a local store).</p>", trials_table(res),
        "<h2>Sweep spec</h2>", f"<pre>{spec}</pre>",
    ])
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(res.sweep)} · '
            f"sct-sweeps report</title><style>{_CSS}</style></head><body>\n{body}\n<script>{_JS}</script>"
            "</body></html>\n")


def make_report(tracking_uri: str, sweep: str, out_dir: Path, *, n_boot: int = 200, seed: int = 0) -> Report:
    """Load the sweep, fit, draw and write `out_dir/index.html`; returns everything produced."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = load_sweep(tracking_uri, sweep)
    fits = fit_sweep(res.history, res.fid_steps, n_boot=n_boot, seed=seed)
    figures = make_figures(res, fits, out_dir)
    path = out_dir / "index.html"
    path.write_text(render_html(res, fits, figures), encoding="utf-8")
    log.info("report of sweep %s: %s", sweep, path)
    return Report(path, figures, fits, res)


def build_report(tracking_uri: str, sweep: str, out_dir: Path, *, n_boot: int = 200, seed: int = 0) -> Path:
    """Write the self-contained report `out_dir/index.html` (the CLI's default: sct_sweeps.stores); returns its path."""
    return make_report(tracking_uri, sweep, out_dir, n_boot=n_boot, seed=seed).path


def publish_report(tracking_uri: str, sweep: str, out_dir: Path, *, n_boot: int = 200, seed: int = 0) -> Path:
    """Build the report and log it, its PNGs and the fit parameters to the sweep's parent run."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    rep = make_report(tracking_uri, sweep, out_dir, n_boot=n_boot, seed=seed)
    client = MlflowClient(tracking_uri=tracking_uri)
    run_id = rep.results.parent_run_id
    for _, png in rep.figures:
        client.log_artifact(run_id, str(png), ARTIFACT_DIR)
    client.log_artifact(run_id, str(rep.path), ARTIFACT_DIR)
    metrics, tags = fit_metrics(rep.fits)
    ts = int(dt.datetime.now().timestamp() * 1000)
    tags[schema.REPORT] = f"{ARTIFACT_DIR}/index.html"
    client.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    log.info("published report of sweep %s to parent run %s (%d figures, %d fit metrics)", sweep, run_id,
             len(rep.figures), len(metrics))
    return rep.path
