"""An embedded Ray goes with its driver, even a SIGKILLed one.

When the driver (`sct-sweep run` or `resume` without --address) is SIGKILLed, Ray's raylet and GCS die
with it, but the dashboard agent and the runtime-env agent first try to tell the dead GCS that the raylet
died "unexpectedly", and that call waits 60 s (a constant in Ray) before they exit. So the driver marks
the processes of its Ray with an environment variable (`MARKER`, inherited by the raylet, the GCS and the
workers) and starts this small watchdog in a session of its own. The raylet starts its agents with an
environment of its own, without the mark, so the watchdog also keeps a list of the marked processes'
descendants while the driver lives. Once the driver is dead it SIGKILLs them all. It also ends once it
has seen the marked processes come and go (a normal `ray.shutdown`).

    python -m sct_sweeps.watchdog DRIVER_PID MARK
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

MARKER = "SCT_EMBEDDED_RAY"  # NAME=<mark>: set in the environment of every process of one embedded Ray
POLL_S = 0.5
NEVER_STARTED_S = 600.0  # a watchdog whose Ray never started goes too


def marked(mark: str) -> list[int]:
    """PIDs of live processes whose environment holds MARKER=`mark`."""
    needle = f"{MARKER}={mark}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a live process, None if it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else (int(fields[1]), fields[19])


def family(roots: list[int]) -> dict[int, str]:
    """`roots` and all their live descendants: pid -> start time (a pid reused later is not theirs)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            children.setdefault(st[0], []).append(int(entry.name))
            starts[int(entry.name)] = st[1]
    out, todo = {}, [p for p in roots if p in starts]
    while todo:
        pid = todo.pop()
        if pid not in out:
            out[pid] = starts[pid]
            todo.extend(children.get(pid, []))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def guard(driver_pid: int, mark: str) -> None:
    """Until the driver dies (then SIGKILL everything marked) or its marked processes have all gone."""
    seen, started = False, time.monotonic()
    members: dict[int, str] = {}  # every process of this Ray seen so far: pid -> start time
    while _alive(driver_pid):
        left = marked(mark)
        if seen and not left:
            return  # the driver shut its Ray down
        if not seen and time.monotonic() - started > NEVER_STARTED_S:
            return  # its Ray never started
        seen = seen or bool(left)
        members.update(family(left))
        time.sleep(POLL_S)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        doomed = [p for p, start in members.items() if (st := _stat(p)) is not None and st[1] == start]
        doomed += [p for p in marked(mark) if p not in members]
        if not doomed:
            return
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def start() -> str:
    """Mark the processes this driver is about to start (its embedded Ray) and start their watchdog; the mark."""
    mark = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    os.environ[MARKER] = mark
    if sys.platform.startswith("linux"):  # reads /proc
        env = {"PATH": os.environ.get("PATH", "")}  # nothing of the sweep's: tests find leftovers by their env
        subprocess.Popen([sys.executable, "-m", "sct_sweeps.watchdog", str(os.getpid()), mark], env=env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True)  # fmt: skip
    return mark


if __name__ == "__main__":
    guard(int(sys.argv[1]), sys.argv[2])
