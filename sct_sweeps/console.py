"""What the `sct-sweep` CLI prints, and how: its two consoles, JSON output, spinners, the one-line
rendering of user errors (exit 2), and the lines of a finished sweep. The commands are in cli.py."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from sct_sweeps.errors import EXIT_USER_ERROR, user_message

# Piped (not a terminal), rich would lay tables out for 80 columns and cut or fold them: give it room.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 10_000)
err = Console(stderr=True)


def working(what: str) -> Any:
    """A spinner on stderr while a command works for more than a moment (shown on a terminal only)."""
    return err.status(what, spinner="dots")


def print_json(data: Any) -> None:
    """`data` as JSON on stdout (plain print: no markup, no wrapping)."""
    print(json.dumps(data, indent=2, default=str))


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user errors into one line on stderr and exit code 2; let bugs show their traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except Exception as e:
            msg = user_message(e)
            if msg is None:
                raise
            err.print(f"error: {msg}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USER_ERROR) from None

    return wrapper


def print_outcome(outcome: Any) -> None:
    r = outcome.record
    out.print(
        f"sweep {r.name}: {outcome.trials} trials, {outcome.errors} failed, wall {outcome.wall_s:.0f} s\n"
        f"  results: {r.results_dir}\n  MLflow: {r.tracking_uri} (experiment {r.experiment_id}, "
        f"parent run {r.parent_run_id})"
    )
    for line in outcome.overhead_lines():
        out.print(f"  {line}")
    if outcome.errors:
        err.print(f"{outcome.errors} trial(s) failed: `sct-sweep status {r.name}` shows why (MLflow tag sct.error)")


def exit_status(outcome: Any) -> None:
    """Exit 1 when every trial failed (a broken setup, not a bad trial); a partial failure still reports."""
    if outcome.trials and outcome.errors == outcome.trials:
        raise typer.Exit(1)


def pretrain_progress() -> tuple[Any, Callable[[int, int], None]]:
    from rich.progress import Progress

    progress = Progress(console=out, transient=True)
    task = progress.add_task("pretraining", total=None)

    def update(done: int, total: int) -> None:
        if total and not progress.live.is_started:
            progress.start()
        progress.update(task, completed=done, total=total)
        if done >= total:
            progress.stop()

    return progress, update


def fit_json(r: Any) -> dict[str, Any]:
    """One scaling fit (dashboards.scaling.fit_sweep's result) as JSON-ready data."""
    f, ci = r.fit, r.ci
    return {"fid_steps": r.steps, "vs": r.x, "points": len(r.C), "error": r.error,
            "a": f.a if f else None, "b": f.b if f else None, "c": f.c if f else None, "r2": f.r2 if f else None,
            "b_ci95": [ci.low, ci.high] if ci is not None else None, "ci_error": r.ci_error}
