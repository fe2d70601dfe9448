"""A real multi-node Ray cluster on one machine: `ray start` processes, a head and worker nodes.

Each node is one `ray start --block` process (its own process group) with its own temp folder,
so the cluster neither finds nor is found by any other Ray running on the machine (no shared
``ray_current_cluster`` file, every port chosen free). A worker node can be killed the way a
machine dies (SIGKILL to its raylet, its workers and its agents), and can be started in its own
mount namespace with a folder hidden behind an empty tmpfs: the same path that the driver sees
holds other files there, which is how a node without the shared folder looks.

Used by tests/test_cluster.py and benchmarks/cluster_scaling.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc (Linux)."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process under it."""
    tree, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, []))
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_all(pids: list[int], sig: int = signal.SIGKILL, timeout: float = 10) -> list[int]:
    """Send ``sig`` to each pid; the pids still alive after ``timeout`` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    deadline = time.time() + timeout
    alive = pids
    while alive and time.time() < deadline:
        alive = [p for p in alive if _alive(p)]
        time.sleep(0.1)
    return alive


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def namespace_prefix() -> list[str] | None:
    """The command prefix that runs a process in a private mount namespace, or None if neither
    root nor an unprivileged user namespace allows it here."""
    if shutil.which("unshare") is None:
        return None
    with tempfile.TemporaryDirectory() as folder:
        for prefix in (
            ["unshare", "--mount", "--propagation", "private"],
            ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"],
        ):
            # The mount lives and dies with the probe's own namespace.
            probe = subprocess.run(
                [*prefix, "mount", "-t", "tmpfs", "tmpfs", folder], capture_output=True
            )
            if probe.returncode == 0:
                return prefix
    return None


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    log: Path
    node_id: str = ""
    killed: bool = False

    def processes(self) -> list[int]:
        """The `ray start` process and every process under it (raylet, workers, agents)."""
        return process_tree(self.proc.pid) if _alive(self.proc.pid) else []


class LocalCluster:
    """A head node (no CPU by default) and worker nodes, all on this machine.

    Use as a context manager; ``shutdown`` stops every node this object started, and only those.
    """

    def __init__(self, head_cpus: int = 0, env: dict[str, str] | None = None) -> None:
        # Short: Ray's socket paths under it must stay below the 107-character limit.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
        self.port = free_port()
        self.env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            # Every node and driver alike: without it, a node started where ~/.ray/auth_token
            # exists turns token authentication on and the others are refused.
            "RAY_AUTH_MODE": "disabled",
            # A killed node is declared dead in about 3 s instead of about 15 s.
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
            **(env or {}),
        }
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: list[Node] = []
        head_only = [
            "--head",
            f"--port={self.port}",
            "--include-dashboard=false",
            f"--ray-client-server-port={free_port()}",
        ]
        self.head = self._start("head", head_only, head_cpus)

    @property
    def address(self) -> str:
        return f"{self._ip}:{self.port}"

    def add_worker(self, num_cpus: int = 1, hide: list[Path] | None = None) -> Node:
        """A worker node; each folder in ``hide`` is an empty tmpfs in that node's processes."""
        return self._start(f"w{len(self.nodes)}", [f"--address={self.address}"], num_cpus, hide)

    def _start(
        self, name: str, role: list[str], num_cpus: int, hide: list[Path] | None = None
    ) -> Node:
        args = [
            RAY,
            "start",
            "--block",
            *role,
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--node-name={name}",
            # One folder per node, as on separate machines (one log monitor per log folder).
            f"--temp-dir={self.temp_dir / name}",
            "--disable-usage-stats",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--object-store-memory=100000000",
        ]
        if hide:
            prefix = namespace_prefix()
            if prefix is None:
                raise RuntimeError("no private mount namespace here (need root or user namespaces)")
            mounts = " && ".join(f"mount -t tmpfs tmpfs {str(p)!r}" for p in hide)
            args = [*prefix, "sh", "-c", f'{mounts} && exec "$@"', "sh", *args]
        log = self.temp_dir / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        node = Node(name, proc, log)
        self.nodes.append(node)
        try:
            node.node_id = self._wait_for_raylet(node)
        except Exception:
            self.shutdown()
            raise
        if name == "head":
            self._ip = self._raylet_arg(node, "--node_ip_address")
        else:
            self.wait_for_nodes()
        return node

    def _raylet(self, node: Node) -> int | None:
        for pid in node.processes():
            args = cmdline(pid)
            if args and args[0].endswith("/raylet"):
                return pid
        return None

    def _raylet_arg(self, node: Node, flag: str) -> str:
        raylet = self._raylet(node)
        assert raylet is not None
        for arg in cmdline(raylet):
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
        raise RuntimeError(f"{node.name}: raylet has no {flag}")

    def _wait_for_raylet(self, node: Node, timeout: float = 60) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if node.proc.poll() is not None:
                raise RuntimeError(
                    f"{node.name}: ray start exited:\n{node.log.read_text()[-3000:]}"
                )
            if self._raylet(node) is not None:
                return self._raylet_arg(node, "--node_id")
            time.sleep(0.2)
        raise TimeoutError(
            f"{node.name}: no raylet after {timeout} s:\n{node.log.read_text()[-3000:]}"
        )

    def alive_node_ids(self) -> set[str]:
        """Node ids the GCS reports alive."""
        from ray._raylet import GcsClient

        infos = GcsClient(address=self.address).get_all_node_info(timeout=10)
        return {nid.hex() for nid, info in infos.items() if info.state == 0}  # 0: ALIVE

    def wait_for_nodes(self, timeout: float = 60) -> None:
        want = {n.node_id for n in self.nodes if not n.killed}
        deadline = time.time() + timeout
        while time.time() < deadline:
            if want <= self.alive_node_ids():
                return
            time.sleep(0.3)
        raise TimeoutError(f"nodes {want} not all alive after {timeout} s")

    def kill(self, node: Node) -> None:
        """The node dies at once, as a machine would: SIGKILL to all of its processes."""
        kill_all(node.processes())
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(node.proc.pid, signal.SIGKILL)
        node.proc.wait(timeout=10)
        node.killed = True

    def shutdown(self) -> None:
        """Stop the workers, then the head: SIGTERM (ray start cleans up), then SIGKILL."""
        for node in sorted(self.nodes, key=lambda n: n.name == "head"):
            if node.killed:
                continue
            procs = node.processes()
            kill_all(procs[:1], signal.SIGTERM, timeout=15)
            kill_all([p for p in procs if _alive(p)])
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(node.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=10)
            node.killed = True
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
