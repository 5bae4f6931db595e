"""Two real hafs daemons in network namespaces, for the daemon's end-to-end tests.

Each node is a rig node (tools/riglib/node.py): a network namespace of a NetnsLab (node1,
node2, a witness and a client on one bridge) plus its own PID and mount namespaces, with its
own copy of the replicated directory bind-mounted at the same path on both nodes. Here every
test gets its own rig, with per-run namespace names; tools/rig builds the persistent one.
"""

from __future__ import annotations

import contextlib
import datetime
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.riglib.netns import NetnsLab, Node
from tools.riglib.node import (  # noqa: F401  (the tests' names for them)
    ADDRS,
    CLIENT_ADDR,
    HAFS,
    NODE_INIT,
    REPO,
    SUBNET,
    VIP,
    RigError,
    RigNode,
    cluster_xml,
    prepare_root,
)

MODULE = "test"
Completed = subprocess.CompletedProcess[str]


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
            prepare_root(root, key.read_bytes())
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


# The application of the data tests: random 4 KiB pages of db.dat, an fsync every
# `fsync_every` writes (0: none), `warm` made after 500 writes, until `stop` appears or
# the node dies.
PAGE_WRITER = """
import os, random, sys
size, fsync_every = int(sys.argv[1]), int(sys.argv[2])
fd = os.open("db.dat", os.O_RDWR | os.O_CREAT, 0o644)
os.ftruncate(fd, size)
i = 0
while not os.path.exists("stop"):
    os.pwrite(fd, os.urandom(4096), random.randrange(size // 4096) * 4096)
    i += 1
    if fsync_every and i % fsync_every == 0:
        os.fsync(fd)
    if i == 500:
        open("warm", "w").close()
"""


def start_page_writer(node: RigNode, size: int, fsync_every: int = 0) -> None:
    """Start PAGE_WRITER in the node's replicated directory, in the background, and wait
    until it is busy."""
    code = shlex.quote(PAGE_WRITER)
    script = f"cd {node.shared} && nohup python3 -c {code} {size} {fsync_every} >/dev/null 2>&1 &"
    node.inside(["sh", "-c", script])
    node.wait_for(lambda: (node.data / "warm").exists(), f"{node.name}: the writer busy", 60)
