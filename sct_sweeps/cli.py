"""`sct-sweep`: run, resume and inspect Ray Tune sweeps of the SCT trainer, tracked in MLflow.

Every user error (bad YAML, unknown key, missing file, unknown sweep, unreachable store) prints
one line on stderr and exits with status 2. Heavy imports (ray, mlflow, torch) happen inside the
commands, so `--help` and `validate` stay fast and the embedded Ray is configured before import.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from sct_sweeps.console import (
    err,
    exit_status,
    fit_json,
    out,
    pretrain_progress,
    print_json,
    print_outcome,
    user_errors,
    working,
)
from sct_sweeps.errors import SweepError

app = typer.Typer(
    help="Train, sweep (Ray Tune) and track (MLflow) consistency models trained by SCT / ECT / iCT.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


ADDRESS = typer.Option(
    None, "--address", envvar="RAY_ADDRESS", help="Ray cluster to run on (e.g. 10.0.0.1:6379); default: embedded."
)
TRACKING = typer.Option(
    None,
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    help="MLflow store, e.g. http://127.0.0.1:5000; default: the spec's, else sqlite:////<project>/mlruns.db.",
)
STORAGE = typer.Option(None, "--storage", help="Ray results root of the sweep; default: <project>/ray_results.")
NUM_CPUS = typer.Option(None, "--num-cpus", min=1, help="CPUs of the embedded local Ray (default: all).")
JSON = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table.")
OVERRIDES = typer.Argument(
    None, metavar="[KEY=VALUE]...",
    help="Settings over the YAML's, validated with it: base.iterations=50, search.seed.grid=[0,1].",
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        out.print(f"sct-sweep {version('sct-sweeps')}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """sct-sweep: `run` a sweep YAML, `resume` / `status` it, `report` / `scaling` / `export` its results."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", logging.getLevelName(level))  # read when mlflow is imported


def _stores_of(name: str, storage: Path | None, given: str | None) -> Any:
    """The stores of sweep `name`, MLflow: --tracking-uri, else the one it was run with, else the project's."""
    from sct_sweeps.stores import resolve_stores

    stores = resolve_stores(name=name, storage=storage, tracking_uri=given)
    stores.check_tracking_dir()
    return stores


def _after_sweep(record: Any) -> None:
    """Best effort: build and publish the report; a failure is a warning, not a failed sweep."""
    from sct_sweeps.stores import resolve_stores

    try:
        from dashboards.report import publish_report

        out_dir = resolve_stores(tracking_uri=record.tracking_uri).reports / record.name
        out.print(f"report: {publish_report(record.tracking_uri, record.name, out_dir)}")
    except Exception as e:
        err.print(f"warning: report not built ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def _sweep_and_report(start: Callable[..., Any], *, address: str | None, num_cpus: int | None, report: bool) -> None:
    """What run and resume share: `start(launch)` under a pretraining progress bar, the outcome, the report."""
    from sct_sweeps.runner import Launch

    progress, on_pretrain = pretrain_progress()
    try:
        outcome = start(launch=Launch(address=address or None, num_cpus=num_cpus, on_pretrain=on_pretrain))
    finally:
        if progress.live.is_started:
            progress.stop()
    print_outcome(outcome)
    if report:
        _after_sweep(outcome.record)
    exit_status(outcome)


@app.command()
@user_errors
def run(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="Sweep YAML, e.g. experiments/scaling.yaml."),
    overrides: list[str] | None = OVERRIDES,
    address: str | None = ADDRESS,
    tracking_uri: str | None = TRACKING,
    name: str | None = typer.Option(None, "--name", help="Sweep name (default: the spec's `name`)."),
    num_cpus: int | None = NUM_CPUS,
    report: bool = typer.Option(True, "--report/--no-report", help="Build the HTML report at the end."),
) -> None:
    """Run a sweep: validate, pretrain once per distinct phase one, run every trial, report."""
    from sct_sweeps.config import check_name, load_spec
    from sct_sweeps.runner import run_sweep
    from sct_sweeps.space import plan
    from sct_sweeps.stores import resolve_stores

    spec = load_spec(spec_path, overrides or ())
    if name:
        spec = spec.model_copy(update={"name": check_name(name, "--name")})
    uri = resolve_stores(spec=spec, tracking_uri=tracking_uri).tracking_uri
    out.print(f"[bold]sweep {spec.name}[/bold] ({'cluster ' + address if address else 'embedded Ray'}; MLflow {uri})")
    for line in plan(spec, num_cpus).lines():
        out.print(f"  {line}")
    start = functools.partial(run_sweep, spec, uri=uri)
    _sweep_and_report(start, address=address, num_cpus=num_cpus, report=report)


@app.command()
@user_errors
def resume(
    name: str = typer.Argument(..., help="Name of the sweep to continue."),
    storage: Path | None = STORAGE,
    address: str | None = ADDRESS,
    tracking_uri: str | None = TRACKING,
    num_cpus: int | None = NUM_CPUS,
    report: bool = typer.Option(True, "--report/--no-report", help="Build the HTML report at the end."),
) -> None:
    """Continue a killed or interrupted sweep: finished trials are kept, the rest go on from checkpoints."""
    from sct_sweeps.runner import resume_sweep

    start = functools.partial(resume_sweep, name, storage=storage, uri=tracking_uri)
    _sweep_and_report(start, address=address, num_cpus=num_cpus, report=report)


@app.command()
@user_errors
def status(
    name: str | None = typer.Argument(None, help="Sweep name; without it, list every sweep."),
    storage: Path | None = STORAGE,
    as_json: bool = JSON,
) -> None:
    """Trials of a sweep with state, node, iteration and best metric so far (or the list of sweeps)."""
    from sct_sweeps.status import state_saved_at, sweep_rows, trial_rows

    if as_json:
        if name is None:
            keys = ("sweep", "trials", "states", "tracking_uri", "results")
            print_json([dict(zip(keys, row, strict=True)) for row in sweep_rows(storage)])
            return
        with working(f"reading {name}"):
            metric, rows = trial_rows(name, storage)
        keys = ("trial_id", "run_name", "swept", "state", "node", "iteration", f"best_{metric}", "last_error")
        print_json({"sweep": name, "metric": metric, "states_saved_at": state_saved_at(name, storage),
                     "trials": [dict(zip(keys, row, strict=True)) for row in rows]})
        return
    if name is None:
        table = Table("sweep", "trials", "states", "MLflow store", "results")
        for row in sweep_rows(storage):
            table.add_row(*row)
        out.print(table if table.rows else "no sweeps yet")
        return
    with working(f"reading {name}"):
        metric, rows = trial_rows(name, storage)
    saved = state_saved_at(name, storage)
    age = "" if saved is None else f"states saved by the driver {time.time() - saved:.0f} s ago"
    table = Table(title=f"sweep {name}", caption=age, show_lines=True)
    table.add_column("run / trial / swept values", overflow="fold", min_width=22)
    table.add_column("state", no_wrap=True)
    for head in ("node", "iter", f"best {metric}", "last error"):
        table.add_column(head, overflow="fold")
    for trial, run_name, swept, *rest in rows:
        table.add_row(f"{run_name}\n{trial}\n{swept}", *rest)
    out.print(table)


@app.command()
@user_errors
def validate(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="Sweep YAML to check."),
    overrides: list[str] | None = OVERRIDES,
    num_cpus: int | None = typer.Option(None, "--num-cpus", min=1, help="CPUs to plan for (default: this machine)."),
    as_json: bool = JSON,
) -> None:
    """Check a sweep YAML and print its trial plan; runs nothing."""
    from sct_sweeps.config import load_spec
    from sct_sweeps.session import check_local_gpu
    from sct_sweeps.space import plan

    spec = load_spec(spec_path, overrides or ())
    if spec.resources.gpu != "auto":
        check_local_gpu(spec)
    the_plan = plan(spec, num_cpus)
    if as_json:
        print_json({"spec": str(spec_path), "valid": True, "name": spec.name, "algorithm": spec.algorithm,
                     "metric": spec.metric, "mode": spec.mode, "plan": dataclasses.asdict(the_plan)})
        return
    out.print(f"[bold]{spec_path}[/bold]: valid sweep {spec.name} ({spec.algorithm}, metric {spec.metric} {spec.mode})")
    for line in the_plan.lines():
        out.print(f"  {line}")


@app.command()
@user_errors
def sample(
    checkpoint: str = typer.Argument(
        ..., help="Checkpoint file, directory holding state.pt, or a trial's MLflow run name or run id."
    ),
    steps: int = typer.Option(1, "--steps", min=1, help="Sampler steps (1, 2, or N)."),
    eta: float | None = typer.Option(None, "--eta", min=0.0, max=1.0, help="Edge-skipping eta (N-step)."),
    guidance: float = typer.Option(1.0, "--guidance", min=0.0, help="Guidance strength w (1 = none)."),
    n: int = typer.Option(64, "--n", min=1, help="Number of images."),
    seed: int = typer.Option(0, "--seed", help="Noise seed."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    out_path: Path = typer.Option(Path("grid.png"), "--out", help="Output PNG grid."),
    tracking_uri: str | None = TRACKING,
) -> None:
    """Draw a grid of samples from a trained checkpoint (EMA weights), given by path or by MLflow run."""
    from sct_sweeps.sampling import resolve_checkpoint, sample_grid
    from sct_sweeps.stores import resolve_stores
    from sct_sweeps.tracking import sqlite_path

    stores = resolve_stores(tracking_uri=tracking_uri)
    db = sqlite_path(stores.tracking_uri)
    uri = stores.tracking_uri if tracking_uri or (db is not None and db.is_file()) else None
    with working(f"sampling {n} images"):
        path = sample_grid(resolve_checkpoint(checkpoint, uri), steps=steps, eta=eta, strength=guidance, n=n,
                           seed=seed, device=device, out=out_path)  # fmt: skip
    out.print(f"wrote {path}")


@app.command()
@user_errors
def evaluate(
    name: str = typer.Argument(..., help="A finished sweep's name."),
    sets: list[str] | None = typer.Option(None, "--set", metavar="SETTING=VALUES",
                                          help="Evaluation setting and values: sampler.eta=0,0.2,0.5 (repeatable)."),
    file: Path | None = typer.Option(None, "--file", help="YAML mapping of settings to values (as --set)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    storage: Path | None = STORAGE,
    tracking_uri: str | None = TRACKING,
) -> None:
    """Score a finished sweep's checkpoints under new sampling settings (no training); resumable."""
    from sct_sweeps.evaluate_sweep import evaluate_sweep, parse_sets
    from sct_sweeps.record import load_record

    grid = parse_sets(sets or (), file)  # a training setting is refused before anything is read
    stores = _stores_of(name, storage, tracking_uri)
    record = dataclasses.replace(load_record(name, stores.results), tracking_uri=stores.tracking_uri)
    with working(f"evaluating {name}"):
        lines = evaluate_sweep(record, grid, device)
    for line in lines:
        out.print(line)


@app.command("import-edm")
@user_errors
def import_edm(
    src: Path = typer.Argument(..., help="A published EDM or EDM2 network pickle (.pkl)."),
    out_file: Path = typer.Option(..., "--out", help="Pretrain checkpoint to write (.pt)."),
) -> None:
    """Convert an EDM/EDM2 pickle (read safely, nothing in it runs) into a pretrain checkpoint."""
    from trainer.edm_pickle import import_edm as convert

    with working(f"reading {src}"):
        found = convert(src, out_file)
    classes = found["classes"] or "unconditional"
    out.print(f"{src}: {found['arch']}, {found['resolution']}x{found['resolution']}x{found['channels']}, "
              f"classes {classes}, {found['params'] / 1e6:.2f}M parameters")
    out.print(f"wrote {out_file}")


def _sweep_pages(mlflow_client: Any, base: str, name: str | None) -> list[str]:
    """`<sweep>: <runs page URL>` for sweep `name`, or for every experiment of the store (the `/runs` page: a
    bare experiment URL opens MLflow 3's GenAI overview)."""
    from sct_sweeps.errors import SweepNotFoundError

    if name is not None:
        exp = mlflow_client.get_experiment_by_name(name)
        if exp is None:
            raise SweepNotFoundError(f"{name}: no MLflow experiment of that name in this store")
        exps = [exp]
    else:
        exps = [e for e in mlflow_client.search_experiments() if e.name != "Default"]
    return [f"{e.name}: {base}/#/experiments/{e.experiment_id}/runs" for e in exps]


@app.command()
@user_errors
def ui(
    name: str | None = typer.Argument(None, help="Sweep whose runs page to print (default: every sweep)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (127.0.0.1 = this machine only)."),
    port: int = typer.Option(5000, "--port", min=1, max=65535, help="Port."),
    tracking_uri: str | None = TRACKING,
) -> None:
    """MLflow UI over the project's store (Ctrl-C stops it); prints each sweep's runs page."""
    from sct_sweeps import tracking
    from sct_sweeps.stores import resolve_stores

    stores = resolve_stores(tracking_uri=tracking_uri)
    uri = stores.tracking_uri
    served = uri.startswith(("http://", "https://"))
    if served:
        out.print(f"the store is a tracking server already: open {uri}")
    else:
        stores.check_tracking_dir()
    mlflow_client = tracking.client(uri)  # a new SQLite store: created and migrated under its lock, before the server
    if served:
        tracking.fail_fast_http()
        try:
            pages = _sweep_pages(mlflow_client, uri.rstrip("/"), name)
        except SweepError:
            raise
        except Exception as e:  # the server does not answer: say so, the address stands
            pages = []
            err.print(f"warning: {uri} did not list its experiments ({type(e).__name__})")
    else:
        pages = _sweep_pages(mlflow_client, f"http://{host}:{port}", name)
    for line in pages:
        out.print(f"  {line}", soft_wrap=True)
    if served:
        return
    art = stores.artifact_root
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--default-artifact-root",
           str(art), "--host", host, "--port", str(port), "--workers", "1"]  # fmt: skip
    out.print(f"MLflow UI on http://{host}:{port} (store {uri}); Ctrl-C to stop")
    sys.stdout.flush()
    from sct_sweeps.foreground import serve

    code = serve(cmd)  # Ctrl-C, SIGTERM or SIGHUP stop the server and all its workers
    raise typer.Exit(0 if code in (128 + signal.SIGINT, 128 + signal.SIGTERM) else code)


@app.command()
@user_errors
def export(
    name: str = typer.Argument(..., help="Sweep name."),
    out_file: Path = typer.Option(..., "--out", help="Parquet file to write."),
    storage: Path | None = STORAGE,
    tracking_uri: str | None = TRACKING,
) -> None:
    """Every metric history of a sweep as Parquet: one row per (trial, step), params as columns."""
    from dashboards.export import export_parquet

    with working(f"exporting {name}"):
        path = export_parquet(_stores_of(name, storage, tracking_uri).tracking_uri, name, out_file)
    out.print(f"wrote {path}")


@app.command()
@user_errors
def report(
    name: str = typer.Argument(..., help="Sweep name."),
    out_dir: Path | None = typer.Option(None, "--out", help="Output directory (default <project>/reports/<name>)."),
    publish: bool = typer.Option(True, "--publish/--no-publish", help="Also log it to the parent MLflow run."),
    storage: Path | None = STORAGE,
    tracking_uri: str | None = TRACKING,
) -> None:
    """Plots and an HTML report of a sweep (FID curves, ablations, scaling fit)."""
    from dashboards.report import build_report, publish_report

    stores = _stores_of(name, storage, tracking_uri)
    out_dir = out_dir or stores.reports / name
    with working(f"building the report of {name}"):
        path = (publish_report if publish else build_report)(stores.tracking_uri, name, out_dir)
    out.print(f"wrote {path}")


@app.command()
@user_errors
def scaling(
    name: str = typer.Argument(..., help="Sweep name."),
    n_boot: int = typer.Option(200, "--n-boot", min=0, help="Bootstrap resamples for the exponent's CI."),
    storage: Path | None = STORAGE,
    tracking_uri: str | None = TRACKING,
    as_json: bool = JSON,
) -> None:
    """Power-law fit FID(C) = a*C^-b + c against each varied cost (iterations, FLOPs, params), with CI."""
    from dashboards.loader import load_sweep
    from dashboards.scaling import fit_sweep

    with working(f"fitting the scaling of {name}"):
        res = load_sweep(_stores_of(name, storage, tracking_uri).tracking_uri, name)
        fits = fit_sweep(res.history, res.fid_steps, n_boot=n_boot)
    if as_json:
        print_json({"sweep": name, "fits": [fit_json(r) for r in fits]})
        return
    table = Table("FID", "vs", "points", "a", "b", "c", "R2 (log)", "b 95% CI", title=f"scaling of {name}")
    for r in fits:
        label = f"{r.steps}-step"
        if r.fit is None:
            table.add_row(label, r.x, str(len(r.C)), "-", "-", "-", "-", r.error or "no fit")
            continue
        f = r.fit
        ci = f"[{r.ci.low:.3g}, {r.ci.high:.3g}]" if r.ci is not None else (r.ci_error or "-")
        table.add_row(label, r.x, str(f.n_points), f"{f.a:.3g}", f"{f.b:.3g}", f"{f.c:.3g}", f"{f.r2:.3f}", ci)
    out.print(table)
