"""A server run in the foreground of a command (`sct-sweep ui`): its whole process tree stops with it.

The server starts in a session of its own, and SIGINT, SIGTERM or SIGHUP to the command stops that
session's process group: the server and every worker it spawned (MLflow's server starts several; a
SIGTERM to the server alone used to leave them running).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from types import FrameType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group led by `proc`, then SIGKILL what is left after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)  # anyone of the group still alive?
            except ProcessLookupError:
                proc.wait()
                return
            proc.poll()  # reap the leader, so only the rest of the group keeps the check alive
            time.sleep(0.1)


def serve(cmd: Sequence[str]) -> int:
    """Run `cmd` until it exits or this process is told to stop; its exit code (128 + signal if stopped)."""
    proc = subprocess.Popen(list(cmd), start_new_session=True)
    stopped: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopped.append(signum)
        stop_group(proc)

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        code = proc.wait()
        if not stopped:
            stop_group(proc)  # the server ended by itself: its workers go with it
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + stopped[0] if stopped else code
