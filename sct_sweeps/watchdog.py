"""An embedded Ray goes with its driver, even a SIGKILLed one.

When the driver (`sct-sweep run` or `resume` without --address) is SIGKILLed, Ray's raylet and GCS die
with it, but the dashboard agent and the runtime-env agent first try to tell the dead GCS that the raylet
died "unexpectedly", and that call waits 60 s (a constant in Ray) before they exit. So the driver marks
every process of its Ray with an environment variable (`MARKER`, inherited by all of them) and starts
this small watchdog in a session of its own. The watchdog waits for the driver to die, then SIGKILLs
every process still carrying the mark. It also ends once it has seen the marked processes come and go
(a normal `ray.shutdown`).

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


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def guard(driver_pid: int, mark: str) -> None:
    """Until the driver dies (then SIGKILL everything marked) or its marked processes have all gone."""
    seen, started = False, time.monotonic()
    while _alive(driver_pid):
        left = marked(mark)
        if seen and not left:
            return  # the driver shut its Ray down
        if not seen and time.monotonic() - started > NEVER_STARTED_S:
            return  # its Ray never started
        seen = seen or bool(left)
        time.sleep(POLL_S)
    deadline = time.monotonic() + 10
    while (left := marked(mark)) and time.monotonic() < deadline:
        for pid in left:
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
