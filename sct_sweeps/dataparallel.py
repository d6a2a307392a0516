"""A trial as `resources.workers` data-parallel processes: a Ray Train run driven by the trial's Tune function.

The Tune trial (`run_workers`, holding no CPU) starts a `TorchTrainer` named after the trial in the sweep's
results directory. Ray Train starts the workers (`resources.placement`: pack them on few nodes or spread
them), joins them in one torch.distributed group (gloo between CPUs, NCCL between GPUs) and runs
`train_worker` in each. Every rank trains (`trainer.train` shards each global batch over the group); rank 0
alone owns the trial's MLflow run and writes the checkpoints. Every rank calls `ray.train.report` at each
evaluation (Ray Train needs the same number of reports from every worker); `TuneReportCallback` hands
rank 0's metrics on to Tune. A failed worker restarts the whole group from rank 0's last checkpoint (Ray
Train's FailureConfig); a retried or resumed trial builds a TorchTrainer of the same name and storage,
which goes on from the same checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sct_sweeps import schema
from sct_sweeps.config import SweepSpec
from sct_sweeps.pretrain import with_pretrain
from sct_sweeps.trainable import (
    SweepContext,
    TuneReporter,
    checkpoint_run_ids,
    finished_run,
    numeric_metrics,
    reaches_ray,
    setup_logging,
    train_tracked,
    trainer_dir,
    trial_cfg,
    trial_runs,
)
from sct_sweeps.trial_checkpoints import restore_dir

log = logging.getLogger(__name__)


class TrainReporter(TuneReporter):
    """Rank 0's reporter: MLflow as in a one-process trial; evaluations and checkpoints go to Ray Train."""

    def send(self, result: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        ckpt = None if checkpoint_dir is None else ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        ray.train.report(result, checkpoint=ckpt)


class WorkerReporter:
    """The reporter of ranks other than 0: nothing to MLflow, an empty report to Ray Train at each of the
    evaluations rank 0 reports (the trainer keeps it on every rank: `every_rank`)."""

    every_rank = True

    def report(self, step: int, metrics: Mapping[str, float], checkpoint_dir: Path | None = None) -> None:
        if reaches_ray(numeric_metrics(metrics), checkpoint_dir):
            import ray.train

            ray.train.report({"iteration": step})

    def log_artifact(self, path: Path) -> None:
        pass


def scaling_config(spec: SweepSpec, resources: Mapping[str, float]) -> Any:
    """Ray Train's ScalingConfig of one trial: `workers` processes of {cpu, gpu} each, packed or spread."""
    import ray.train

    per_worker = {"CPU": float(resources["cpu"])}
    if resources["gpu"] > 0:
        per_worker["GPU"] = float(resources["gpu"])
    return ray.train.ScalingConfig(
        num_workers=spec.resources.workers,
        use_gpu=resources["gpu"] > 0,
        resources_per_worker=per_worker,
        placement_strategy=spec.resources.placement.upper(),
    )


def run_workers(config: dict[str, Any], ctx: SweepContext) -> None:
    """Ray Tune function trainable of a multi-worker trial: fit its Ray Train run (resumed if it exists)."""
    import ray.train
    import torch
    from ray import tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainer.distributed import backend_for

    setup_logging(ctx)
    trial_id = tune.get_context().get_trial_id()
    device = torch.device("cuda" if ctx.resources["gpu"] > 0 else "cpu")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config, "ctx": ctx, "trial_id": trial_id},
        scaling_config=scaling_config(ctx.spec, ctx.resources),
        torch_config=TorchConfig(backend=backend_for(device)),
        run_config=ray.train.RunConfig(
            name=trial_id,
            storage_path=ctx.results_dir,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=ctx.spec.max_failures),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


def _gather(node_id: str, finished: bool) -> tuple[list[str], bool]:
    """Every rank's node id (in rank order), and whether rank 0 found the trial finished already."""
    import torch.distributed as dist

    items: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(items, (node_id, finished))
    return [node for node, _ in items], bool(items[0][1])


def _use_own_gpu(ctx: SweepContext) -> None:
    """On GPUs: this worker's own device is the current one (NCCL's object gathers use it; the trainer
    picks it from LOCAL_RANK)."""
    import ray.train

    os.environ.setdefault("LOCAL_RANK", str(ray.train.get_context().get_local_rank()))
    if ctx.resources["gpu"] > 0:
        import torch
        from ray.train.torch import get_device

        torch.cuda.set_device(get_device())


def train_worker(loop: dict[str, Any]) -> None:
    """One rank of a multi-worker trial: restore the last checkpoint, train; rank 0 tracks the run in MLflow."""
    import ray
    import ray.train

    from trainer.train import train

    ctx: SweepContext = loop["ctx"]
    trial_id: str = loop["trial_id"]
    setup_logging(ctx)
    _use_own_gpu(ctx)
    train_ctx = ray.train.get_context()
    rank, size = train_ctx.get_world_rank(), train_ctx.get_world_size()
    workdir = trainer_dir(ctx, trial_id) / f"rank{rank}"
    workdir.mkdir(parents=True, exist_ok=True)
    restore = restore_dir(ray.train.get_checkpoint(), workdir)
    node_id = ray.get_runtime_context().get_node_id()
    cfg = trial_cfg(ctx, loop["config"], workdir / "out")
    tracker, done = None, None
    if rank == 0:
        tags = {schema.NODE_ID: node_id, schema.WORLD_SIZE: str(size)}
        tracker = trial_runs(ctx, loop["config"], cfg, trial_id=trial_id, run_ids=checkpoint_run_ids(restore.meta),
                             tags=tags)  # fmt: skip
        done = finished_run(tracker, cfg)
    nodes, finished = _gather(node_id, done is not None)
    where = {"node_id": nodes[0], "nodes": ",".join(nodes)}
    if finished:  # the driver died before Ray recorded the end: hand Ray the result, train nothing
        ray.train.report({**done.data.metrics, "iteration": cfg.iterations, **where} if done else {})
        return
    if tracker is not None:
        tags = {schema.NODE_ID: nodes[0], schema.NODES: ",".join(nodes), schema.WORLD_SIZE: str(size)}
        reporter = TrainReporter(tracker, where, ctx.spec.metric, ctx.spec.mode)
        train_tracked(tracker, cfg, ctx=ctx, reporter=reporter, restore=restore, tags=tags, workdir=workdir)
    else:
        train(with_pretrain(cfg, Path(ctx.pretrain_cache)), reporter=WorkerReporter(), resume_from=restore.path)
        shutil.rmtree(workdir / "resume", ignore_errors=True)  # Ray's checkpoint, copied here to resume from
