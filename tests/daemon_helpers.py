"""Real Dagster processes for end-to-end tests: a daemon, a code server, `dagster job launch`, and waiting on them.

Each process runs in its own session (process group), so stopping it also stops what it started (run workers).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent


def wait_for(what: str, predicate, timeout: float, log: Path | list[Path], interval: float = 0.25):
    """Poll ``predicate`` until it returns something truthy; on timeout fail with the tail of each log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    tails = "".join(f"\n--- {p.name} (tail) ---\n{p.read_text(errors='replace')[-6000:]}"
                    for p in ([log] if isinstance(log, Path) else log) if p.exists())
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{tails}")


def kill_group(*procs: subprocess.Popen) -> None:
    """Stop processes started by :func:`start` (all at once) and everything they started: their process groups."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers in the group (a run worker nobody waits on)
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.wait(timeout=10)


def start(args: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def start_daemon(workspace: Path, env: dict, log: Path) -> subprocess.Popen:
    return start([str(BIN / "dagster-daemon"), "run", "-w", str(workspace)], workspace.parent, env, log)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_code_server(python_file: Path, env: dict, log: Path, location: str, timeout: float = 120):
    """A `dagster api grpc` code server for ``python_file`` and a workspace.yaml beside it that points at it.

    One server loads the code once for the daemon and every `dagster job launch`, and launches the run workers
    (the DefaultRunLauncher asks the code server), so it is the process that notices a worker die.
    Returns (process, workspace path).
    """
    port = free_port()
    proc = start([str(BIN / "dagster"), "api", "grpc", "--python-file", str(python_file), "--working-directory",
                  str(python_file.parent), "--host", "127.0.0.1", "--port", str(port), "--location-name", location],
                 python_file.parent, env, log)
    try:
        wait_for("the code server to load", lambda: proc.poll() is not None or
                 "Started Dagster code server" in log.read_text(errors="replace"), timeout, log)
        assert proc.poll() is None, f"the code server exited:\n{log.read_text(errors='replace')[-6000:]}"
    except BaseException:
        kill_group(proc)
        raise
    workspace = python_file.parent / "workspace.yaml"
    workspace.write_text(yaml.safe_dump({"load_from": [{"grpc_server": {
        "host": "127.0.0.1", "port": port, "location_name": location}}]}))
    return proc, workspace


def launch(workspace: Path, env: dict, job: str, run_id: str, tags: dict | None = None) -> subprocess.Popen:
    """`dagster job launch`: submits the run through the instance's run coordinator (queued; the daemon launches
    it). Returns the process; pass it to :func:`launched` (several can be submitted at once)."""
    args = [str(BIN / "dagster"), "job", "launch", "-w", str(workspace), "-j", job, "--run-id", run_id]
    if tags:
        args += ["--tags", json.dumps(tags)]
    return subprocess.Popen(args, cwd=workspace.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def launched(*procs: subprocess.Popen) -> None:
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"dagster job launch failed ({' '.join(proc.args)}):\n{out}"


def daemon_home(tmp_path: Path, config: dict, code: str, location: str = "defs") -> tuple[Path, dict]:
    """A DAGSTER_HOME under ``tmp_path`` with ``config`` as its dagster.yaml, ``code`` as the code location
    ``<location>.py`` and a workspace.yaml that loads it. Returns (workspace path, environment for the processes)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (tmp_path / f"{location}.py").write_text(code)
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(yaml.safe_dump(
        {"load_from": [{"python_file": {"relative_path": f"{location}.py", "location_name": location,
                                         "working_directory": str(tmp_path)}}]}))
    return workspace, {**os.environ, "DAGSTER_HOME": str(home)}
