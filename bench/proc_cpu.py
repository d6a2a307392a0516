"""CPU seconds of the processes a benchmark starts (Ray's daemons and workers), read from /proc.

Scripts in bench/ import this as `proc_cpu` (they run as `python bench/<script>.py`). Linux only.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import threading
import time
from pathlib import Path
from typing import Any

WORKER = "ray::worker"  # the name every Ray worker process is filed under
_SETTLE_S = 10.0  # a process's command line is read again for this long after it is first seen


@dataclasses.dataclass(frozen=True)
class Usage:
    """CPU seconds in user and kernel mode and minor page faults of a process (or a sum of them)."""

    user: float
    system: float
    minflt: int

    @property
    def cpu(self) -> float:
        return self.user + self.system

    @staticmethod
    def since(before: resource.struct_rusage) -> Usage:
        """This process's usage since the `getrusage` snapshot `before`."""
        now = resource.getrusage(resource.RUSAGE_SELF)
        return Usage(now.ru_utime - before.ru_utime, now.ru_stime - before.ru_stime, now.ru_minflt - before.ru_minflt)

    @staticmethod
    def total(parts: list[Usage]) -> Usage:
        return Usage(sum(u.user for u in parts), sum(u.system for u in parts), sum(u.minflt for u in parts))


def role(cmdline: str) -> str:
    """A short name for a Ray process from its command line: `ray::worker`, `raylet`, `gcs_server`,
    or the Python script it runs (`dashboard.py`, `agent.py`, `log_monitor.py`, `monitor.py`, ...)."""
    words = cmdline.split()
    if not words:
        return "?"
    exe = words[0].rsplit("/", 1)[-1]
    if exe == "raylet":  # its arguments name default_worker.py too
        return exe
    if ("default_worker.py" in cmdline) or (cmdline.startswith("ray::") and "Agent" not in cmdline):
        return WORKER
    if "python" in exe:
        return next((w.rsplit("/", 1)[-1] for w in words[1:] if w.endswith(".py")), exe)
    return exe


class CpuMonitor(threading.Thread):
    """CPU seconds (and system-time share, minor page faults) of every process descended from this one
    (Ray's GCS, raylet, workers, ...), read from /proc every `every` seconds while running.
    The last < `every` s of a process that exits are missed. `own_cpu` is what the sampling cost
    this process (its thread's CPU time), so a caller can leave it out of the driver's CPU."""

    def __init__(self, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.every, self.root, self.tick = every, os.getpid(), os.sysconf("SC_CLK_TCK")
        self.usage: dict[tuple[int, int], Usage] = {}  # (pid, start time) -> as seen last
        self.names: dict[tuple[int, int], str] = {}  # (pid, start time) -> role()
        self.own_cpu = 0.0
        self._seen: dict[tuple[int, int], float] = {}  # (pid, start time) -> when first seen
        self._lock = threading.Lock()
        self._done = threading.Event()

    def snapshot(self) -> None:
        procs = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    f = (d / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                usage = Usage(int(f[11]) / self.tick, int(f[12]) / self.tick, int(f[7]))  # utime, stime, minflt
                procs[int(d.name)] = (int(f[1]), usage, int(f[19]))  # ppid, usage, start time
        for pid, (ppid, _, _) in procs.items():
            p, depth = ppid, 0
            while p not in (self.root, 0, 1) and p in procs and depth < 20:
                p, depth = procs[p][0], depth + 1
            if p != self.root or pid == self.root:
                continue
            key = (pid, procs[pid][2])
            with self._lock:
                self.usage[key] = procs[pid][1]
            first = self._seen.setdefault(key, time.monotonic())
            if key in self.names and time.monotonic() - first > _SETTLE_S:
                continue  # named for good: a new process may still exec or rename itself (`ray::...`)
            try:
                cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            name = role(cmd)
            if name != "?" or key not in self.names:  # an empty command line (mid-exec, mid-rename) says nothing
                self.names[key] = name

    def by_role(self) -> dict[str, float]:
        """CPU seconds so far, summed per role()."""
        with self._lock:
            items = list(self.usage.items())
        out: dict[str, float] = {}
        for key, u in items:
            name = self.names.get(key, "?")
            out[name] = out.get(name, 0.0) + u.cpu
        return out

    def switches(self) -> dict[str, tuple[int, int]]:
        """Context switches so far, (voluntary, involuntary) summed over every thread, per role() of the
        live descendants, and "driver" for this process. A voluntary switch ends each wake-up of a
        thread that then sleeps again; an involuntary one is a thread preempted by another."""
        with self._lock:
            keys = list(self.usage)
        pids = [(k[0], self.names.get(k, "?")) for k in keys] + [(self.root, "driver")]
        out: dict[str, tuple[int, int]] = {}
        for pid, name in pids:
            vol = inv = 0
            try:
                for task in (Path("/proc") / str(pid) / "task").iterdir():
                    fields = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines())
                    vol += int(fields["voluntary_ctxt_switches"])
                    inv += int(fields["nonvoluntary_ctxt_switches"])
            except (OSError, KeyError, ValueError):
                continue  # exited meanwhile
            v0, i0 = out.get(name, (0, 0))
            out[name] = (v0 + vol, i0 + inv)
        return out

    def run(self) -> None:
        c0 = time.thread_time()
        while not self._done.wait(self.every):
            self.snapshot()
            self.own_cpu = time.thread_time() - c0

    def stop(self) -> dict[str, Any]:
        """Stop; CPU seconds of trial workers (`ray::...`) and of the other (Ray system) processes, and
        the workers' summed usage."""
        self._done.set()
        self.join()
        work = [u for k, u in self.usage.items() if self.names.get(k) == WORKER]
        total = sum(u.cpu for u in self.usage.values())
        workers = Usage.total(work)
        return {"workers": workers.cpu, "ray_system": total - workers.cpu, "workers_usage": workers}
