"""What a sweep leaves on disk beside Ray's experiment state: ``<storage>/<name>/sct_sweep.json``.

`resume`, `status` and the dashboards read it: the validated spec, the MLflow store, the
experiment and parent run ids, the pretraining cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from sct_sweeps.config import SweepSpec, check_name, parse_spec
from sct_sweeps.errors import SweepExistsError, SweepNotFoundError
from sct_sweeps.locks import lock_file
from trainer.yaml_io import parse_yaml

RECORD = "sct_sweep.json"
CLAIM = ".sct_claim"  # locked by the `run` that is starting the sweep, until its record is written


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
        return parse_spec(parse_yaml(self.spec_yaml), f"{self.results_dir}/{RECORD}")


def load_record(name: str, results: Path) -> SweepRecord:
    """The record of sweep `name` under the Ray results root `results`; SweepNotFoundError naming where it looked."""
    path = results / check_name(name) / RECORD
    if not path.is_file():
        raise SweepNotFoundError(f"{name}: no sweep at {path.parent} (pass --storage if it lives elsewhere)")
    return SweepRecord(**json.loads(path.read_text()))


def list_sweeps(results: Path) -> list[SweepRecord]:
    """Every sweep under the Ray results root `results`, oldest first."""
    records = [SweepRecord(**json.loads(p.read_text())) for p in results.glob(f"*/{RECORD}")]
    return sorted(records, key=lambda r: r.created)


class NameClaim:
    """Sweep results directory `out` taken by this process: no other `run` can start a sweep there.

    Checking that the name is free and writing the record are minutes apart (Ray starts between
    them); the claim file's fcntl lock, held from before the check until `release`, makes the two
    one step for every other `run`. A killed holder's lock is dropped by the kernel.
    """

    def __init__(self, out: Path, name: str) -> None:
        self.out, self.path = out, out / CLAIM
        out.mkdir(parents=True, exist_ok=True)
        self._fd = lock_file(self.path, wait=False)
        if self._fd is None:
            raise SweepExistsError(f"{name}: another `sct-sweep run` is starting a sweep of this name at {out}")
        if (out / RECORD).exists() or (out / "tuner.pkl").exists():
            self.release()
            raise SweepExistsError(
                f"{name}: a sweep with this name exists at {out}; continue it with `sct-sweep resume "
                f"{name}` or start a new one with --name"
            )

    def release(self) -> None:
        """Give the name back (idempotent): the claim file goes, and `out` too if nothing else was written."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still locked: a waiter then finds a new file to lock
        os.close(self._fd)
        self._fd = None
        try:
            self.out.rmdir()
        except OSError:  # not empty: the record or Ray's state is there
            pass
