"""The MLflow layout of a sweep, as names: what the runner writes and the dashboards read.

One experiment per sweep; a parent run tagged ``sct.sweep=<name>``, ``sct.role=parent`` with
artifact ``spec.yaml``; one child run per trial tagged ``mlflow.parentRunId``, ``sct.role=trial``,
``sct.trial_id``, ``sct.axis.<path>=<value>`` and ``sct.path.<path>`` (filesystem settings), params =
the flattened TrainConfig less its paths, metrics logged with step = iteration (names from the
trainer's Reporter, docs/architecture.md), artifact ``config.yaml``, sample grids under ``samples/``
and as stepped MLflow images. Dependency-free: `dashboards` imports it without Ray or MLflow.
"""

from __future__ import annotations

import re

# -- tags of every run ----------------------------------------------------------------------------
ROLE = "sct.role"  # ROLE_PARENT or ROLE_TRIAL
SWEEP = "sct.sweep"
TRIAL_ID = "sct.trial_id"
PARENT = "mlflow.parentRunId"  # MLflow's own parent link
ROLE_PARENT, ROLE_TRIAL = "parent", "trial"

# -- tags of a trial run --------------------------------------------------------------------------
AXIS_PREFIX = "sct.axis."  # + dotted TrainConfig path: the trial's value on a search axis
NODE_ID = "sct.node_id"  # Ray node of the latest attempt (of rank 0 in a multi-worker trial)
NODES = "sct.nodes"  # multi-worker trial: every rank's Ray node id, comma-separated, in rank order
WORLD_SIZE = "sct.world_size"  # multi-worker trial: how many data-parallel workers (resources.workers)
ATTEMPTS = "sct.attempts"  # how many times the trial (re)started
ERROR = "sct.error"  # one line; the traceback is artifact ERROR_ARTIFACT
PRETRAIN_CHECKPOINT = "sct.pretrain_checkpoint"  # the shared phase-one checkpoint it tuned from
RESUMED_FROM = "sct.resumed_from"  # iteration of the checkpoint it resumed from
SKIPPED_CHECKPOINTS = "sct.skipped_checkpoints"  # unusable checkpoints passed over on resume
STOPPED = "sct.stopped"  # stopped early by the scheduler
RECURRING = "sct.recurring_error"  # an error that comes back on every attempt (divergence, bad config or data)
NOT_RETRIED = "sct.not_retried"  # set on an attempt that ended at once because RECURRING was set
ORPHANED = "sct.orphaned"  # why the run was deleted (its trial was lost with the driver)
PATH_PREFIX = "sct.path."  # + dotted TrainConfig path: a filesystem setting (a tag, not a param: machine-specific)
CHECKPOINT = "sct.checkpoint"  # the trial's final checkpoint directory (holds state.pt)
TRAINING = "sct.training"  # the Ray trial that trained the weights; shared by the variants of one training
VARIANT = "sct.variant"  # an evaluated variant's settings, `sampler.eta=0.2,...` (sct_sweeps/variants.py)
EVALUATED_AFTER = "sct.evaluated_after"  # a variant added by `sct-sweep evaluate` (no training of its own)

# -- tags of the experiment and the parent run ----------------------------------------------------
NOTE = "mlflow.note.content"  # the description MLflow shows on an experiment's or a run's page

# -- tags of the parent run -----------------------------------------------------------------------
FAILED_TRIALS = "sct.failed_trials"
REPORT = "sct.report"  # artifact path of the published report
SCALING_PREFIX = "sct."  # + scaling_{k}step[_{x}]: "ok" or why a fit failed

# -- artifacts ------------------------------------------------------------------------------------
SPEC_ARTIFACT = "spec.yaml"  # parent run: the validated sweep spec
ERROR_ARTIFACT = "error.txt"  # trial run: the traceback of its failure
SAMPLES_DIR = "samples"  # trial run: grid_{k}step_it{iteration}.png (also MLflow images samples_{k}step)
CONFIG_ARTIFACT = "config.yaml"  # trial run: its resolved TrainConfig
CHECKPOINT_DIR = "checkpoint"  # trial run on a tracking server: the final state.pt
GRID_RE = re.compile(r"grid_(\d+)step(?:_it(\d+))?\.png$")

# -- metrics (the trainer's Reporter names) -------------------------------------------------------
FID_RE = re.compile(r"fid_(\d+)step")  # FID of the EMA weights with the k-step sampler


def fid_metric(steps: int, online: bool = False) -> str:
    """``fid_{k}step`` (EMA weights) or ``fid_{k}step_online``."""
    return f"fid_{steps}step" + ("_online" if online else "")


def axis_tag(path: str) -> str:
    """The tag holding a trial's value on search axis `path`."""
    return AXIS_PREFIX + path


def trial_runs_filter(parent_run_id: str) -> str:
    """MLflow search filter for the trial runs of a parent run."""
    return f"tags.`{PARENT}` = '{parent_run_id}' and tags.`{ROLE}` = '{ROLE_TRIAL}'"


def parent_runs_filter(sweep: str) -> str:
    """MLflow search filter for the parent run(s) of sweep `sweep`."""
    return f"tags.`{SWEEP}` = '{sweep}' and tags.`{ROLE}` = '{ROLE_PARENT}'"
