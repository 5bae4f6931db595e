"""A rig node: a network namespace of a NetnsLab plus its own PID and mount namespaces.

The daemon runs there as PID 1's child, sees only its node's processes (the process checker
counts the node's own), and has its own copies of the node's private directories
bind-mounted at the paths a real server has them (the replicated directory first), so both
nodes see the replicated directory at the same path, as on two servers. Killing the
namespace's init kills every process of the node at once, like a power cut, and the kernel
then drops the node's mounts with its mount namespace.

The init's host PID is kept in `ROOT/init.pid`, so a later process (tools/rig exec, kill)
finds the node again: everything about a node can be read back from its root.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tools.riglib.netns import Node

SUBNET = "10.77.0"
ADDRS = {"node1": f"{SUBNET}.1", "node2": f"{SUBNET}.2", "witness": f"{SUBNET}.3"}
CLIENT_ADDR = f"{SUBNET}.10"
VIP = f"{SUBNET}.100"
HAFS = [sys.executable, "-m", "controller.cli"]
REPO = Path(__file__).resolve().parents[2]
INIT_PIDFILE = "init.pid"
DAEMON_READY_TIMEOUT = 30.0

# The node's PID 1, as init on a real server: starts the daemon, passes SIGTERM on (and
# exits once the daemon has stopped), reaps every orphan (an application that start_prim
# left in the background ends up its child), and on SIGUSR1 starts the daemon again after
# it died (what systemd's Restart= does).
NODE_INIT = """
import os, signal, subprocess, sys
argv = sys.argv[1:]
state = {"daemon": subprocess.Popen(argv), "stopping": False, "restart": False}
def start():
    state["restart"] = False
    state["daemon"] = subprocess.Popen(argv)
def term(*_):
    state["stopping"] = True
    state["daemon"].send_signal(signal.SIGTERM)
def restart(*_):
    # A SIGKILLed daemon may still be exiting (not yet a zombie): then the loop below
    # starts it again once it has reaped it.
    state["restart"] = True
    if state["daemon"].poll() is not None:
        start()
signal.signal(signal.SIGTERM, term)
signal.signal(signal.SIGUSR1, restart)
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        signal.pause()
        continue
    if pid == state["daemon"].pid and state["stopping"]:
        sys.exit(os.waitstatus_to_exitcode(status))
    if pid == state["daemon"].pid and state["restart"]:
        start()
"""


class RigError(AssertionError):
    """The rig did not reach the state a test (or tools/rig) waited for."""


def cluster_xml() -> str:
    nodes = "".join(f'<node name="{n}" addr="{ADDRS[n]}"/>' for n in ("node1", "node2"))
    return f'<cluster><lans><lan name="default">{nodes}</lan></lans></cluster>\n'


def prepare_root(root: Path, key: bytes) -> None:
    """A node's hafs root with the rig's cluster.xml and the cluster key."""
    (root / "etc/hafs").mkdir(parents=True, exist_ok=True)
    (root / "etc/hafs/cluster.xml").write_text(cluster_xml())
    (root / "etc/hafs/cluster.key").write_bytes(key)
    (root / "etc/hafs/cluster.key").chmod(0o600)


def is_node_init(proc: psutil.Process) -> bool:
    """Whether `proc` runs NODE_INIT (a recorded PID may have been reused since)."""
    with contextlib.suppress(psutil.Error):
        return proc.status() != psutil.STATUS_ZOMBIE and proc.cmdline()[1:3] == ["-c", NODE_INIT]
    return False


def recorded_init(root: Path) -> int | None:
    """The host PID of the node init recorded in `root`, if it still runs."""
    try:
        pid = int((root / INIT_PIDFILE).read_text())
    except (OSError, ValueError):
        return None
    with contextlib.suppress(psutil.Error):
        if is_node_init(psutil.Process(pid)):
            return pid
    return None


def kill_init(root: Path) -> None:
    """SIGKILL the node init recorded in `root` and wait until it is gone: the kernel kills
    the rest of its PID namespace with it (power loss). Forgets the pid file."""
    pid = recorded_init(root)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).wait(10)
    (root / INIT_PIDFILE).unlink(missing_ok=True)


@dataclass
class RigNode:
    """One node: its namespace, its root, its copy of the data, its daemon."""

    name: str
    net: Node
    root: Path
    data: Path  # this node's copy, bind-mounted at the shared path inside the node
    shared: Path  # the replicated directory, as configured
    daemon: subprocess.Popen[bytes] | None = None
    module: str = "test"
    # More (source, target) bind mounts inside the node: directories a real server has to
    # itself that the application writes (MariaDB's /run/mysqld).
    private: tuple[tuple[Path, Path], ...] = ()
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.root / "daemon.out"

    # ------------------------------------------------------------------ the daemon

    def boot(self) -> None:
        """Start the node's daemon in fresh PID and mount namespaces."""
        if self.init_pid() is not None:
            raise RigError(f"{self.name}: already running")
        daemon = [*HAFS, "daemon", "--node", self.name]
        binds = " && ".join(
            f"mount --bind {shlex.quote(str(src))} {shlex.quote(str(dst))}"
            for src, dst in ((self.data, self.shared), *self.private)
        )
        inner = f"{binds} && exec {shlex.join([sys.executable, '-c', NODE_INIT, *daemon])}"
        argv = ["unshare", "--pid", "--fork", "--mount", "--propagation", "private"]
        argv += ["--mount-proc", "sh", "-c", inner]
        with self.log.open("ab") as out:
            self.daemon = self.net.popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self._env(), cwd=REPO,
            )  # fmt: skip
        self.wait_for(self._record_init, f"{self.name}: init started", 10)
        self.wait_for(self.control_ready, f"{self.name}: daemon up", DAEMON_READY_TIMEOUT)

    def _env(self) -> dict[str, str]:
        return {**os.environ, "HAFS_ROOT": str(self.root), "PYTHONPATH": str(REPO)}

    def _record_init(self) -> bool:
        """Find the init under the launcher (ip netns exec -> unshare -> init) and record it."""
        if self.daemon is None:
            return False
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.daemon.pid).children(recursive=True):
                if is_node_init(child):
                    (self.root / INIT_PIDFILE).write_text(f"{child.pid}\n")
                    return True
        return False

    def init_pid(self) -> int | None:
        """PID (host view) of the node's PID 1 (NODE_INIT, the daemon's parent)."""
        if self.daemon is not None and self.daemon.poll() is not None:
            return None
        return recorded_init(self.root)

    def daemon_pid(self) -> int | None:
        """PID (host view) of the daemon itself, the init's child running controller.cli."""
        init = self.init_pid()
        if init is None:
            return None
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(init).children():
                with contextlib.suppress(psutil.Error):  # a zombie not reaped yet: gone
                    if "daemon" in child.cmdline():
                        return child.pid
        return None

    def crash_daemon(self) -> None:
        """SIGKILL the daemon alone: the application and the data processes live on."""
        pid = self.daemon_pid()
        if pid is None:
            raise RigError(f"{self.name}: no daemon to crash")
        os.kill(pid, signal.SIGKILL)
        self.wait_for(lambda: self.daemon_pid() is None, f"{self.name} daemon gone", 10)

    def restart_daemon(self) -> None:
        """Start the daemon again in the same node, as systemd's Restart= would."""
        pid = self.init_pid()
        if pid is None:
            raise RigError(f"{self.name}: not running")
        os.kill(pid, signal.SIGUSR1)
        self.wait_for(self.control_ready, f"{self.name}: daemon back", 30)

    def control_ready(self) -> bool:
        return self.hafs("state", "--json", check=False).returncode == 0

    def kill(self) -> None:
        """Power cut: SIGKILL the node's init, which takes every process of the node."""
        if self.daemon is None or self.daemon.poll() is None:
            kill_init(self.root)
        if self.daemon is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.daemon.wait(10)
        self.daemon = None

    def shutdown(self, timeout: float = 60) -> None:
        """Stop the daemon as systemd would (SIGTERM), then make sure the node is empty."""
        pid = self.init_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(psutil.NoSuchProcess, psutil.TimeoutExpired):
                psutil.Process(pid).wait(timeout)
        self.kill()

    # ------------------------------------------------------------------ commands

    def hafs(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run `hafs ARGS` inside the node (its network namespace and root)."""
        proc = subprocess.run(
            ["ip", "netns", "exec", self.net.netns, *HAFS, *args],
            capture_output=True, text=True, timeout=timeout, env=self._env(), cwd=REPO,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise RigError(f"{self.name}: hafs {' '.join(args)} exited {proc.returncode}:\n"
                           f"{proc.stdout}{proc.stderr}")  # fmt: skip
        return proc

    def enter_argv(self, cmd: list[str]) -> list[str]:
        """`cmd` run inside the node's mount, PID and network namespaces (as its scripts)."""
        pid = self.init_pid()
        if pid is None:
            raise RigError(f"{self.name}: not running")
        # --wd: here, in the node's view (nsenter -m alone moves to the target's directory).
        return ["nsenter", "-t", str(pid), "-m", "-p", "-n", f"--wd={os.getcwd()}", *cmd]

    def inside(
        self, cmd: list[str], check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` inside the node's namespaces and wait; output captured as text."""
        argv = self.enter_argv(cmd)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RigError(f"{self.name}: {cmd} exited {proc.returncode}: {proc.stderr}")
        return proc

    def state(self) -> dict[str, Any]:
        reply = json.loads(self.hafs("state", "-m", self.module, "--json").stdout)
        return dict(reply[0])

    def wait_state(
        self, state: str, timeout: float = 30, colour: str | None = None
    ) -> dict[str, Any]:
        snap: dict[str, Any] = {}

        def reached() -> bool:
            nonlocal snap
            snap = self.state()
            return snap["state"] == state and colour in (None, snap["colour"])

        self.wait_for(reached, f"{self.name} {state} {colour or ''}", timeout, lambda: snap)
        return snap

    def wait_for(self, ok: Callable[[], bool], what: str, timeout: float,
                 detail: Callable[[], object] = lambda: "") -> None:  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():
                return
            if self.daemon is not None and self.daemon.poll() is not None:
                raise RigError(f"{what}: daemon died\n{self.tail()}")
            time.sleep(0.2)
        raise RigError(f"{what}: not reached in {timeout:g} s: {detail()}\n{self.tail()}")

    def module_log(self) -> str:
        path = self.root / f"var/log/hafs/{self.module}/module.log"
        return path.read_text() if path.exists() else ""

    def calls(self) -> list[str]:
        """The script calls the test module's scripts recorded, in order."""
        path = self.root / "var/lib/hafs/var/calls.log"
        return path.read_text().splitlines() if path.exists() else []

    def tail(self, lines: int = 30) -> str:
        """The end of the node's logs, for a failure message."""
        parts = [f"--- {self.name} module log", *self.module_log().splitlines()[-lines:]]
        logs = [self.log, *sorted((self.root / f"var/log/hafs/{self.module}").glob("*.log"))]
        for path in logs:
            if path.exists() and path.name != "module.log":
                parts += [
                    f"--- {path.name}",
                    *path.read_text(errors="replace").splitlines()[-lines:],
                ]
        return "\n".join(parts)
