"""Shared test setup: Ray on loopback, private stores per test, a real MLflow server, process hygiene.

Environment set here, before anything imports ray: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` keeps an
embedded Ray on 127.0.0.1 (docs/stack.md) — a multi-node test must drop it from its subprocesses' env
(see `cluster_env`); `RAY_AUTH_MODE=disabled` silences the token warning; usage stats off.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "true")

import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

pytest_plugins = ["_device"]  # SCT_TEST_DEVICE fixture (tests/_device.py)

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for bind(0) (Linux; 32768 by default)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_next_port = [20000 + os.getpid() % 5000]  # next port to try; per-process start, so parallel runs start apart


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, below the ephemeral range: no process that binds port 0
    (Ray's GCS, raylet, agents) can take it between now and when the test's server binds it."""
    low = min(_ephemeral_low(), 32768)
    for _ in range(max(0, low - 20000)):
        port = _next_port[0]
        _next_port[0] = port + 1 if port + 1 < low else 20000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room below the ephemeral range: any free port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_pid(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process we started, then SIGKILL it if it does not exit."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def processes_under(marker: str, parent: int | None = None) -> list[int]:
    """PIDs of live processes whose command line mentions `marker` (a private temp dir of one test,
    or a Ray process title such as `ray::IDLE`), only children of `parent` if given."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = (entry / "status").read_text().splitlines()
        except OSError:
            continue
        state = next((ln for ln in status if ln.startswith("State:")), "")
        ppid = next((int(ln.split()[1]) for ln in status if ln.startswith("PPid:")), None)
        if marker in cmdline and "zombie" not in state and parent in (None, ppid):
            pids.append(int(entry.name))
    return pids


def kill_pids(pids: list[int]) -> None:
    """SIGKILL each PID (processes our test started that outlived it)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def pretrain_cache() -> Iterator[Path]:
    """One pretraining cache for the whole test session: content-addressed, so tests share phase one."""
    d = Path(tempfile.mkdtemp(prefix="sct-pretrain-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private project directory: default results, MLflow store and caches land here."""
    monkeypatch.setenv("SCT_PROJECT_DIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


@pytest.fixture
def sqlite_uri(tmp_path: Path) -> str:
    """A fresh MLflow SQLite store (absolute path)."""
    return f"sqlite:///{tmp_path / 'mlruns.db'}"


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """A short private RAY_TMPDIR; afterwards no Ray process of it may survive (they are killed and the
    test fails)."""
    d = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    yield d
    deadline = time.time() + 20
    left = processes_under(str(d))
    while left and time.time() < deadline:
        time.sleep(0.5)
        left = processes_under(str(d))
    kill_pids(left)
    shutil.rmtree(d, ignore_errors=True)
    assert not left, f"Ray processes left behind: {left}"


@pytest.fixture
def cli_env(project: Path, ray_tmp: Path) -> dict[str, str]:
    """Environment for running `sct-sweep` as a subprocess in the private project."""
    env = dict(os.environ)
    env.update(SCT_PROJECT_DIR=str(project), RAY_TMPDIR=str(ray_tmp), PYTHONUNBUFFERED="1")
    # Ray snapshots the sweep's state every 10 s or more by default; the tests' trials last seconds and are
    # killed mid-run, so they need a snapshot that knows their latest checkpoint: every second here.
    env["TUNE_GLOBAL_CHECKPOINT_S"] = "1"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture
def cluster_env(cli_env: dict[str, str]) -> dict[str, str]:
    """Like cli_env, without the loopback-only switch that forbids multi-node Ray clusters."""
    env = dict(cli_env)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    return env


def became_healthy(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    """Whether the MLflow server at `url` answers /health within `timeout` s (False once `proc` exits)."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Wait until the MLflow server at `url` answers /health; fail with its output if `proc` exits first."""
    if not became_healthy(url, proc, timeout):
        out = "" if proc.stdout is None or proc.poll() is None else proc.stdout.read()[-2000:]
        raise AssertionError(f"mlflow server at {url} did not become healthy: {out}")


def sct_sweep() -> str:
    """Path of the `sct-sweep` console script of this environment."""
    return str(VENV_BIN / "sct-sweep")


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (SQLite store, local artifacts) that a test can stop and restart."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = root / "server"
        self.store.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> None:
        cmd = [
            str(VENV_BIN / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{self.store / 'mlflow.db'}",
            "--default-artifact-root", str(self.store / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        log = open(self.root / "mlflow-server.log", "ab")
        # Its own session: the server and the workers it spawns form one process group we can signal.
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True)
        log.close()
        if not became_healthy(self.url, self.proc, timeout):
            tail = (self.root / "mlflow-server.log").read_text()[-2000:]
            self.stop()
            raise RuntimeError(f"mlflow server did not start: {tail}")

    def stop(self, graceful: bool = True) -> None:
        """SIGTERM (or at once SIGKILL) the process group of the server we started, by its leader's PID."""
        if self.proc is not None:
            pgid = self.proc.pid  # start_new_session: the leader's PID is the group id
            if graceful:
                try:
                    os.killpg(pgid, signal.SIGTERM)
                    self.proc.wait(timeout=15)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
            self.proc = None
        deadline = time.time() + 10
        while processes_under(str(self.store)) and time.time() < deadline:
            time.sleep(0.2)
        kill_pids(processes_under(str(self.store)))


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    """A started MlflowServer (its `.url` is the tracking URI); stopped by PID afterwards."""
    server = MlflowServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- sweep helpers shared by the sweep tests ---------------------------------------------------


def tiny_spec(name: str, pretrain_cache: Path, seeds: list[int] | None = None, iterations: int = 20) -> dict:
    """A sweep of tiny SCT runs on digits (seconds per trial); the phase one is shared through the cache."""
    search: dict[str, Any] = (
        {"seed": {"grid": seeds}}
        if seeds
        else {
            "network.model_channels": {"grid": [8, 16]},
            "sct.ref_batch": {"grid": [1, "all"]},
        }
    )
    return {
        "name": name,
        "base": {
            "method": "sct",
            "iterations": iterations,
            "log_every": 5,
            "checkpoint_every": 10,
            "data": {"name": "digits"},
            "network": {"model_channels": 8, "channel_mult": [1], "num_blocks": 1},
            "pretrain": {"iterations": 20, "batch_size": 64},
            "optim": {"batch_size": 64},
            "ema": {"beta": 0.9},
            "eval": {"every": 10, "fid_samples": 200, "batch_size": 200},
        },
        "search": search,
        "resources": {"cpu": 1},
        "pretrain_cache": str(pretrain_cache),
    }


def run_sweep_cli(spec: dict, workdir: Path, env: dict[str, str], trials: int) -> subprocess.CompletedProcess:
    """`sct-sweep run` of `spec` (written to `workdir`) on 2 CPUs; asserts it ran `trials` trials, none failed."""
    path = workdir / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    cmd = [sct_sweep(), "run", str(path), "--num-cpus", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert f"sweep {spec['name']}: {trials} trials, 0 failed" in done.stdout, done.stdout
    return done


@contextmanager
def driver_process(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """`sct-sweep` (or any command) running with its output in `log`; killed on the way out if still alive."""
    with open(log, "wb") as out:
        driver = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield driver
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()


def assert_continued_or_finished_first(run: Any, resumed_at_ms: int) -> None:
    """A trial run interrupted by a driver kill: either it went on from its Ray checkpoint (second attempt,
    from step >= 10), or its worker outlived the driver long enough to finish before the resume began,
    and the resume handed Ray that result (one attempt)."""
    tags = run.data.tags
    if "sct.resumed_from" in tags:
        assert tags["sct.attempts"] == "2" and int(tags["sct.resumed_from"]) >= 10, tags
    else:
        assert tags["sct.attempts"] == "1" and run.info.end_time < resumed_at_ms, tags


def assert_no_duplicate_steps(client: Any, run: Any) -> None:
    """Every metric of `run` has each step at most once."""
    for key in run.data.metrics:
        steps = Counter(m.step for m in client.get_metric_history(run.info.run_id, key))
        dup = {s: n for s, n in steps.items() if n > 1}
        assert not dup, (run.info.run_name, key, dup)


def child_runs(uri: str, sweep: str) -> list:
    """The trial runs (MLflow children) of sweep `sweep` in store `uri`."""
    from sct_sweeps import tracking

    client = tracking.client(uri)
    exp = client.get_experiment_by_name(sweep)
    return [] if exp is None else client.search_runs([exp.experiment_id], "tags.`sct.role` = 'trial'")


def one_error_line(result: Any) -> str:
    """The single `error: ...` line a CliRunner result printed on stderr, with exit code 2."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# -- process trees and sockets (the UI's server and its workers) ----------------------------------


def listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} write them) with a socket listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.rsplit(":", 1)
            if int(p, 16) == port and state == "0A":
                found.append(addr)
    return found


def descendants(pid: int) -> set[int]:
    """Live descendants of `pid` (from /proc's PPid links), zombies left out."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text().splitlines()
            except OSError:
                continue
            if any(ln.startswith("State:") and "zombie" in ln for ln in status):
                continue
            ppid = next(int(ln.split()[1]) for ln in status if ln.startswith("PPid:"))
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            if "zombie" not in next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                                    if ln.startswith("State:")):
                alive.add(pid)
        except (OSError, StopIteration):
            continue
    return alive


def with_env(setting: str) -> list[int]:
    """Live PIDs whose environment holds `setting` (NAME=value), whatever their process title."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if setting.encode() in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids
