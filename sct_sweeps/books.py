"""Closing a sweep's books after Ray: its MLflow child runs ended with Ray's verdict, runs of trials Ray
forgot retired, and one line for results Ray cannot read back (a disk that filled mid-sweep)."""

from __future__ import annotations

import logging
from pathlib import Path

from sct_sweeps import schema, tracking
from sct_sweeps.errors import StorageError, SweepError
from sct_sweeps.record import SweepRecord
from sct_sweeps.stores import check_writable

log = logging.getLogger(__name__)


def reconcile_runs(record: SweepRecord) -> dict[str, str]:
    """End child runs left RUNNING (a trial stopped by Ray before it could): status from Ray's state."""
    from ray.tune import ExperimentAnalysis

    client = tracking.client(record.tracking_uri)
    ray_status = {t.trial_id: t.status for t in ExperimentAnalysis(record.results_dir).trials}
    filt = f"tags.`{schema.PARENT}` = '{record.parent_run_id}' and attributes.status = 'RUNNING'"
    fixed = {}
    for run in client.search_runs([record.experiment_id], filter_string=filt, max_results=10000):
        status = ray_status.get(run.data.tags.get(schema.TRIAL_ID, ""), "")
        mlflow_status = {"TERMINATED": "FINISHED", "ERROR": "FAILED"}.get(status, "KILLED")
        client.set_terminated(run.info.run_id, status=mlflow_status)
        fixed[run.info.run_id] = mlflow_status
    return fixed


def retire_orphans(record: SweepRecord) -> list[str]:
    """Child runs of trials missing from Ray's saved experiment state, ended, tagged and deleted.

    Ray snapshots its state every few seconds: a trial started after the last snapshot of a driver
    that then died is unknown to `Tuner.restore`, which runs its configuration again as a new trial.
    Its run would be a second, partial run of that configuration; it goes to MLflow's trash
    (`mlflow runs restore` brings it back) with tag ``sct.orphaned`` saying why.
    """
    from ray.tune import ExperimentAnalysis

    known = {t.trial_id for t in ExperimentAnalysis(record.results_dir).trials}
    client = tracking.client(record.tracking_uri)
    filt = schema.trial_runs_filter(record.parent_run_id)
    retired = []
    for run in client.search_runs([record.experiment_id], filter_string=filt, max_results=10000):
        if run.data.tags.get(schema.TRIAL_ID) in known:
            continue
        why = "its trial was started after Ray's last state snapshot of a driver that died; rerun as a new trial"
        client.set_tag(run.info.run_id, schema.ORPHANED, why)
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED")
        client.delete_run(run.info.run_id)
        retired.append(run.info.run_id)
    return retired


def out_of_room(record: SweepRecord) -> StorageError | None:
    """One line if the results directory is (nearly) full after a sweep whose trials failed, else None."""
    try:
        check_writable(Path(record.results_dir))
    except StorageError as e:
        where = str(e).split("; ", 1)[0]
        return StorageError(f"{where}: the sweep stopped; free space, then `sct-sweep resume {record.name}` goes on")
    return None


def unreadable_results(record: SweepRecord, err: BaseException) -> SweepError:
    """One line for a sweep whose results Ray cannot read back once its trials ended: most often the disk
    filled mid-sweep and Ray's error files were left empty. Names the directory and what to do."""
    full = out_of_room(record)
    if full is not None:
        return full
    name = record.name
    return SweepError(f"{record.results_dir}: Ray could not read back its record of the trials ({type(err).__name__}: "
                      f"{err}); `sct-sweep status {name}` shows them and `sct-sweep resume {name}` goes on")
