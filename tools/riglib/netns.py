"""Network namespaces for tests and the rig: nodes on a bridge, cut and healed at will.

    with NetnsLab() as lab:
        lab.add_bridge()
        node1 = lab.add_node("node1", "10.77.7.1/24")
        client = lab.add_node("client", "10.77.7.10/24")
        client.run(["ping", "-c", "1", "10.77.7.1"])
        lab.cut(node1, client)

Every namespace is named `hafs-t<pid>-<lab>-<name>`, so parallel runs never collide and a
leftover names the run that left it. The persistent rig (tools/rig) gives a fixed prefix
instead (`hafs-node1` ...) and, in each later invocation, reads the lab back from the kernel
with `NetnsLab.existing(prefix)`. The bridges live in a namespace of their own
(`...-switch`), not in the host's: nothing is added to the host's network, interface names
cannot collide with anyone's, and bridged frames never meet the host's firewall (with
br_netfilter loaded, a host bridge would send them through iptables' FORWARD chain, which
Docker sets to DROP). Each node sees its links as eth0, eth1 ... in attach order.

`__exit__` kills what `popen` started and anything else still running in the namespaces,
then deletes the namespaces, which deletes every veth and bridge with them.

Faults besides cuts: `loss(node, percent)` drops that share of a node's IP packets both ways
(nftables `numgen random`) and `rate(node, rate)` limits its bandwidth both ways (`tc` tbf on
its link and on the link's bridge port); this kernel has no sch_netem for `tc netem`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
_LAB_SEQ = itertools.count()
_NAME = re.compile(r"[a-z][a-z0-9]{0,15}")
SWITCH = "switch"  # the namespace holding the bridges; no node may take this name
NFT_TABLE = "hafs_lab"
NFT_LOSS_TABLE = "hafs_lab_loss"
# tbf needs a bucket of at least one MTU-sized burst; the latency bounds the queue.
TBF_BURST = "32kbit"
TBF_LATENCY = "400ms"
KILL_TIMEOUT = 5.0

Command = Sequence[str] | str


class LabError(RuntimeError):
    """A namespace command failed, or the lab could not be torn down completely."""


def _argv(cmd: Command) -> list[str]:
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def _run(argv: Sequence[str], *, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise LabError(f"{shlex.join(argv)} exited with {proc.returncode}: {proc.stderr.strip()}")
    return proc


@dataclass(frozen=True)
class Bridge:
    name: str  # the lab's name for it
    ifname: str  # its device in the switch namespace


@dataclass
class Link:
    ifname: str  # inside the node
    port: str  # the bridge port in the switch namespace
    bridge: Bridge
    addr: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    mac: str


@dataclass
class Node:
    """One namespace with a link to each bridge it is attached to (eth0 first)."""

    lab: NetnsLab
    name: str
    netns: str
    links: list[Link] = field(default_factory=list)

    @property
    def addr(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """The address on eth0."""
        return self.links[0].addr.ip

    @property
    def ifname(self) -> str:
        return self.links[0].ifname

    @property
    def mac(self) -> str:
        """eth0's MAC address."""
        return self.links[0].mac

    def run(
        self, cmd: Command, check: bool = True, timeout: float | None = 60.0, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` in the namespace and wait; output captured as text."""
        return _run(
            ["ip", "netns", "exec", self.netns, *_argv(cmd)], check=check, timeout=timeout, **kw
        )

    def python(
        self, code: str, *args: str, timeout: float | None = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run `python -c code args...` in the namespace, from the repository's root."""
        return self.run([sys.executable, "-c", code, *args], timeout=timeout, cwd=REPO_ROOT)

    def popen(self, cmd: Command, **kw: Any) -> subprocess.Popen[Any]:
        """Start `cmd` in the namespace; the lab kills it (and its children) on exit."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, *_argv(cmd)], start_new_session=True, **kw
        )
        self.lab._procs.append(proc)
        return proc

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`ip -n NETNS ARGS...`."""
        return _run(["ip", "-n", self.netns, *args], check=check)

    def sysctl(self, name: str, value: str | int) -> None:
        self.run(["sysctl", "-qw", f"{name}={value}"])

    def set_link(self, up: bool, ifname: str | None = None) -> None:
        self.ip("link", "set", ifname or self.ifname, "up" if up else "down")

    def arp_table(self) -> dict[str, str]:
        """IPv4 neighbours that have a MAC (any state but INCOMPLETE/FAILED): {ip: mac}."""
        entries = json.loads(self.ip("-4", "-j", "neigh", "show").stdout or "[]")
        return {e["dst"]: e["lladdr"] for e in entries if e.get("lladdr")}

    def addresses(self, ifname: str | None = None, version: int = 4) -> list[str]:
        """The IPv4 (or IPv6) addresses on a link, as `ip` shows them (ADDR/PREFIX)."""
        dev = ifname or self.ifname
        out = json.loads(self.ip(f"-{version}", "-j", "addr", "show", "dev", dev).stdout)
        return [f"{a['local']}/{a['prefixlen']}" for dev in out for a in dev["addr_info"]]


class NetnsLab:
    """Namespaces joined by bridges; see the module docstring. Use as a context manager."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix if prefix is not None else f"hafs-t{os.getpid()}-{next(_LAB_SEQ)}-"
        self.switch = self.prefix + SWITCH
        self.bridges: dict[str, Bridge] = {}
        self.nodes: dict[str, Node] = {}
        self._ports = itertools.count()
        self._cuts: set[frozenset[str]] = set()
        self._procs: list[subprocess.Popen[Any]] = []
        self._netns: list[str] = []  # created, in order

    def __enter__(self) -> NetnsLab:
        return self.open()

    def open(self) -> NetnsLab:
        """Create the switch namespace; without `with`, the caller must `close()`."""
        try:
            self._add_netns(self.switch)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        problems = self.close()
        if problems and exc is None:
            raise LabError("lab teardown incomplete:\n" + "\n".join(problems))
        for problem in problems:  # do not hide the test's own exception behind ours
            print(f"netns lab teardown: {problem}", file=sys.stderr)

    @classmethod
    def existing(cls, prefix: str) -> NetnsLab:
        """The lab another process built with `prefix`, read back from the kernel: its
        namespaces (those named prefix + a node name only), bridges and links. A half-made
        lab reads back as far as it got, so `close()` on it removes whatever is there."""
        lab = cls(prefix)
        listed = json.loads(_run(["ip", "-j", "netns", "list"]).stdout or "[]")
        names = {e["name"][len(prefix) :] for e in listed if e["name"].startswith(prefix)}
        names = {n for n in names if _NAME.fullmatch(n)}
        if SWITCH not in names:
            lab._netns += [prefix + n for n in sorted(names)]
            return lab
        lab._netns.append(lab.switch)
        ports = {}  # ifindex in the switch -> (port name, bridge)
        for dev in json.loads(_run(["ip", "-n", lab.switch, "-j", "link", "show"]).stdout):
            if "master" not in dev:  # a bridge itself, or lo
                continue
            ports[dev["ifindex"]] = (dev["ifname"], dev["master"])
        for dev in json.loads(
            _run(["ip", "-n", lab.switch, "-j", "link", "show", "type", "bridge"]).stdout
        ):
            lab.bridges[dev["ifname"]] = Bridge(dev["ifname"], dev["ifname"])
        for name in sorted(names - {SWITCH}):
            node = Node(lab, name, prefix + name)
            lab._netns.append(node.netns)
            lab.nodes[name] = node
            addrs = json.loads(node.ip("-j", "addr", "show").stdout)
            for dev in sorted(addrs, key=lambda d: d["ifname"]):
                v4 = [a for a in dev.get("addr_info", []) if a["family"] == "inet"]
                if not dev["ifname"].startswith("eth") or not v4 or "link_index" not in dev:
                    continue
                port, master = ports.get(dev["link_index"], ("", ""))
                addr = ipaddress.ip_interface(f"{v4[0]['local']}/{v4[0]['prefixlen']}")
                bridge = lab.bridges.get(master) or Bridge(master, master)
                node.links.append(Link(dev["ifname"], port, bridge, addr, dev["address"]))
        lab._ports = itertools.count(len(ports))
        return lab

    # ------------------------------------------------------------ building

    def add_bridge(self, name: str = "lan") -> Bridge:
        if name in self.bridges:
            raise LabError(f"bridge {name!r} exists")
        bridge = Bridge(name, f"br{len(self.bridges)}")
        _run(["ip", "-n", self.switch, "link", "add", bridge.ifname, "type", "bridge"])
        _run(["ip", "-n", self.switch, "link", "set", bridge.ifname, "up"])
        self.bridges[name] = bridge
        return bridge

    def add_node(self, name: str, addr_cidr: str, bridge: Bridge | str | None = None) -> Node:
        """A namespace with lo up and eth0 on `bridge` (the only bridge when omitted)."""
        if not _NAME.fullmatch(name) or name == SWITCH:
            raise LabError(f"node name {name!r}: lowercase letters and digits, not {SWITCH!r}")
        if name in self.nodes:
            raise LabError(f"node {name!r} exists")
        node = Node(self, name, self.prefix + name)
        self._add_netns(node.netns)
        self.nodes[name] = node
        node.ip("link", "set", "lo", "up")
        self.attach(node, addr_cidr, bridge)
        return node

    def attach(self, node: Node, addr_cidr: str, bridge: Bridge | str | None = None) -> Link:
        """Give `node` one more link (eth1, eth2 ...) on `bridge`, with `addr_cidr`."""
        br = self._bridge(bridge)
        ifname = f"eth{len(node.links)}"
        port = f"p{next(self._ports)}"
        # Both ends are created straight in their namespaces: no name ever exists on the host.
        _run(
            ["ip", "link", "add", ifname, "netns", node.netns, "type", "veth"]
            + ["peer", "name", port, "netns", self.switch]
        )
        _run(["ip", "-n", self.switch, "link", "set", port, "master", br.ifname, "up"])
        node.ip("addr", "add", addr_cidr, "dev", ifname)
        node.ip("link", "set", ifname, "up")
        info = json.loads(node.ip("-j", "link", "show", ifname).stdout)[0]
        link = Link(ifname, port, br, ipaddress.ip_interface(addr_cidr), info["address"])
        node.links.append(link)
        return link

    def set_port(self, node: Node, up: bool, ifname: str | None = None) -> None:
        """Pull (or plug back) the cable: the bridge side of a node's link, down or up."""
        name = ifname or node.ifname
        port = next(lk.port for lk in node.links if lk.ifname == name)
        _run(["ip", "-n", self.switch, "link", "set", port, "up" if up else "down"])

    # ------------------------------------------------------------ partitions

    def cut(self, a: Node, b: Node) -> None:
        """Drop every frame between a and b, both ways; others still reach both.

        Each side drops, at ingress, the frames whose source MAC is the other's, in a netdev
        table: ARP included, as with a pulled cable (an inet table would let ARP through).
        """
        self._cuts.add(frozenset((a.name, b.name)))
        self._apply_cuts(a, b)

    def heal(self, a: Node | None = None, b: Node | None = None) -> None:
        """Undo cut(a, b), or every cut when called without nodes."""
        if a is None or b is None:
            affected = [self.nodes[n] for pair in self._cuts for n in pair]
            self._cuts.clear()
        else:
            self._cuts.discard(frozenset((a.name, b.name)))
            affected = [a, b]
        self._apply_cuts(*affected)

    def _apply_cuts(self, *nodes: Node) -> None:
        for node in {n.name: n for n in nodes}.values():
            peers = [self.nodes[n] for pair in self._cuts if node.name in pair for n in pair]
            macs = sorted({lk.mac for p in peers if p is not node for lk in p.links})
            # Declaring then deleting the table makes the script work whether it exists or not.
            script = [f"table netdev {NFT_TABLE} {{}}", f"delete table netdev {NFT_TABLE}"]
            if macs:
                chains = "".join(
                    f"  chain in_{lk.ifname} {{ type filter hook ingress device"
                    f' "{lk.ifname}" priority 0; policy accept;'
                    f" ether saddr {{ {', '.join(macs)} }} drop; }}\n"
                    for lk in node.links
                )
                script.append(f"table netdev {NFT_TABLE} {{\n{chains}}}")
            node.run(["nft", "-f", "-"], input="\n".join(script) + "\n")

    @property
    def cuts(self) -> set[frozenset[str]]:
        """The pairs of node names cut now (a persistent rig saves and restores them)."""
        return set(self._cuts)

    def restore_cuts(self, cuts: set[frozenset[str]]) -> None:
        """Take `cuts` as what is in force, without touching any rule (the persistent rig:
        a later invocation learns what an earlier one cut)."""
        self._cuts = set(cuts)

    # ------------------------------------------------------------ degraded links

    def loss(self, node: Node, percent: float) -> None:
        """Drop `percent` % of the node's IP packets at random, in and out (0: none)."""
        script = [f"table inet {NFT_LOSS_TABLE} {{}}", f"delete table inet {NFT_LOSS_TABLE}"]
        if percent > 0:
            # numgen counts 0..9999: two decimals of a percent.
            rule = f"numgen random mod 10000 < {round(percent * 100)} drop"
            script.append(
                f"table inet {NFT_LOSS_TABLE} {{\n"
                f"  chain in {{ type filter hook input priority 0; policy accept; {rule}; }}\n"
                f"  chain out {{ type filter hook output priority 0; policy accept; {rule}; }}\n}}"
            )
        node.run(["nft", "-f", "-"], input="\n".join(script) + "\n")

    def rate(self, node: Node, rate: str | None) -> None:
        """Limit the node's bandwidth each way to `rate` (tc units: 1mbit, 500kbit ...) with a
        token bucket on its links and on their bridge ports; None removes the limit."""
        for link in node.links:
            for ns, dev in ((node.netns, link.ifname), (self.switch, link.port)):
                _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
                if rate is not None:
                    _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate]
                         + ["burst", TBF_BURST, "latency", TBF_LATENCY])  # fmt: skip

    # ------------------------------------------------------------ teardown

    def close(self) -> list[str]:
        """Kill processes, delete namespaces; returns what could not be cleaned (idempotent)."""
        problems: list[str] = []
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # own session: pgid == pid
            try:
                proc.wait(KILL_TIMEOUT)
            except subprocess.TimeoutExpired:
                problems.append(f"pid {proc.pid} survived SIGKILL")
        self._procs.clear()
        for netns in reversed(self._netns):
            # A namespace outlives `ip netns del` while a process is in it, and so do its
            # links: kill whatever a test started there by other means.
            pids = _run(["ip", "netns", "pids", netns], check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            deleted = _run(["ip", "netns", "del", netns], check=False)
            if deleted.returncode != 0 and os.path.exists(f"/run/netns/{netns}"):
                problems.append(f"ip netns del {netns}: {deleted.stderr.strip()}")
        self._netns.clear()
        self.nodes.clear()
        self.bridges.clear()
        return problems

    # ------------------------------------------------------------ helpers

    def _add_netns(self, netns: str) -> None:
        _run(["ip", "netns", "add", netns])
        self._netns.append(netns)

    def _bridge(self, bridge: Bridge | str | None) -> Bridge:
        if isinstance(bridge, Bridge):
            return bridge
        if bridge is not None:
            return self.bridges[bridge]
        if len(self.bridges) != 1:
            raise LabError(f"name the bridge: the lab has {len(self.bridges)}")
        return next(iter(self.bridges.values()))
