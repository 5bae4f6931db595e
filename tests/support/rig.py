"""Two real hafs daemons in network namespaces, for the daemon's end-to-end tests.

Each node is a network namespace of a NetnsLab (node1, node2, a witness and a client on one
bridge) plus its own PID and mount namespaces: the daemon runs there as PID 1's child, sees
only its node's processes (the process checker counts the node's own), and has its own copy
of the replicated directory bind-mounted at the same path on both nodes, as on two servers.
Killing the namespace's init kills every process of the node at once, like a power cut,
and the kernel then drops the node's mounts with its mount namespace.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tests.support.netns import NetnsLab, Node

SUBNET = "10.77.0"
ADDRS = {"node1": f"{SUBNET}.1", "node2": f"{SUBNET}.2", "witness": f"{SUBNET}.3"}
CLIENT_ADDR = f"{SUBNET}.10"
VIP = f"{SUBNET}.100"
MODULE = "test"
HAFS = [sys.executable, "-m", "controller.cli"]
REPO = Path(__file__).resolve().parents[2]
Completed = subprocess.CompletedProcess[str]


# The node's PID 1, as init on a real server: starts the daemon, passes SIGTERM on (and
# exits once the daemon has stopped), reaps every orphan (an application that start_prim
# left in the background ends up its child), and on SIGUSR1 starts the daemon again after
# it died (what systemd's Restart= does).
NODE_INIT = """
import os, signal, subprocess, sys
argv = sys.argv[1:]
state = {"daemon": subprocess.Popen(argv), "stopping": False}
def term(*_):
    state["stopping"] = True
    state["daemon"].send_signal(signal.SIGTERM)
def restart(*_):
    if state["daemon"].poll() is not None:
        state["daemon"] = subprocess.Popen(argv)
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
"""


class RigError(AssertionError):
    """The rig did not reach the state a test waited for."""


@dataclass
class RigNode:
    """One node: its namespace, its root, its copy of the data, its daemon."""

    name: str
    net: Node
    root: Path
    data: Path  # this node's copy, bind-mounted at the shared path inside the node
    shared: Path  # the replicated directory, as configured
    daemon: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.root / "daemon.out"

    # ------------------------------------------------------------------ the daemon

    def boot(self) -> None:
        """Start the node's daemon in fresh PID and mount namespaces."""
        if self.daemon is not None and self.daemon.poll() is None:
            raise RigError(f"{self.name}: daemon already running")
        daemon = [*HAFS, "daemon", "--node", self.name]
        inner = (
            f"mount --bind {shlex.quote(str(self.data))} {shlex.quote(str(self.shared))} && "
            f"exec {shlex.join([sys.executable, '-c', NODE_INIT, *daemon])}"
        )
        argv = ["unshare", "--pid", "--fork", "--mount", "--propagation", "private"]
        argv += ["--mount-proc", "sh", "-c", inner]
        with self.log.open("ab") as out:
            self.daemon = self.net.popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=self._env(), cwd=REPO
            )
        self.wait_for(lambda: self.control_ready(), f"{self.name}: daemon up", 30)

    def _env(self) -> dict[str, str]:
        return {**os.environ, "HAFS_ROOT": str(self.root), "PYTHONPATH": str(REPO)}

    def init_pid(self) -> int | None:
        """PID (host view) of the node's PID 1 (NODE_INIT, the daemon's parent)."""
        if self.daemon is None or self.daemon.poll() is not None:
            return None
        try:
            children = psutil.Process(self.daemon.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        unshare = [c for c in children if c.name() == "unshare"]
        parent = unshare[0] if unshare else psutil.Process(self.daemon.pid)
        kids = parent.children()
        return kids[0].pid if kids else None

    def daemon_pid(self) -> int | None:
        """PID (host view) of the daemon itself, the init's child running controller.cli."""
        init = self.init_pid()
        if init is None:
            return None
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
        pid = self.init_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
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

    def inside(
        self, cmd: list[str], check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` inside the node's mount, PID and network namespaces (as its scripts)."""
        pid = self.init_pid()
        if pid is None:
            raise RigError(f"{self.name}: not running")
        argv = ["nsenter", "-t", str(pid), "-m", "-p", "-n", *cmd]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RigError(f"{self.name}: {cmd} exited {proc.returncode}: {proc.stderr}")
        return proc

    def state(self) -> dict[str, Any]:
        reply = json.loads(self.hafs("state", "-m", MODULE, "--json").stdout)
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
        path = self.root / f"var/log/hafs/{MODULE}/module.log"
        return path.read_text() if path.exists() else ""

    def calls(self) -> list[str]:
        """The script calls the test module's scripts recorded, in order."""
        path = self.root / "var/lib/hafs/var/calls.log"
        return path.read_text().splitlines() if path.exists() else []

    def tail(self, lines: int = 30) -> str:
        """The end of the node's logs, for a failure message (the files go with the test)."""
        parts = [f"--- {self.name} module log", *self.module_log().splitlines()[-lines:]]
        logs = [self.log, *sorted((self.root / f"var/log/hafs/{MODULE}").glob("*[0-9].log"))]
        for path in logs:
            if path.exists():
                parts += [
                    f"--- {path.name}",
                    *path.read_text(errors="replace").splitlines()[-lines:],
                ]
        return "\n".join(parts)


@dataclass
class Rig:
    lab: NetnsLab
    nodes: dict[str, RigNode]
    witness: Node
    client: Node
    shared: Path

    @property
    def node1(self) -> RigNode:
        return self.nodes["node1"]

    @property
    def node2(self) -> RigNode:
        return self.nodes["node2"]

    def cut(self, a: str, b: str) -> None:
        nets = {**{n: rn.net for n, rn in self.nodes.items()}, "witness": self.witness,
                "client": self.client}  # fmt: skip
        self.lab.cut(nets[a], nets[b])

    def heal(self) -> None:
        self.lab.heal()

    def vip_mac_seen_by_client(self) -> str | None:
        return self.client.arp_table().get(VIP)


def cluster_xml() -> str:
    nodes = "".join(f'<node name="{n}" addr="{ADDRS[n]}"/>' for n in ("node1", "node2"))
    return f'<cluster><lans><lan name="default">{nodes}</lan></lans></cluster>\n'


def userconfig(shared: Path, *, witness: bool = True, errd: str = "", extra: str = "",
               pulse: int = 300, timeout: int = 2000, maxloop: int = 3) -> str:  # fmt: skip
    check = f'<check><splitbrain ident="witness" exec="ping" arg="{ADDRS["witness"]}"/></check>'
    return f"""<safe>
<service mode="mirror" defaultprim="alone" maxloop="{maxloop}" loop_interval="24" failover="on">
<heart pulse="{pulse}" timeout="{timeout}"><heartbeat name="default" ident="flow"/></heart>
<vip><interface_list><interface check="on" arpreroute="on"><real_interface>
<virtual_addr addr="{VIP}" where="one_side_alias"/>
</real_interface></interface></interface_list></vip>
{errd}
<rfs mountover="off" async="second" acl="off" nbrei="3">
<replicated dir="{shared}" mode="read_only"/>
</rfs>
<user nicestoptimeout="10" forcestoptimeout="10" logging="userlog"/>
{check if witness else ""}
{extra}
</service>
</safe>
"""


# Every script records how it was called; start_prim also starts the "application":
# bin/hafs-test-app, a symlink to sleep, so the process checker can find it by name.
APP = "hafs-test-app"
SCRIPT = """#!/bin/sh
echo "$(basename "$0") $* SAFEMODULE=$SAFEMODULE" >> "$SAFEVAR/calls.log"
"""
START_PRIM = (
    SCRIPT
    + """
setsid "$SAFEUSERBIN/hafs-test-app" 100000 < /dev/null > /dev/null 2>&1 &
"$SAFE/safekit" printi "application started"
"""
)
STOP_PRIM = (
    SCRIPT
    + """
pkill -x hafs-test-app || true
"""
)


def install_module(node: RigNode, config: str) -> None:
    src = node.root / "module-src"
    (src / "conf").mkdir(parents=True, exist_ok=True)
    (src / "bin").mkdir(exist_ok=True)
    (src / "conf/userconfig.xml").write_text(config)
    scripts = {"start_prim": START_PRIM, "stop_prim": STOP_PRIM, "prestart": SCRIPT,
               "start_second": SCRIPT, "stop_second": SCRIPT, "poststop": SCRIPT}  # fmt: skip
    for name, text in scripts.items():
        (src / "bin" / name).write_text(text)
        (src / "bin" / name).chmod(0o755)
    (src / "bin" / APP).unlink(missing_ok=True)
    (src / "bin" / APP).symlink_to("/bin/sleep")
    node.hafs("module", "install", MODULE, str(src))


@contextlib.contextmanager
def two_node_rig(base: Path, config: str | None = None, **config_args: Any) -> Iterator[Rig]:
    """node1, node2 (daemons not started), a witness and a client on one bridge."""
    shared = base / "replicated"
    shared.mkdir(parents=True)
    with NetnsLab() as lab:
        lab.add_bridge()
        nodes = {}
        key = base / "cluster.key"
        subprocess.run([*HAFS, "keygen", str(key)], check=True, capture_output=True, cwd=REPO)
        for name in ("node1", "node2"):
            net = lab.add_node(name, f"{ADDRS[name]}/24")
            root = base / name
            (root / "etc/hafs").mkdir(parents=True)
            (root / "etc/hafs/cluster.xml").write_text(cluster_xml())
            (root / "etc/hafs/cluster.key").write_bytes(key.read_bytes())
            (root / "etc/hafs/cluster.key").chmod(0o600)
            data = base / f"{name}-data"
            data.mkdir()
            nodes[name] = RigNode(name, net, root, data, shared)
        witness = lab.add_node("witness", f"{ADDRS['witness']}/24")
        client = lab.add_node("client", f"{CLIENT_ADDR}/24")
        rig = Rig(lab, nodes, witness, client, shared)
        text = config if config is not None else userconfig(shared, **config_args)
        for node in nodes.values():
            install_module(node, text)
        try:
            yield rig
        finally:
            for node in nodes.values():
                node.kill()


def establish(rig: Rig) -> None:
    """The seed's first start: prim on node1 (good data), start on node2 (joins it)."""
    n1, n2 = rig.node1, rig.node2
    n1.boot()
    n2.boot()
    n1.hafs("prim", "-m", MODULE, "--force")
    n1.wait_state("ALONE", colour="green")
    n2.hafs("start", "-m", MODULE)
    n2.wait_state("SECOND", colour="green", timeout=60)
    n1.wait_state("PRIM", colour="green")


def logged_at(log: str, text: str) -> float:
    """Wall-clock time of the first module log line containing `text`."""
    line = next(line for line in log.splitlines() if text in line)
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp()
