"""A real local Ray head (`ray start --head`) and `ray job submit` against it.

Used by the job tests and the job-latency benchmark; also handy for trying a job locally the
way a cluster runs it. The head and the CLI run from this interpreter's environment, so the
job's `python` finds the project's packages. Token auth is switched off for this private,
loopback-only head (`RAY_AUTH_MODE=disabled` for the head and for the submitting CLI alike).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        return subprocess.run([str(self.bin / "ray"), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, check=check)

    def __enter__(self) -> "LocalHead":
        # The job SDK in this process talks to the same unauthenticated head.
        os.environ["RAY_AUTH_MODE"] = "disabled"
        self._ray("start", "--head", f"--port={self.port}", f"--num-cpus={self.num_cpus}",
                  "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                  "--include-dashboard=true", "--disable-usage-stats")
        return self

    def __exit__(self, *exc) -> None:
        self._ray("stop", "--force", check=False)
        if self._saved_auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = self._saved_auth_mode

    def submit(self, entrypoint: list[str], working_dir: str, submission_id: str) -> None:
        """Submit without waiting (`ray job submit --no-wait`)."""
        self._ray("job", "submit", f"--address={self.address}", f"--working-dir={working_dir}",
                  f"--submission-id={submission_id}", "--no-wait", "--", *entrypoint)

    def _client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address)

    def status(self, submission_id: str) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
        return str(self._client().get_job_status(submission_id).value)

    def logs(self, submission_id: str) -> str:
        return self._client().get_job_logs(submission_id)

    def wait(self, submission_id: str, timeout: float = 600, poll: float = 2.0) -> str:
        """Poll until the job ends; returns its final state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.status(submission_id)
            if state in ("SUCCEEDED", "FAILED", "STOPPED"):
                return state
            time.sleep(poll)
        return "TIMEOUT"
