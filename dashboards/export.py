"""Parquet export of a sweep: the loader's history frame, one row per (trial, step), params as columns."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dashboards.loader import load_sweep

log = logging.getLogger(__name__)


def export_parquet(tracking_uri: str, sweep: str, out_path: Path) -> Path:
    """Write every metric history of the sweep to `out_path` (Parquet); returns the path."""
    res = load_sweep(tracking_uri, sweep)
    table = pa.Table.from_pandas(res.history, preserve_index=False)
    meta = {b"sct.sweep": sweep.encode(), b"sct.parent_run_id": res.parent_run_id.encode(),
            b"sct.metrics": json.dumps(res.metric_names).encode(),
            b"sct.params": json.dumps(res.param_names).encode()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out_path)
    log.info("exported sweep %s: %d rows x %d columns -> %s", sweep, table.num_rows, table.num_columns, out_path)
    return out_path
