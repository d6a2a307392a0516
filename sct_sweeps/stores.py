"""Where a sweep's stores are: the one place that decides it for run, resume, status, ui and the reports.

Stores: the project directory, the Ray results root (a sweep's results are ``<results>/<name>``),
the MLflow tracking URI, the MLflow artifact root of local stores and the pretraining cache.
Precedence, highest first: a flag (``--tracking-uri`` / ``--storage``; the CLI's option also reads
``$MLFLOW_TRACKING_URI``), the spec's setting, the sweep record left by `run`, the project default
under ``$SCT_PROJECT_DIR`` (else the current directory).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

from sct_sweeps.config import SweepSpec, check_name
from sct_sweeps.errors import SpecError, StorageError, SweepNotFoundError
from sct_sweeps.record import RECORD, SweepRecord, load_record
from sct_sweeps.tracking import check_store_dir

DEFAULT_DB = "mlruns.db"


def project_dir() -> Path:
    """Where default results, MLflow store and caches live: $SCT_PROJECT_DIR, else the current directory."""
    return Path(os.environ.get("SCT_PROJECT_DIR") or Path.cwd()).resolve()


def is_local(uri: str) -> bool:
    """A store whose artifacts this process writes itself (SQLite / file), not a tracking server."""
    return not uri.startswith(("http://", "https://", "databricks"))


def normalize_uri(uri: str) -> str:
    """A tracking URI usable from any working directory: relative SQLite paths made absolute."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(Path.cwd() / uri.removeprefix('sqlite:///')).resolve()}"
    if "://" not in uri:  # a bare path: MLflow would read it as a file store, which 3.x refuses
        raise SpecError(f"tracking_uri: {uri!r} needs a scheme: sqlite:////abs/path.db or http://host:port")
    return uri


def _absolute(given: Path | str | None, default: Path) -> Path:
    return Path(given or default).expanduser().resolve()


@dataclasses.dataclass(frozen=True)
class Stores:
    """The resolved stores of one command (every path absolute, the URI normalized)."""

    project: Path
    results: Path  # Ray results root; sweep `name` lives in results / name
    tracking_uri: str
    artifact_root: Path | None  # MLflow artifacts of a local store; None for a tracking server
    pretrain_cache: Path  # content-addressed phase-one checkpoints, shared by sweeps
    uri_from: str = "project"  # who chose the tracking URI: flag, spec, record or project (the default)

    def sweep_dir(self, name: str) -> Path:
        """``<results>/<name>``: Ray's experiment state and the sweep record."""
        return self.results / check_name(name)

    def check_tracking_dir(self) -> None:
        """Refuse a SQLite store the user named in a directory that does not exist; make the project's own.

        A URI from the sweep record is left to the store client (the sweep was run with it)."""
        if self.uri_from != "record":
            check_store_dir(self.tracking_uri, self.project if self.uri_from == "project" else None)

    def check_writable(self) -> None:
        """Refuse at once, in one line naming the directory, a local store that is read-only, not ours, or
        (nearly) full: the results root, the pretraining cache, and a SQLite store's directory."""
        dirs = [self.results, self.pretrain_cache]
        if self.tracking_uri.startswith("sqlite:///"):
            dirs.append(Path(self.tracking_uri.removeprefix("sqlite:///")).parent)
        for d in dirs:
            check_writable(d)

    @property
    def reports(self) -> Path:
        """Where `report` writes ``<reports>/<name>/index.html``."""
        return self.project / "reports"


def _record_of(name: str, results: Path) -> SweepRecord | None:
    return load_record(name, results) if (results / check_name(name) / RECORD).is_file() else None


def _tracking_uri(project: Path, given: str | None, unknown_sweep: str | None) -> str:
    """`given` (flag, spec or record), else the project's SQLite store, which must exist to look up `unknown_sweep`
    (a sweep named without spec or record)."""
    db = project / DEFAULT_DB
    if given is None and unknown_sweep is not None and not db.is_file():
        raise SweepNotFoundError(f"{unknown_sweep}: no sweep results and no MLflow store at {db}; pass --tracking-uri")
    return normalize_uri(given or f"sqlite:///{db}")


def resolve_stores(
    *,
    spec: SweepSpec | None = None,
    name: str | None = None,
    storage: Path | None = None,
    tracking_uri: str | None = None,
) -> Stores:
    """The stores of a sweep given by its spec (`run`), by its name (`resume`, `report`, ...) or of none (`ui`).

    storage / tracking_uri: the flags, which win over the spec. With `name` (and no spec), the sweep
    record under the results root supplies the tracking URI and pretraining cache the sweep was run
    with; a name with neither record nor flag falls back to the project's store, SweepNotFoundError
    where that does not exist.
    """
    project = project_dir()
    results = _absolute(storage or (spec.storage if spec else None), project / "ray_results")
    record = _record_of(name, results) if name is not None and spec is None else None
    choices = {"flag": tracking_uri}
    if spec is not None:
        choices["spec"], cache, artifacts = spec.tracking_uri, spec.pretrain_cache, spec.artifact_root
    else:
        choices["record"] = record.tracking_uri if record else None
        cache, artifacts = (record.pretrain_cache if record else None), None
    uri_from, uri = next(((k, v) for k, v in choices.items() if v), ("project", None))
    uri = _tracking_uri(project, uri, name if spec is None and record is None else None)
    return Stores(
        project=project,
        results=results,
        tracking_uri=uri,
        artifact_root=_absolute(artifacts, project / "mlartifacts") if is_local(uri) else None,
        pretrain_cache=_absolute(cache, project / ".cache" / "pretrain"),
        uri_from=uri_from,
    )


MIN_FREE_MB = 200  # a sweep writes checkpoints, results and MLflow rows: less room than this is refused


def check_writable(directory: Path, need_mb: float = 0.0) -> None:
    """StorageError unless a file can be created in `directory` (or, before it exists, in its nearest
    existing parent) and its file system has `SCT_MIN_FREE_MB` (default MIN_FREE_MB), or `need_mb` if more,
    free."""
    probe_dir = Path(directory)
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    try:
        fd, name = tempfile.mkstemp(prefix=".sct-write-probe-", dir=probe_dir)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise StorageError(f"{directory}: cannot write there ({e.strerror}); choose a writable directory") from None
    need = max(float(os.environ.get("SCT_MIN_FREE_MB", MIN_FREE_MB)), need_mb)
    free = shutil.disk_usage(probe_dir).free / 2**20
    if free < need:
        raise StorageError(f"{directory}: only {free:.0f} MB free (a sweep needs SCT_MIN_FREE_MB = {need:.0f}); "
                           "free space, then run again")
