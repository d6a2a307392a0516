"""Run and resume sweeps: shared pretraining, the Tuner, the parent MLflow run, closing the books.

The results of a sweep live in ``<storage>/<name>``: Ray's experiment state plus the sweep record
(`record.py`). Ray itself is started or joined by `session.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sct_sweeps import schema, tracking
from sct_sweeps.books import out_of_room, reconcile_runs, retire_orphans, unreadable_results
from sct_sweeps.config import SweepSpec, spec_yaml
from sct_sweeps.errors import TrackingError
from sct_sweeps.record import NameClaim, SweepRecord, load_record
from sct_sweeps.session import check_local_gpu, probe_address, slots, start_ray, stop_ray, trial_resources
from sct_sweeps.space import param_space, scheduler, search_alg, trial_count
from sct_sweeps.stores import Stores, is_local, resolve_stores

log = logging.getLogger(__name__)

DRIVER_MEMORY = 256 * 1024**2  # bytes a multi-worker trial's driver function asks Ray for (it holds no CPU)
STOPPED_DRIVER_GRACE_S = 20  # a stopped multi-worker trial's driver is killed after this long


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
        "resources.workers": spec.resources.workers,
        "resources.placement": spec.resources.placement,
        "max_failures": spec.max_failures,
        "mlflow_flush_s": spec.mlflow_flush_s,
        "ray.address": address or "embedded",
    }
    for path, axis in spec.search.items():
        params[f"search.{path}"] = f"{axis.kind}: {getattr(axis, axis.kind)}"
    return params


def _check_server(uri: str) -> None:
    """Fail in seconds, not minutes of client retries, when a tracking server does not answer."""
    import urllib.request

    if is_local(uri):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as r:
            r.read()
    except OSError as e:
        raise TrackingError(f"tracking_uri {uri}: MLflow server not reachable ({e})") from None


def _open_store(stores: Stores, spec: SweepSpec) -> tuple[Any, str]:
    """The MLflow client and the sweep's experiment id (created if new); TrackingError if unusable."""
    uri = stores.tracking_uri
    try:
        client = tracking.client(uri)
        exp_id = tracking.ensure_experiment(client, spec.name, stores.artifact_root, spec.description)
    except Exception as e:
        raise TrackingError(f"tracking_uri {uri}: MLflow store not usable ({str(e).splitlines()[0][:200]})") from None
    return client, exp_id


def _find_parent(record: SweepRecord) -> Any:
    """The MLflow client of a sweep being resumed, once its parent run is found; TrackingError if not."""
    client = tracking.client(record.tracking_uri)
    try:
        client.get_run(record.parent_run_id)
    except Exception as e:
        raise TrackingError(
            f"{record.tracking_uri}: parent run {record.parent_run_id} of sweep {record.name} not found "
            f"({str(e).splitlines()[0][:160]}); pass the --tracking-uri the sweep was started with"
        ) from None
    return client


# -- sweeps ------------------------------------------------------------------------------------


@dataclasses.dataclass
class SweepOutcome:
    """What `run` / `resume` did, and where the time went."""

    record: SweepRecord
    wall_s: float
    trials: int
    errors: int
    pretrain_s: float = 0.0  # wall time of the shared pretraining phase
    trial_s: float = 0.0  # sum over trials of their running time (Ray's time_total_s)
    slots: int = 1  # trials that could run at once

    def overhead_lines(self) -> list[str]:
        """Wall time against the compute it bought: sum of trial time / parallel slots."""
        ideal = self.trial_s / max(1, self.slots)
        tuner_wall = self.wall_s - self.pretrain_s
        eff = ideal / tuner_wall if tuner_wall > 0 else float("nan")
        return [
            f"wall {self.wall_s:.0f} s = pretraining {self.pretrain_s:.0f} s + trials {tuner_wall:.0f} s",
            f"trial compute: sum {self.trial_s:.0f} s over {self.slots} slots = {ideal:.0f} s ideal; "
            f"trial phase efficiency {eff:.0%} (the rest: Ray/worker start-up, imports, stragglers)",
        ]


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
        resources=resources,
    )
    # Several workers: the trial's function only drives a Ray Train run whose workers hold the CPUs and GPUs;
    # it asks for none itself (Tune needs a non-empty request: the driver's memory).
    own = resources if spec.resources.workers == 1 else {"cpu": 0, "memory": DRIVER_MEMORY}
    return tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), own)


def _trial_seconds(results_dir: str) -> dict[str, float]:
    """trial id -> its running time (Ray's time_total_s) as the stored experiment state has it."""
    from sct_sweeps.status import stored_analysis

    analysis = stored_analysis(results_dir)
    trials = analysis.trials if analysis is not None else []
    return {t.trial_id: float((t.last_result or {}).get("time_total_s", 0.0)) for t in trials}


def _fit(
    tuner: Any, record: SweepRecord, client: Any, t0: float, pretrain_s: float, slots: int,
    before: dict[str, float] | None = None,
) -> SweepOutcome:
    """Run the Tuner; the outcome counts the trial time of this session only (`before`: each trial's time
    when a resumed sweep started, so trials that ended earlier do not inflate the efficiency)."""
    status = "FAILED"
    before = before or {}
    try:
        results = tuner.fit()
        from sct_sweeps.trial_checkpoints import prune_ended_sweep

        log.info("pruned %d trial checkpoints the ended sweep no longer needs", prune_ended_sweep(record.results_dir))
        errors = len(results.errors)
        if errors and (full := out_of_room(record)) is not None:  # the trials failed because the disk filled
            raise full
        status = "FINISHED"
        client.set_tag(record.parent_run_id, schema.FAILED_TRIALS, str(errors))
        trial_s = sum(max(0.0, float((r.metrics or {}).get("time_total_s", 0.0))
                          - before.get(str((r.metrics or {}).get("trial_id")), 0.0)) for r in results)
        return SweepOutcome(
            record=record,
            wall_s=time.perf_counter() - t0,
            trials=len(results),
            errors=errors,
            pretrain_s=pretrain_s,
            trial_s=trial_s,
            slots=slots,
        )
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except (EOFError, pickle.UnpicklingError) as e:  # Ray reading back trial error files it could not write
        raise unreadable_results(record, e) from None
    finally:
        try:
            fixed = reconcile_runs(record)
            if fixed:
                log.info("ended %d child runs Ray had stopped: %s", len(fixed), fixed)
            tracking.end_run(client, record.parent_run_id, status)
        except Exception as e:
            log.error("could not close the sweep's MLflow runs: %s", e)


@dataclasses.dataclass(frozen=True)
class Launch:
    """How `run` and `resume` drive a sweep: on which Ray, with how many CPUs, what shows progress."""

    address: str | None = None  # Ray cluster; None = a private embedded Ray
    num_cpus: int | None = None  # CPUs of the embedded Ray (default: all)
    on_pretrain: Callable[[int, int], None] | None = None  # (done, total) of the shared pretraining
    progress: bool = True  # the live trial table


def _preflight(spec: SweepSpec, uri: str, launch: Launch) -> None:
    """Before the name, the store or Ray are touched: the cluster answers (or the local GPU exists), and the server."""
    if launch.address:
        probe_address(launch.address)
    else:
        check_local_gpu(spec)
    _check_server(uri)


@contextlib.contextmanager
def _ray_session(
    launch: Launch,
    open_store: Callable[[], Any],
    release: Callable[[], None] = lambda: None,
    *,
    state_api: bool = False,
) -> Iterator[Any]:
    """Open the store while Ray starts (`state_api`: an embedded one with its state API, for Ray Train); at the
    end, however it ends, `release` (a name claim) and stop Ray."""
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-open") as pool:
            opening = pool.submit(open_store)  # MLflow's import and migrations overlap Ray's start
            start_ray(launch.address, launch.num_cpus, state_api=state_api)
        yield opening.result()
    finally:
        release()
        stop_ray()


def _drive(
    *,
    spec: SweepSpec,
    record: SweepRecord,
    client: Any,
    resources: dict[str, float],
    launch: Launch,
    t0: float,
    fresh: bool,
) -> SweepOutcome:
    """What run (`fresh`) and resume share once the parent run is open: pretraining, the Tuner, the books."""
    from ray import tune

    from sct_sweeps.pretrain import pretrain_all

    t_pre = time.perf_counter()
    try:
        pretrain_all(spec, Path(record.pretrain_cache), resources, launch.on_pretrain)
    except BaseException:
        if fresh:
            tracking.end_run(client, record.parent_run_id, "FAILED")
        raise
    pretrain_s = time.perf_counter() - t_pre
    before: dict[str, float] = {}
    if spec.resources.workers > 1:  # a stopped trial's actor holds its Ray Train workers until it is gone: end it
        os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", str(STOPPED_DRIVER_GRACE_S))  # soon (Tune's default: 600)
    if not fresh and tune.Tuner.can_restore(record.results_dir):
        before = _trial_seconds(record.results_dir)
        orphans = retire_orphans(record)
        if orphans:
            log.warning("deleted %d MLflow runs of trials Ray lost with the driver: %s", len(orphans), orphans)
        tuner = tune.Tuner.restore(
            record.results_dir,
            trainable=_trainable(record, spec, resources),
            resume_unfinished=True,
            resume_errored=True,
            restart_errored=False,
        )
    else:
        if not fresh:  # killed before the Tuner started (during pretraining): start it now, same parent run
            log.info("sweep %s never reached the Tuner; starting it", record.name)
        tuner = _make_tuner(spec, record, resources, launch.progress)
    return _fit(tuner, record, client, t0, pretrain_s, slots(spec, resources), before)


def run_sweep(spec: SweepSpec, *, uri: str | None = None, launch: Launch = Launch()) -> SweepOutcome:
    """Start sweep `spec`: pretrain once per distinct phase one, then every trial under Ray Tune."""
    t0 = time.perf_counter()
    stores = resolve_stores(spec=spec, tracking_uri=uri)
    stores.check_tracking_dir()
    stores.check_writable()
    _preflight(spec, stores.tracking_uri, launch)
    out = stores.sweep_dir(spec.name)
    claim = NameClaim(out, spec.name)  # SweepExistsError if taken; held until the record is written
    multi = spec.resources.workers > 1
    with _ray_session(launch, lambda: _open_store(stores, spec), claim.release, state_api=multi) as (client, exp_id):
        resources = trial_resources(spec)
        text = spec_yaml(spec)
        params = _parent_params(spec, resources, launch.address)
        parent = tracking.start_parent_run(
            client, experiment_id=exp_id, sweep=spec.name, params=params, spec_text=text, repo=stores.project,
            description=spec.description,
        )
        record = SweepRecord(
            name=spec.name,
            spec_yaml=text,
            tracking_uri=stores.tracking_uri,
            experiment_id=exp_id,
            parent_run_id=parent,
            pretrain_cache=str(stores.pretrain_cache),
            results_dir=str(out),
            created=time.time(),
            address=launch.address,
        )
        record.save()
        claim.release()
        log.info("sweep %s: MLflow experiment %s, parent run %s, results %s", spec.name, exp_id, parent, out)
        return _drive(spec=spec, record=record, client=client, resources=resources, launch=launch, t0=t0, fresh=True)


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
            # Ray Train runs wait for their workers outside Tune's resource accounting: at most as many as fit.
            max_concurrent_trials=slots(spec, resources) if spec.resources.workers > 1 else spec.max_concurrent_trials,
            # A reused actor would keep a stopped (ASHA) trial's Ray Train run going in its old thread; a
            # multi-worker trial's actor ends with it, and with it that run's controller and workers.
            reuse_actors=spec.resources.workers == 1,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=str(Path(record.results_dir).parent),
            # Ray deletes nothing: with num_to_keep it could delete the checkpoint its last experiment-state
            # snapshot names before the next snapshot, and a resumed trial could not restore. Each trial
            # prunes its own (trial_checkpoints.prune_ray_checkpoints), keeping what the newest snapshot can name.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            callbacks=callbacks,
            verbose=0,
        ),
    )


def resume_sweep(
    name: str, *, storage: Path | None = None, uri: str | None = None, launch: Launch = Launch()
) -> SweepOutcome:
    """Continue sweep `name`: finished trials stay, unfinished and errored ones go on from their checkpoints."""
    t0 = time.perf_counter()
    record = load_record(name, resolve_stores(storage=storage).results)  # first: a missing sweep says where it looked
    stores = resolve_stores(name=name, storage=storage, tracking_uri=uri)
    record.tracking_uri = stores.tracking_uri
    spec = record.spec
    stores.check_writable()
    _preflight(spec, record.tracking_uri, launch)
    with _ray_session(launch, lambda: _find_parent(record), state_api=spec.resources.workers > 1) as client:
        resources = trial_resources(spec)
        record.address = launch.address
        record.save()
        tracking.reopen_run(client, record.parent_run_id)
        return _drive(spec=spec, record=record, client=client, resources=resources, launch=launch, t0=t0, fresh=False)
