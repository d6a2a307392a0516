"""Run and resume sweeps: Ray (embedded or a cluster), shared pretraining, the Tuner, the parent run.

Embedded mode (no --address / RAY_ADDRESS) starts a private local Ray bound to 127.0.0.1 and stops
it at the end; cluster mode connects to a running cluster and leaves it running. The results of a
sweep live in ``<storage>/<name>``: Ray's experiment state plus ``sct_sweep.json``, which `resume`,
`status` and the dashboards read (spec, MLflow store, experiment and parent run ids).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from sct_sweeps import tracking
from sct_sweeps.config import (
    SweepSpec,
    artifact_root,
    check_name,
    parse_spec,
    pretrain_cache,
    project_dir,
    spec_yaml,
    storage_root,
    tracking_uri,
)
from sct_sweeps.errors import (
    ClusterError,
    ResourceError,
    SweepExistsError,
    SweepNotFoundError,
    TrackingError,
)
from sct_sweeps.space import param_space, scheduler, search_alg, trial_count

log = logging.getLogger(__name__)

RECORD = "sct_sweep.json"
OBJECT_STORE_BYTES = 256 * 1024**2  # trials exchange only metrics and checkpoint paths


@dataclasses.dataclass
class SweepRecord:
    """What a sweep needs to be resumed, inspected or reported (``<results>/sct_sweep.json``)."""

    name: str
    spec_yaml: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    pretrain_cache: str
    results_dir: str
    created: float
    address: str | None = None

    def save(self) -> None:
        """Write atomically beside Ray's experiment state."""
        path = Path(self.results_dir) / RECORD
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        os.replace(tmp, path)

    @property
    def spec(self) -> SweepSpec:
        """The validated spec the sweep was started with."""
        return parse_spec(yaml.safe_load(self.spec_yaml), f"{self.results_dir}/{RECORD}")


def results_dir(name: str, storage: Path | None = None) -> Path:
    """``<storage>/<name>`` (storage: the given root, else ``<project>/ray_results``)."""
    return Path(storage or project_dir() / "ray_results").expanduser().resolve() / check_name(name)


def load_record(name: str, storage: Path | None = None) -> SweepRecord:
    """The record of sweep `name`; SweepNotFoundError naming where it looked."""
    path = results_dir(name, storage) / RECORD
    if not path.is_file():
        raise SweepNotFoundError(f"{name}: no sweep at {path.parent} (pass --storage if it lives elsewhere)")
    return SweepRecord(**json.loads(path.read_text()))


def list_sweeps(storage: Path | None = None) -> list[SweepRecord]:
    """Every sweep under the storage root, oldest first."""
    root = Path(storage or project_dir() / "ray_results").expanduser().resolve()
    records = [SweepRecord(**json.loads(p.read_text())) for p in root.glob(f"*/{RECORD}")]
    return sorted(records, key=lambda r: r.created)


# -- Ray ---------------------------------------------------------------------------------------


def _ray_log_level() -> int:
    """Ray's own loggers (driver and workers): INFO only with --verbose."""
    return min(logging.WARNING, logging.getLogger().getEffectiveLevel())


def start_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Connect to the cluster at `address`, or start a private local Ray on 127.0.0.1."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Ray tables; progress is ours
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if address:
        import ray

        try:
            ray.init(address=address, log_to_driver=True, logging_level=_ray_log_level())
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterError(f"--address {address}: cannot connect to a Ray cluster ({e})") from None
        return
    # Before ray is imported: keep every Ray process on loopback, no token warning (stack.md).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.pop("RAY_ADDRESS", None)
    import ray

    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        object_store_memory=OBJECT_STORE_BYTES,
        log_to_driver=True,
        logging_level=_ray_log_level(),
    )


def stop_ray() -> None:
    """Disconnect (cluster) or shut the private Ray down (embedded)."""
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def check_local_gpu(spec: SweepSpec) -> None:
    """Before starting an embedded Ray: refuse a GPU request on a machine without CUDA."""
    gpu = spec.resources.gpu
    if isinstance(gpu, float) and gpu > 0:
        import torch

        if not torch.cuda.is_available():
            raise ResourceError(f"resources.gpu: {gpu:g} GPU per trial requested, but this machine has no CUDA GPU")


def trial_resources(spec: SweepSpec) -> dict[str, float]:
    """{cpu, gpu} per trial checked against the connected Ray: `auto` GPU = 1 where GPUs exist."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    max_cpu = max((r.get("CPU", 0.0) for r in nodes), default=0.0)
    max_gpu = max((r.get("GPU", 0.0) for r in nodes), default=0.0)
    cpu, gpu = spec.resources.cpu, spec.resources.gpu
    gpu = (1.0 if max_gpu >= 1 else 0.0) if gpu == "auto" else float(gpu)
    if cpu > max_cpu:
        raise ResourceError(f"resources.cpu: {cpu:g} CPUs per trial, but the largest Ray node has {max_cpu:g}")
    if gpu > max_gpu:
        raise ResourceError(f"resources.gpu: {gpu:g} GPU per trial requested, but the Ray cluster has {max_gpu:g}")
    return {"cpu": cpu, "gpu": gpu}


# -- MLflow ------------------------------------------------------------------------------------


def _parent_params(spec: SweepSpec, resources: dict[str, float], address: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {
        "algorithm": spec.algorithm,
        "metric": spec.metric,
        "mode": spec.mode,
        "num_samples": spec.num_samples,
        "trials": trial_count(spec),
        "scheduler": spec.scheduler.type,
        "max_concurrent_trials": spec.max_concurrent_trials,
        "resources.cpu": resources["cpu"],
        "resources.gpu": resources["gpu"],
        "max_failures": spec.max_failures,
        "ray.address": address or "embedded",
    }
    for path, axis in spec.search.items():
        params[f"search.{path}"] = f"{axis.kind}: {getattr(axis, axis.kind)}"
    return params


def _check_server(uri: str) -> None:
    """Fail in seconds, not minutes of client retries, when a tracking server does not answer."""
    import urllib.request

    if tracking.is_local(uri):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as r:
            r.read()
    except OSError as e:
        raise TrackingError(f"tracking_uri {uri}: MLflow server not reachable ({e})") from None


def _open_store(uri: str, spec: SweepSpec) -> tuple[Any, str]:
    _check_server(uri)
    try:
        client = tracking.client(uri)
        exp_id = tracking.ensure_experiment(client, spec.name, artifact_root(spec) if tracking.is_local(uri) else None)
    except Exception as e:
        raise TrackingError(f"tracking_uri {uri}: MLflow store not usable ({str(e).splitlines()[0][:200]})") from None
    return client, exp_id


def reconcile_runs(record: SweepRecord) -> dict[str, str]:
    """End child runs left RUNNING (a trial stopped by Ray before it could): status from Ray's state."""
    from ray.tune import ExperimentAnalysis

    client = tracking.client(record.tracking_uri)
    ray_status = {t.trial_id: t.status for t in ExperimentAnalysis(record.results_dir).trials}
    filt = f"tags.`{tracking.PARENT}` = '{record.parent_run_id}' and attributes.status = 'RUNNING'"
    fixed = {}
    for run in client.search_runs([record.experiment_id], filter_string=filt, max_results=10000):
        status = ray_status.get(run.data.tags.get(tracking.TRIAL_ID, ""), "")
        mlflow_status = {"TERMINATED": "FINISHED", "ERROR": "FAILED"}.get(status, "KILLED")
        client.set_terminated(run.info.run_id, status=mlflow_status)
        fixed[run.info.run_id] = mlflow_status
    return fixed


# -- sweeps ------------------------------------------------------------------------------------


@dataclasses.dataclass
class SweepOutcome:
    """What `run` / `resume` did."""

    record: SweepRecord
    wall_s: float
    trials: int
    errors: int


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def _trainable(record: SweepRecord, spec: SweepSpec, resources: dict[str, float]) -> Any:
    from ray import tune

    from sct_sweeps.trainable import SweepContext, run_trial

    ctx = SweepContext(
        log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()),
        spec=spec,
        tracking_uri=record.tracking_uri,
        experiment_id=record.experiment_id,
        parent_run_id=record.parent_run_id,
        pretrain_cache=record.pretrain_cache,
        results_dir=record.results_dir,
    )
    return tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)


def _fit(tuner: Any, record: SweepRecord, client: Any, t0: float) -> SweepOutcome:
    status = "FAILED"
    try:
        results = tuner.fit()
        errors = len(results.errors)
        status = "FINISHED"
        client.set_tag(record.parent_run_id, "sct.failed_trials", str(errors))
        return SweepOutcome(record, time.perf_counter() - t0, len(results), errors)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            fixed = reconcile_runs(record)
            if fixed:
                log.info("ended %d child runs Ray had stopped: %s", len(fixed), fixed)
            tracking.end_run(client, record.parent_run_id, status)
        except Exception as e:
            log.error("could not close the sweep's MLflow runs: %s", e)


def run_sweep(
    spec: SweepSpec,
    address: str | None = None,
    uri: str | None = None,
    num_cpus: int | None = None,
    on_pretrain: Callable[[int, int], None] | None = None,
    progress: bool = True,
) -> SweepOutcome:
    """Start sweep `spec`: pretrain once per distinct phase one, then every trial under Ray Tune."""
    t0 = time.perf_counter()
    out = storage_root(spec) / spec.name
    if (out / RECORD).exists() or (out / "tuner.pkl").exists():
        raise SweepExistsError(
            f"{spec.name}: a sweep with this name exists at {out}; continue it with `sct-sweep resume "
            f"{spec.name}` or start a new one with --name"
        )
    uri = tracking_uri(spec, uri)
    if not address:
        check_local_gpu(spec)
    client, exp_id = _open_store(uri, spec)
    start_ray(address, num_cpus)
    try:
        resources = trial_resources(spec)
        text = spec_yaml(spec)
        parent = tracking.start_parent_run(
            client, exp_id, spec.name, _parent_params(spec, resources, address), text, project_dir()
        )
        record = SweepRecord(
            name=spec.name,
            spec_yaml=text,
            tracking_uri=uri,
            experiment_id=exp_id,
            parent_run_id=parent,
            pretrain_cache=str(pretrain_cache(spec)),
            results_dir=str(out),
            created=time.time(),
            address=address,
        )
        record.save()
        log.info("sweep %s: MLflow experiment %s, parent run %s, results %s", spec.name, exp_id, parent, out)
        try:
            from sct_sweeps.pretrain import pretrain_all

            pretrain_all(spec, Path(record.pretrain_cache), resources, on_pretrain)
        except BaseException:
            tracking.end_run(client, parent, "FAILED")
            raise
        tuner = _make_tuner(spec, record, resources, progress)
        return _fit(tuner, record, client, t0)
    finally:
        stop_ray()


def _make_tuner(spec: SweepSpec, record: SweepRecord, resources: dict[str, float], progress: bool) -> Any:
    from ray import tune

    callbacks = []
    if progress:
        from sct_sweeps.progress import RichProgress

        callbacks.append(RichProgress(trial_count(spec), spec.metric, spec.mode))
    return tune.Tuner(
        _trainable(record, spec, resources),
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            search_alg=search_alg(spec),
            scheduler=scheduler(spec),
            num_samples=spec.num_samples,
            max_concurrent_trials=spec.max_concurrent_trials,
            reuse_actors=True,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=str(Path(record.results_dir).parent),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            callbacks=callbacks,
            verbose=0,
        ),
    )


def resume_sweep(
    name: str,
    storage: Path | None = None,
    address: str | None = None,
    uri: str | None = None,
    num_cpus: int | None = None,
    on_pretrain: Callable[[int, int], None] | None = None,
) -> SweepOutcome:
    """Continue sweep `name`: finished trials stay, unfinished and errored ones go on from their checkpoints."""
    t0 = time.perf_counter()
    record = load_record(name, storage)
    spec = record.spec
    if uri:
        record.tracking_uri = uri
    address = address or None
    if not address:
        check_local_gpu(spec)
    _check_server(record.tracking_uri)
    client = tracking.client(record.tracking_uri)
    try:
        client.get_run(record.parent_run_id)
    except Exception as e:
        raise TrackingError(
            f"{record.tracking_uri}: parent run {record.parent_run_id} of sweep {name} not found "
            f"({str(e).splitlines()[0][:160]}); pass the --tracking-uri the sweep was started with"
        ) from None
    start_ray(address, num_cpus)
    try:
        from ray import tune

        if not tune.Tuner.can_restore(record.results_dir):
            raise SweepNotFoundError(f"{name}: {record.results_dir} holds no Ray experiment state to resume")
        resources = trial_resources(spec)
        record.address = address
        record.save()
        tracking.reopen_run(client, record.parent_run_id)
        from sct_sweeps.pretrain import pretrain_all

        pretrain_all(spec, Path(record.pretrain_cache), resources, on_pretrain)
        tuner = tune.Tuner.restore(
            record.results_dir,
            trainable=_trainable(record, spec, resources),
            resume_unfinished=True,
            resume_errored=True,
            restart_errored=False,
        )
        return _fit(tuner, record, client, t0)
    finally:
        stop_ray()
