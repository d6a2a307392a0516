"""The Ray a sweep runs on: a private embedded one on 127.0.0.1, or an existing cluster.

Embedded mode sets the loopback switch before ray is first imported (docs/stack.md) and shuts Ray down
at the end; cluster mode (`--address` / RAY_ADDRESS) connects and leaves the cluster running.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

from sct_sweeps.config import SweepSpec
from sct_sweeps.errors import ClusterError, ResourceError
from sct_sweeps.space import trial_count
from trainer.heap import heap_env

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0  # a cluster's head answers a TCP connect in milliseconds
OBJECT_STORE_BYTES = 256 * 1024**2  # trials exchange only metrics and checkpoint paths
# What the private Ray leaves out (docs/benchmarks.md §2, bench/ray_tax.py): the idle worker per CPU
# it starts for the first driver (Tune's trial actors carry a runtime env and never use them), its
# internal event statistics and its metrics export (no dashboard or Prometheus reads them here).
EMBEDDED_RAY_ENV = {
    "RAY_prestart_worker_first_driver": "0",
    "RAY_event_stats": "0",
    "RAY_enable_metrics_collection": "0",
}


def _ray_log_level() -> int:
    """Ray's own loggers (driver and workers): INFO only with --verbose."""
    return min(logging.WARNING, logging.getLogger().getEffectiveLevel())


def start_ray(address: str | None, num_cpus: int | None = None, *, state_api: bool = False) -> None:
    """Connect to the cluster at `address`, or start a private local Ray on 127.0.0.1; `state_api`: with
    its dashboard server, which Ray's state API needs (Ray Train's placement-group cleaner asks it whether
    a run's controller still lives, and warns every few seconds where it cannot)."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Ray tables; progress is ours
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if address:
        probe_address(address)
        import ray

        try:
            ray.init(address=address, log_to_driver=True, logging_level=_ray_log_level())
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterError(f"--address {address}: cannot connect to a Ray cluster ({e})") from None
        return
    # Before ray is imported: keep every Ray process on loopback, no token warning (docs/stack.md).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.pop("RAY_ADDRESS", None)
    for key, value in {**EMBEDDED_RAY_ENV, **heap_env()}.items():  # Ray's processes inherit them; the user's win
        os.environ.setdefault(key, value)
    from sct_sweeps import watchdog

    watchdog.start()  # a SIGKILLed driver's Ray goes with it (its agents would linger for a minute)
    import ray

    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=state_api,
        object_store_memory=OBJECT_STORE_BYTES,
        log_to_driver=True,
        logging_level=_ray_log_level(),
    )


def probe_address(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Refuse in seconds a `host:port` (or `ray://host:port`) where nothing accepts a TCP connection:
    `ray.init` would keep retrying for minutes. `auto` and other forms are left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        why = f"no answer in {timeout_s:g} s" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise ClusterError(
            f"--address {address}: no Ray cluster answers there ({why}); "
            "check the address, or start the head with `ray start --head`"
        ) from None


def stop_ray() -> None:
    """Disconnect (cluster) or shut the private Ray down (embedded)."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            _kill_autoscaler_monitor()
            ray.shutdown()


def _kill_autoscaler_monitor() -> None:
    """Embedded Ray: end its autoscaler monitor at once. `ray.shutdown` sends it SIGTERM and waits the
    full second before SIGKILL (docs/benchmarks.md §2); it has nothing to save. No-op on a cluster."""
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    try:  # only processes this driver started are in the node's table
        node.kill_monitor(check_alive=False)  # type: ignore[union-attr]
    except Exception as e:  # a private API: if Ray changes it, shutdown just takes a second longer
        log.debug("could not end Ray's autoscaler monitor early: %s", e)


def check_local_gpu(spec: SweepSpec) -> None:
    """Before starting an embedded Ray: refuse a GPU request on a machine without CUDA."""
    gpu = spec.resources.gpu
    if isinstance(gpu, float) and gpu > 0:
        import torch

        if not torch.cuda.is_available():
            raise ResourceError(f"resources.gpu: {gpu:g} GPU per trial requested, but this machine has no CUDA GPU")


def trial_resources(spec: SweepSpec) -> dict[str, float]:
    """{cpu, gpu} per trial (per worker of a multi-worker trial) checked against the connected Ray:
    `auto` GPU = 1 where GPUs exist."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    max_cpu = max((r.get("CPU", 0.0) for r in nodes), default=0.0)
    max_gpu = max((r.get("GPU", 0.0) for r in nodes), default=0.0)
    cpu, gpu = spec.resources.cpu, spec.resources.gpu
    gpu = (1.0 if max_gpu >= 1 else 0.0) if gpu == "auto" else float(gpu)
    each = "per trial" if spec.resources.workers == 1 else "per worker"
    if cpu > max_cpu:
        raise ResourceError(f"resources.cpu: {cpu:g} CPUs {each}, but the largest Ray node has {max_cpu:g}")
    if gpu > max_gpu:
        raise ResourceError(f"resources.gpu: {gpu:g} GPU {each} requested, but the Ray cluster has {max_gpu:g}")
    total = ray.cluster_resources()
    for key, need in (("CPU", cpu), ("GPU", gpu)):
        if need * spec.resources.workers > total.get(key, 0.0):
            raise ResourceError(
                f"resources.workers: {spec.resources.workers} workers x {need:g} {key} do not fit in the Ray "
                f"cluster's {total.get(key, 0.0):g} {key}"
            )
    return {"cpu": cpu, "gpu": gpu}


def slots(spec: SweepSpec, resources: dict[str, float]) -> int:
    """How many trials the connected Ray can run at once (all of a trial's workers together)."""
    import ray

    total, workers = ray.cluster_resources(), spec.resources.workers
    n = max(1, int(total.get("CPU", 1.0) // (resources["cpu"] * workers)))
    if resources["gpu"] > 0:
        n = min(n, max(1, int(total.get("GPU", 0.0) // (resources["gpu"] * workers))))
    return min(n, spec.max_concurrent_trials or n, trial_count(spec))
