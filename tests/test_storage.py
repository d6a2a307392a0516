"""Storage faults: a read-only or full results directory is refused in one line before anything starts, an
OSError of that kind later is one line too, and the sweep runs once the directory is writable again.

Read-only and full directories are real tmpfs mounts (root only; skipped with the reason otherwise).
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from conftest import child_runs, processes_under, sct_sweep, tiny_spec

from sct_sweeps.errors import StorageError, user_message
from sct_sweeps.stores import check_writable


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `path` with `options` (e.g. "ro", "size=1m"); skips the test where mounting fails."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs (a read-only or full directory) needs root")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_check_writable_names_the_directory_and_the_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check_writable(tmp_path / "not" / "yet")  # a missing directory under a writable parent is fine
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro, pytest.raises(StorageError, match="Read-only file system"):
        check_writable(ro / "sweeps")
    with tmpfs(tmp_path / "small", "size=1m") as small:
        with pytest.raises(StorageError, match=r"only \d+ MB free"):
            check_writable(small)
        monkeypatch.setenv("SCT_MIN_FREE_MB", "0")  # the limit can be lowered
        check_writable(small)


def test_a_disk_error_later_is_one_line() -> None:
    full = OSError(errno.ENOSPC, "No space left on device", "/data/sweeps/x/checkpoint_000003")
    msg = user_message(full)
    assert msg is not None and msg.startswith("/data/sweeps/x/checkpoint_000003: No space left on device")
    assert "\n" not in msg and "resume" in msg
    assert user_message(OSError(errno.ECONNRESET, "reset")) is None  # other OSErrors are not the user's to fix


def _run(spec: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sct_sweep(), "run", str(spec), "--num-cpus", "1", "--no-report"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_read_only_then_full_storage_are_refused_before_anything_starts_and_the_sweep_runs_later(
    tmp_path: Path, cli_env: dict[str, str], ray_tmp: Path, pretrain_cache: Path
) -> None:
    raw = tiny_spec("stored", pretrain_cache, seeds=[0], iterations=10)
    spec = tmp_path / "stored.yaml"
    for options, cause in (("ro,size=1m", "Read-only file system"), ("size=1m", "MB free")):
        with tmpfs(tmp_path / "storage", options) as storage:
            spec.write_text(yaml.safe_dump({**raw, "storage": str(storage)}))
            out = _run(spec, cli_env)
            lines = out.stderr.strip().splitlines()
            assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
            assert str(storage) in lines[0] and cause in lines[0]
            assert not list(storage.iterdir())  # nothing written: no record, the name is not taken
        assert not processes_under(str(ray_tmp))  # Ray never started
        assert not (Path(cli_env["SCT_PROJECT_DIR"]) / "mlruns.db").exists()  # no MLflow store, no run
    # Space is back (the directory is a plain writable one again): the same sweep runs.
    spec.write_text(yaml.safe_dump({**raw, "storage": str(tmp_path / "storage")}))
    out = _run(spec, cli_env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "storage" / "stored" / "sct_sweep.json").is_file()


@pytest.mark.slow
def test_a_disk_that_fills_mid_sweep_is_one_line_and_the_sweep_resumes_once_space_is_back(
    tmp_path: Path, cli_env: dict[str, str], pretrain_cache: Path
) -> None:
    """Results on a 3 MB tmpfs: the trials' checkpoints fill it mid-sweep. It used to end in click's bare
    "Aborted." (Ray's empty error files), and a resume could fail on Ray's cut-off experiment state. Now the
    trials stop short of a full disk: one line naming the directory, exit 2, no run left RUNNING; with the
    tmpfs grown, `resume` finishes every trial."""
    raw = tiny_spec("fills", pretrain_cache, seeds=[0, 1, 2, 3], iterations=60)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    env = {**cli_env, "SCT_MIN_FREE_MB": "1"}  # the start-up check passes; the sweep fills the disk later
    with tmpfs(tmp_path / "storage", "size=3m") as storage:
        raw["storage"] = str(storage)
        spec = tmp_path / "fills.yaml"
        spec.write_text(yaml.safe_dump(raw))
        cmd = [sct_sweep(), "run", str(spec), "--tracking-uri", uri, "--num-cpus", "2", "--no-report"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error: ")]
        assert done.returncode == 2 and len(errors) == 1, done.stdout[-2000:] + done.stderr[-3000:]
        assert errors[0].startswith(f"error: {storage}") and "sct-sweep resume" in errors[0], errors
        assert "Aborted" not in done.stderr
        assert not [r for r in child_runs(uri, "fills") if r.info.status == "RUNNING"]
        subprocess.run(["mount", "-o", "remount,size=64m", str(storage)], check=True)
        again = subprocess.run([sct_sweep(), "resume", "fills", "--storage", str(storage), "--num-cpus", "2",
                                "--no-report"], env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert again.returncode == 0 and "sweep fills: 4 trials, 0 failed" in again.stdout, again.stdout[-3000:]
        assert {r.info.status for r in child_runs(uri, "fills")} == {"FINISHED"}
