"""The persistent two-node MySQL rig behind tools/rig (docs/rig.md).

Namespaces `hafs-node1`, `hafs-node2`, `hafs-witness` and `hafs-client` on one bridge in
`hafs-switch`, with no route out; node1 and node2 are rig nodes (tools/riglib/node.py) running
the examples/mysql module, each with its copy of /var/lib/mysql (and its own /run/mysqld)
under the rig's directory. Nothing is kept in memory between invocations: the namespaces are
read back from the kernel, each node's init from its pid file, the cuts from a JSON file, so
every command works from a fresh process, and `down` removes whatever a full or half-made
`up` left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hafs.mountinfo import mounts
from tools.riglib.netns import NetnsLab, Node
from tools.riglib.node import (
    ADDRS,
    CLIENT_ADDR,
    HAFS,
    REPO,
    VIP,
    RigError,
    RigNode,
    kill_init,
    prepare_root,
)

PREFIX = "hafs-"
RIG_DIR = Path(os.environ.get("HAFS_RIG_DIR", "/var/lib/hafs-rig"))
MODULE = "mysql"
MODULE_SRC = REPO / "examples/mysql"
# The rig installs the module with a 3 s heartbeat timeout (the seed's 30 s suits real
# servers on a busy LAN: a failover here takes seconds, not half a minute) and the witness
# namespace, running `hafs witness serve`, as its arbitrating witness (docs/rig.md).
HEART = '<heart pulse="700" timeout="3000">'
WITNESS_CHECK = (
    f'<check><splitbrain ident="witness" exec="arbitrate" arg="{ADDRS["witness"]}"/></check>'
)
WITNESS_DIR = "witness"  # under the rig's directory: its pid file, log and lease holders
SHARED = Path("/var/lib/mysql")  # the replicated directory, as in the module's userconfig.xml
RUN_MYSQLD = Path("/run/mysqld")  # MariaDB's socket and pid file: each node its own
MARIADB_PORT = 3306
CLIENT_USER = CLIENT_PASSWORD = CLIENT_DB = "hafs"
NODES = ("node1", "node2")
HOSTS = ("witness", "client")  # namespaces only: no daemon, nothing to boot
ALL = (*NODES, *HOSTS)
CUTS_FILE = "cuts.json"
JOIN_TIMEOUT = 300.0  # the SECOND's first full copy of the datadir
SQL_TIMEOUT = 120.0

# Bootstrap runs without grant tables: FLUSH PRIVILEGES loads them so CREATE USER works.
CLIENT_SQL = f"""FLUSH PRIVILEGES;
CREATE DATABASE {CLIENT_DB};
CREATE USER '{CLIENT_USER}'@'%' IDENTIFIED BY '{CLIENT_PASSWORD}';
GRANT ALL PRIVILEGES ON {CLIENT_DB}.* TO '{CLIENT_USER}'@'%';
"""


def say(message: str) -> None:
    print(f"rig: {message}", flush=True)


@dataclass
class PersistentRig:
    """The rig as it is now on this machine, whatever made it."""

    lab: NetnsLab
    base: Path = RIG_DIR

    @classmethod
    def current(cls) -> PersistentRig:
        return cls(NetnsLab.existing(PREFIX))

    def is_up(self) -> bool:
        return bool(self.lab.nodes) or self.base.exists()

    # ------------------------------------------------------------------ nodes

    def node(self, name: str) -> RigNode:
        """node1 or node2, with its daemon."""
        if name not in NODES:
            raise RigError(f"{name}: not a node with a daemon (node1, node2)")
        root = self.base / name
        return RigNode(name, self.host(name), root, root / "mysql", SHARED, module=MODULE,
                       private=((root / "mysqld", RUN_MYSQLD),))  # fmt: skip

    def host(self, name: str) -> Node:
        """Any of the four namespaces."""
        if name not in ALL:
            raise RigError(f"{name}: no such node ({', '.join(ALL)})")
        net = self.lab.nodes.get(name)
        if net is None:
            raise RigError(f"{name}: no namespace {PREFIX}{name}: is the rig up?")
        return net

    def exec_argv(self, name: str, cmd: list[str]) -> tuple[list[str], dict[str, str]]:
        """The command line and environment that run `cmd` inside node `name`."""
        if name in NODES:
            node = self.node(name)
            return node.enter_argv(cmd), {**os.environ, "HAFS_ROOT": str(node.root)}
        return ["ip", "netns", "exec", self.host(name).netns, *cmd], dict(os.environ)

    def kill(self, name: str) -> None:
        """Power cut: every process of the node at once."""
        if name in NODES:
            # The link first: a dead server sends nothing, not even the FIN or RST the
            # kernel would send for the sockets of the processes it kills.
            self.host(name).set_link(False)
            self.node(name).kill()
            self._network_reset(name)
            return
        netns = self.host(name).netns
        pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
        for pid in pids.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)

    def boot(self, name: str) -> None:
        """Power on: the node's link up again, then its init and daemon (the witness: its
        `hafs witness serve`)."""
        if name == "witness":
            self.start_witness()
            return
        node = self.node(name)
        node.net.set_link(True)
        node.boot()

    def settled(self, prim: str, second: str, timeout: float = JOIN_TIMEOUT) -> None:
        """Until `second` is a synchronised SECOND (green) and `prim` PRIM (green)."""
        self.node(second).wait_state("SECOND", colour="green", timeout=timeout)
        self.node(prim).wait_state("PRIM", colour="green", timeout=60)

    def start_witness(self) -> None:
        """`hafs witness serve` in hafs-witness, in the background, as a service."""
        wdir = self.base / WITNESS_DIR
        wdir.mkdir(exist_ok=True)
        log = wdir / "witness.log"
        argv = [*HAFS, "witness", "serve", "--listen", ADDRS["witness"],
                "--key", str(self.base / "cluster.key"),
                "--state-file", str(wdir / "leases.json")]  # fmt: skip
        with log.open("a") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.host("witness").netns, *argv],
                                    stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                    start_new_session=True)  # fmt: skip
        (wdir / "pid").write_text(str(proc.pid))
        deadline = time.monotonic() + 15
        while "witness listening" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RigError(f"the witness did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop_witness(self) -> None:
        """Kill the witness recorded in the rig's directory, if it still runs."""
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.base / WITNESS_DIR / "pid").read_text())
            if "witness" in Path(f"/proc/{pid}/cmdline").read_text():
                os.kill(pid, signal.SIGKILL)

    def _network_reset(self, name: str) -> None:
        """What a power cut does to a server's network, which the namespace outlives: what
        its daemon added (the VIP alias) and learnt (its ARP cache) is gone when it boots
        again; only its own address stays configured."""
        net = self.host(name)
        for addr in net.addresses():
            if addr != f"{ADDRS[name]}/24":
                net.ip("addr", "del", addr, "dev", net.ifname)
        net.ip("neigh", "flush", "dev", net.ifname)

    # ------------------------------------------------------------------ faults

    def _load_cuts(self) -> None:
        path = self.base / CUTS_FILE
        pairs = json.loads(path.read_text()) if path.exists() else []
        self.lab.restore_cuts({frozenset(p) for p in pairs})

    def _save_cuts(self) -> None:
        pairs = sorted(sorted(pair) for pair in self.lab.cuts)
        (self.base / CUTS_FILE).write_text(json.dumps(pairs) + "\n")

    def cut(self, a: str, b: str) -> None:
        if a == b:
            raise RigError("cut: two different nodes")
        self._load_cuts()
        self.lab.cut(self.host(a), self.host(b))
        self._save_cuts()

    def heal(self) -> None:
        self._load_cuts()
        self.lab.heal()
        self._save_cuts()

    def cut_pairs(self) -> list[list[str]]:
        path = self.base / CUTS_FILE
        return list(json.loads(path.read_text())) if path.exists() else []

    # ------------------------------------------------------------------ MariaDB

    def client_sql(
        self, query: str, timeout: float = SQL_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """`query` from the client namespace, through the virtual IP, as user hafs."""
        argv = ["mariadb", "-h", VIP, "-P", str(MARIADB_PORT), "-u", CLIENT_USER,
                f"-p{CLIENT_PASSWORD}", "--connect-timeout=3", "-N", "-B", CLIENT_DB,
                "-e", query]  # fmt: skip
        return self.host("client").run(argv, check=False, timeout=timeout)

    def wait_sql(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            reply = self.client_sql("SELECT 1")
            if reply.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RigError(f"MariaDB not reachable on {VIP}: {reply.stderr.strip()}")
            time.sleep(1)


def _mysql_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    shutil.chown(path, "mysql", "mysql")
    path.chmod(0o755)


def rig_module(target: Path) -> Path:
    """examples/mysql as the rig installs it: its heartbeat timeout and its witness."""
    shutil.copytree(MODULE_SRC, target, symlinks=True)
    conf = target / "conf/userconfig.xml"
    text = conf.read_text()
    old = '<heart pulse="700" timeout="30000">'
    if old not in text or "</service>" not in text:
        raise RigError(f"{MODULE_SRC}/conf/userconfig.xml: no {old} to override")
    text = text.replace(old, HEART).replace("</service>", f"  {WITNESS_CHECK}\n</service>")
    conf.write_text(text)
    return target


def init_datadir(datadir: Path) -> None:
    """A fresh MariaDB datadir with the client account, made once on the primary-to-be."""
    sql = datadir.parent / "client.sql"
    sql.write_text(CLIENT_SQL)
    argv = [
        "mariadb-install-db",
        f"--defaults-extra-file={MODULE_SRC / 'conf/mariadb.cnf'}",  # the server's settings
        "--user=mysql",
        f"--datadir={datadir}",
        "--auth-root-authentication-method=socket",
        "--skip-test-db",
        f"--extra-file={sql}",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=SQL_TIMEOUT)
    sql.unlink()
    if done.returncode != 0:
        raise RigError(f"mariadb-install-db failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def up() -> PersistentRig:
    """Build the rig and bring the cluster up: node1 PRIM, node2 SECOND, MariaDB on the VIP."""
    rig = PersistentRig.current()
    if rig.is_up():
        raise RigError(f"the rig is up, or half-made ({RIG_DIR}): tools/rig down first")
    for target in (SHARED, RUN_MYSQLD):
        if not target.is_dir():
            raise RigError(f"{target} missing: install mariadb-server (make install)")
    started = time.monotonic()
    RIG_DIR.mkdir(parents=True)
    RIG_DIR.chmod(0o755)
    key = RIG_DIR / "cluster.key"
    subprocess.run([*HAFS, "keygen", str(key)], check=True, capture_output=True, cwd=REPO)
    lab = NetnsLab(PREFIX).open()
    lab.add_bridge()
    for name in ALL:
        lab.add_node(name, f"{ADDRS.get(name, CLIENT_ADDR)}/24")
    rig = PersistentRig(lab)
    say(f"namespaces {', '.join(PREFIX + n for n in ALL)} on one bridge")
    rig.start_witness()
    say(f"arbitrating witness on {ADDRS['witness']} (hafs witness serve)")
    module = rig_module(RIG_DIR / "module")
    for name in NODES:
        node = rig.node(name)
        prepare_root(node.root, key.read_bytes())
        _mysql_dir(node.data)
        _mysql_dir(node.root / "mysqld")
        node.hafs("module", "install", MODULE, str(module))
    init_datadir(rig.node("node1").data)
    say("MariaDB datadir initialised on node1 (user hafs, database hafs)")
    n1, n2 = rig.node("node1"), rig.node("node2")
    n1.boot()
    n1.hafs("prim", "-m", MODULE, "--force")
    n1.wait_state("ALONE", colour="green", timeout=JOIN_TIMEOUT)
    say("node1 ALONE: MariaDB started on the hafs mount")
    n2.boot()
    n2.hafs("start", "-m", MODULE)
    n2.wait_state("SECOND", colour="green", timeout=JOIN_TIMEOUT)
    n1.wait_state("PRIM", colour="green")
    rig.wait_sql(SQL_TIMEOUT)
    say(f"up in {time.monotonic() - started:.0f} s: node1 PRIM, node2 SECOND, "
        f"MariaDB on {VIP}:{MARIADB_PORT}")  # fmt: skip
    return rig


def down() -> list[str]:
    """Remove every process, namespace and file of the rig, however far `up` got;
    returns what could not be removed (nothing, normally). Idempotent."""
    rig = PersistentRig.current()
    for name in NODES:  # by pid file: an init outlives a namespace someone deleted
        kill_init(RIG_DIR / name)
    rig.stop_witness()
    problems = rig.lab.close()
    leftovers = list(_mounts_under(RIG_DIR))
    problems += [f"mounted: {m}" for m in leftovers]
    if not leftovers:
        shutil.rmtree(RIG_DIR, ignore_errors=True)
        if RIG_DIR.exists():
            problems.append(f"{RIG_DIR} not removed")
    return problems


def _mounts_under(base: Path) -> Iterator[str]:
    for mount, _ in mounts():
        if Path(mount).is_relative_to(base):
            yield mount
