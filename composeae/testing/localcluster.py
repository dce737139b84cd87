"""A real local Ray head (`ray start --head`) and `ray job submit` against it.

Used by the job tests and the job-latency benchmark; also handy for trying a job locally the
way a cluster runs it. Stopping it stops only its own processes (Linux: found through /proc).
The head and the CLI run from this interpreter's environment, so the job's `python` finds the
project's packages. Token auth is switched off for this private, loopback-only head
(`RAY_AUTH_MODE=disabled` for the head and for the submitting CLI alike).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_processes_naming(text: str, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, every process whose command line contains `text` (Linux /proc).

    A Ray instance's processes (GCS, raylet, dashboard, monitors) all name its temp dir, so this
    stops one Ray and leaves any other on the machine alone; its workers exit with the raylet.
    """
    def mine() -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and entry.name != str(os.getpid()):
                try:
                    if text.encode() in (entry / "cmdline").read_bytes():
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return pids

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in mine():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while mine() and time.monotonic() < deadline:
            time.sleep(0.2)


class LocalHead:
    """`with LocalHead(num_cpus=2) as head: head.submit(...)`; stops the head on exit."""

    def __init__(self, num_cpus: int = 2, env: dict[str, str] | None = None):
        self.num_cpus = num_cpus
        self.port, self.dashboard_port = free_port(), free_port()
        self.bin = Path(sys.executable).parent
        self.env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "disabled"}
        self._saved_auth_mode = os.environ.get("RAY_AUTH_MODE")
        self.env.pop("RAY_ADDRESS", None)
        # Jobs run `python` from PATH: make it this environment's interpreter.
        self.env["PATH"] = f"{self.bin}{os.pathsep}{self.env.get('PATH', '')}"
        self.address = f"http://127.0.0.1:{self.dashboard_port}"

    def _ray(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(self.bin / "ray"), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode:
            raise RuntimeError(f"`ray {' '.join(args[:2])}` failed ({proc.returncode}): "
                               f"{(proc.stderr or proc.stdout)[-2000:]}")
        return proc

    def __enter__(self) -> "LocalHead":
        # The job SDK in this process talks to the same unauthenticated head.
        os.environ["RAY_AUTH_MODE"] = "disabled"
        # A temp dir of its own (short: it holds unix sockets) marks this head's processes, so
        # stopping it leaves any other Ray on the machine alone (`ray stop` would kill them all).
        self.temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")
        self._ray("start", "--head", f"--port={self.port}", f"--num-cpus={self.num_cpus}",
                  "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                  "--include-dashboard=true", "--disable-usage-stats",
                  f"--temp-dir={self.temp_dir}",
                  # Fixed default ports would collide with another Ray on this machine.
                  *(f"--{flag}={free_port()}" for flag in (
                      "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                      "metrics-export-port", "runtime-env-agent-port",
                      "ray-client-server-port")))
        return self

    def __exit__(self, *exc) -> None:
        kill_processes_naming(self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if self._saved_auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = self._saved_auth_mode

    def submit(self, entrypoint: list[str], working_dir: str, submission_id: str,
               agent_timeout_s: float = 60.0,
               runtime_env: str | os.PathLike[str] | None = None) -> None:
        """Submit without waiting (`ray job submit --no-wait`), with `--runtime-env FILE` when
        `runtime_env` is given (e.g. cluster/runtime_env.yaml, as a user submits). Right after
        `ray start` the head's job agent may not be up yet ("No available agent"): that answer is
        retried."""
        options = [f"--runtime-env={os.fspath(runtime_env)}"] if runtime_env is not None else []
        deadline = time.monotonic() + agent_timeout_s
        while True:
            try:
                self._ray("job", "submit", f"--address={self.address}", *options,
                          f"--working-dir={working_dir}", f"--submission-id={submission_id}",
                          "--no-wait", "--", *entrypoint)
                return
            except RuntimeError as exc:
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def _client(self):
        from ray.job_submission import JobSubmissionClient  # deferred: Ray is slow to import

        return JobSubmissionClient(self.address)

    def status(self, submission_id: str) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
        return str(self._client().get_job_status(submission_id).value)

    def logs(self, submission_id: str) -> str:
        return self._client().get_job_logs(submission_id)

    def job_info(self, submission_id: str):
        """The job's `JobDetails` (entrypoint, runtime_env as Ray stored it, status, ...)."""
        return self._client().get_job_info(submission_id)

    def get_json(self, path: str, timeout: float = 30.0):
        """GET `path` of the head's dashboard HTTP API (e.g. /api/train/v2/runs/v1) as JSON."""
        with urllib.request.urlopen(f"{self.address}{path}", timeout=timeout) as response:
            return json.loads(response.read().decode())

    def wait(self, submission_id: str, timeout: float = 600, poll: float = 2.0) -> str:
        """Poll until the job ends; returns its final state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.status(submission_id)
            if state in ("SUCCEEDED", "FAILED", "STOPPED"):
                return state
            time.sleep(poll)
        return "TIMEOUT"
