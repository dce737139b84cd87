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


def kill_processes_naming(text: str, grace_s: float = 10.0,
                          signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGKILL)) -> None:
    """SIGTERM, then SIGKILL (or `signals`), every process whose command line contains `text`
    (Linux /proc).

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

    for sig in signals:
        for pid in mine():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while mine() and time.monotonic() < deadline:
            time.sleep(0.2)


def _private_ports() -> list[str]:
    """Free ports for a node's agents: Ray's fixed defaults would collide with another node or
    another Ray on this machine."""
    return [f"--{flag}={free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port")]


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
                  "--node-ip-address=127.0.0.1",
                  "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                  "--include-dashboard=true", "--disable-usage-stats",
                  f"--temp-dir={self.temp_dir}", *_private_ports())
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


class LocalCluster(LocalHead):
    """A head and `nodes - 1` more raylets on this machine that Ray sees as distinct machines.

    Node i (1, 2, ...) joins with its own loopback IP 127.0.0.(i + 1) and its own temp dir:
    each node's log monitor then reads only its own logs (one shared log folder prints every
    worker line twice), and stopping or killing a node finds exactly its processes. As root,
    each extra node starts in a mount namespace of its own with an empty tmpfs over
    `private_dir`: files the driver keeps there are really missing on that node, as on a
    separate machine. `kill_node(i)` SIGKILLs the node's processes at once, a machine lost.

        with LocalCluster(nodes=2, num_cpus=2, node_cpus=1, private_dir=d) as cluster:
            ray.init(address=cluster.gcs_address)
    """

    def __init__(self, nodes: int = 2, num_cpus: int = 2, node_cpus: int = 1,
                 private_dir: str | None = None, env: dict[str, str] | None = None):
        # The head's GCS declares a silent node dead after 3 missed 1-s health checks (Ray's
        # default is 5 of 3 s), so a lost node is noticed in seconds. Ray Train's first restart
        # after a lost node can still count that node's resources and wait for a group of the
        # old size until its start timeout (60 s by default) before it goes smaller: 20 s here.
        quick = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                 "RAY_health_check_failure_threshold": "3",
                 "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}
        super().__init__(num_cpus=num_cpus, env={**quick, **(env or {})})
        self.nodes, self.node_cpus, self.private_dir = nodes, node_cpus, private_dir
        self.node_dirs: dict[int, str] = {}

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @staticmethod
    def node_ip(i: int) -> str:
        return f"127.0.0.{i + 1}"

    @property
    def isolated(self) -> bool:
        """Whether extra nodes get the private tmpfs (needs root for the mount namespace)."""
        return self.private_dir is not None and os.geteuid() == 0

    def __enter__(self) -> "LocalCluster":
        super().__enter__()
        try:
            for i in range(1, self.nodes):
                self.start_node(i)
        except BaseException:
            self.__exit__()
            raise
        return self

    def start_node(self, i: int) -> None:
        """Start (or start again) extra node i and wait until the head counts it alive."""
        temp_dir = self.node_dirs.get(i) or tempfile.mkdtemp(prefix=f"raynode{i}-", dir="/tmp")
        self.node_dirs[i] = temp_dir
        start = [str(self.bin / "ray"), "start", f"--address={self.gcs_address}",
                 f"--node-ip-address={self.node_ip(i)}", f"--num-cpus={self.node_cpus}",
                 "--disable-usage-stats", f"--temp-dir={temp_dir}", *_private_ports()]
        if self.isolated:
            # The mount stays private to this node's processes: `ray start` exits, the raylet
            # and its workers keep the namespace.
            start = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                     'mount -t tmpfs tmpfs "$1" && shift && exec "$@"', "sh",
                     self.private_dir, *start]
        proc = subprocess.run(start, env=self.env, capture_output=True, text=True, timeout=180)
        if proc.returncode:
            raise RuntimeError(f"node {i} did not start ({proc.returncode}): "
                               f"{(proc.stderr or proc.stdout)[-2000:]}")
        self.wait_for_nodes(self.alive_nodes() | {self.node_ip(i)})

    def kill_node(self, i: int) -> None:
        """SIGKILL every process of extra node i at once, a machine lost: the processes naming
        its temp dir (raylet, agents) and all their descendants (the workers, which would
        otherwise train on for a while without their raylet)."""
        parents = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces.
                    parents[int(entry.name)] = int((entry / "stat").read_text()
                                                   .rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
        marker = self.node_dirs[i].encode()
        doomed = set()
        for pid in parents:
            try:
                if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                    doomed.add(pid)
            except OSError:
                continue
        grew = True
        while grew:
            children = {pid for pid, ppid in parents.items() if ppid in doomed} - doomed
            doomed |= children
            grew = bool(children)
        doomed.discard(os.getpid())
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def alive_nodes(self) -> set[str]:
        """IPs of the nodes the head counts alive (from `ray status`-free GCS state)."""
        proc = self._ray("list", "nodes", f"--address={self.gcs_address}", "--format=json",
                         "--filter", "state=ALIVE", check=False, timeout=60)
        if proc.returncode:
            return set()
        try:
            return {n["node_ip"] for n in json.loads(proc.stdout)}
        except (json.JSONDecodeError, KeyError, TypeError):
            return set()

    def wait_for_nodes(self, ips: set[str], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not ips <= self.alive_nodes():
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes {sorted(ips - self.alive_nodes())} did not join")
            time.sleep(1.0)

    def __exit__(self, *exc) -> None:
        for temp_dir in self.node_dirs.values():
            kill_processes_naming(temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)
        super().__exit__(*exc)
