"""The virtual IP: an alias address that follows the primary, announced by gratuitous ARP.

    vip = VirtualIp.from_config(interface, address)
    await vip.take()                      # ip addr add VIP/PREFIX dev IF
    await nursery.start(vip.announce)     # returns once the first ARP pair is out
    ...
    await vip.release()                   # stops the announcement, then ip addr del

take() and release() are idempotent: the daemon may call them whatever it believes the
current state is. release() returns only once no announcement can go out any more, so the
peer never takes the address while this node still claims it on the wire (I8).

Gratuitous ARP, when `arpreroute` is on, follows keepalived and IPaddr2 (reference
ha-anchors.md): a burst of 5 announcements 200 ms apart right after the take, a second
burst 5 s later (vrrp_garp_master_delay) for switches and hosts that missed the first while
the link settled, then SafeKit's refresh: one announcement every `arpinterval` for
`arpelapse`. Each announcement is a pair, a request and a reply, because some systems
ignore one or the other (send_arp.libnet.c); both carry psrc = pdst = VIP in broadcast
frames. IPv6 addresses are set and removed the same way, but not announced yet.

`where="one_side"` (the VIP as the interface's primary address) is not implemented: the
address is set as an alias either way.

Tickle ACKs (CTDB's trick): a client whose connection to the VIP was on the dead primary
learns of it only at its next TCP retransmission, which backs off (0.2, 0.4, 0.8, 1.6, 3.2
s ...): seconds after the new primary serves. The primary lists its clients' connections
(`client_connections`, carried in its heartbeats); the node taking the VIP over sends each a
bogus ACK from the VIP (`send_tickles`). The client answers with an ACK for a connection
this node does not have, its kernel answers that with a RST, and the client reconnects at
once.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import trio

# Types only: importing the config module pulls in xmlschema, a second at start-up.
if TYPE_CHECKING:
    from controller.config import IPAddress, Vip, VipInterface, VirtualAddress


log = logging.getLogger(__name__)

SYS_CLASS_NET = Path("/sys/class/net")
BROADCAST_MAC = "ff:ff:ff:ff:ff:ff"


class VipError(RuntimeError):
    """Setting, removing or announcing the virtual IP failed; says which command and why."""


@dataclass(frozen=True)
class GarpTiming:
    """When to send gratuitous ARP pairs after a take, as offsets in seconds."""

    count: int = 5  # pairs per burst (keepalived vrrp_garp_master_repeat, IPaddr2 arp_count)
    interval: float = 0.2  # between pairs of a burst (IPaddr2 arp_interval)
    repeat_delay: float = 5.0  # second burst (keepalived vrrp_garp_master_delay); 0: none
    refresh_interval: float = 60.0  # SafeKit arpinterval: one pair this often ...
    refresh_for: float = 1200.0  # ... for this long after the take (arpelapse); 0: none

    def offsets(self) -> Iterator[float]:
        """Send times, ascending, starting at 0."""
        times = {i * self.interval for i in range(self.count)}
        if self.repeat_delay > 0:
            times |= {self.repeat_delay + i * self.interval for i in range(self.count)}
        if self.refresh_interval > 0 and self.refresh_for > 0:
            n = math.floor(self.refresh_for / self.refresh_interval + 1e-9)
            times |= {k * self.refresh_interval for k in range(1, n + 1)}
        return iter(sorted(times))


class VirtualIp:
    """One virtual address on one interface of this node."""

    def __init__(
        self,
        addr: IPAddress,
        interface: str | None = None,
        *,
        arpreroute: bool = False,
        garp: GarpTiming | None = None,
    ) -> None:
        self.addr = addr
        self.interface = interface  # None: the interface whose subnet holds addr
        self.arpreroute = arpreroute
        self.garp = garp or GarpTiming()
        self._announcing: trio.CancelScope | None = None
        self._announce_done: trio.Event | None = None

    @classmethod
    def from_config(cls, interface: VipInterface, address: VirtualAddress) -> VirtualIp:
        timing = GarpTiming(refresh_interval=interface.arpinterval, refresh_for=interface.arpelapse)
        return cls(address.addr, interface.name, arpreroute=interface.arpreroute, garp=timing)

    def __repr__(self) -> str:
        return f"VirtualIp({self.addr}, interface={self.interface!r})"

    # ------------------------------------------------------------ address

    def held(self) -> bool:
        """The address is set on an interface of this node, whichever: it answers ARP there."""
        return bool(_interfaces_holding(self.addr))

    async def take(self) -> None:
        """Set the address; already set on the interface is fine."""
        ifname, prefix = self.placement()
        if ifname in _interfaces_holding(self.addr):
            return
        await _ip_addr("add", self.addr, prefix, ifname)
        log.info("virtual IP %s/%s set on %s", self.addr, prefix, ifname)

    async def release(self) -> None:
        """Stop announcing, then remove the address from every interface; absent is fine."""
        await self.stop_announcing()
        for ifname, prefix in _interfaces_holding(self.addr).items():
            await _ip_addr("del", self.addr, prefix, ifname)
            log.info("virtual IP %s removed from %s", self.addr, ifname)

    def placement(self) -> tuple[str, int]:
        """(interface, prefix length) for the address.

        The prefix is the one of the interface's subnet that holds the address, so the alias
        is a secondary of that subnet; a named interface with no such subnet gets a host
        prefix (/32, /128). Unnamed, the interface is the one whose subnet holds it.
        """
        subnets = [
            (ifname, net)
            for ifname, net in _subnets()
            if self.addr in net and (self.interface is None or ifname == self.interface)
        ]
        if subnets:
            ifname, net = max(subnets, key=lambda s: s[1].prefixlen)  # the narrowest subnet
            return ifname, net.prefixlen
        if self.interface is not None:
            return self.interface, self.addr.max_prefixlen
        raise VipError(
            f"no interface has a subnet holding {self.addr}: name one in <interface name=...>"
        )

    # ------------------------------------------------------------ gratuitous ARP

    async def announce(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Send gratuitous ARP on `self.garp`'s schedule; call after take(), in a nursery.

        `await nursery.start(vip.announce)` returns once the first pair is out (or raises
        VipError if it could not be sent); the rest runs until the schedule ends, release()
        or stop_announcing(); a second call replaces the first. A later send failing is
        logged, not raised: one lost refresh must not bring the daemon down, and the
        interface checker reports a dead link. Does nothing when `arpreroute` is off.
        """
        if not self.arpreroute or self.addr.version != 4:
            task_status.started()
            return
        await self.stop_announcing()  # a second take restarts the schedule
        ifname, _ = self.placement()
        scope, done = trio.CancelScope(), trio.Event()
        self._announcing, self._announce_done = scope, done
        try:
            with scope:
                # The first send would import scapy (half a second) and the pairs due
                # meanwhile would then leave at once: import first, then start the clock.
                await trio.to_thread.run_sync(import_scapy)
                start = trio.current_time()
                for n, offset in enumerate(self.garp.offsets()):
                    await trio.sleep_until(start + offset)
                    if n == 0:
                        await self._send_pair(ifname)
                        task_status.started()
                        continue
                    try:
                        await self._send_pair(ifname)
                    except VipError as e:
                        log.warning("gratuitous ARP for %s: %s", self.addr, e)
        finally:
            if self._announcing is scope:
                self._announcing = None
            done.set()

    async def stop_announcing(self) -> None:
        """Cancel the announcement and wait until it stopped (no-op when none runs)."""
        if self._announcing is not None and self._announce_done is not None:
            self._announcing.cancel()
            await self._announce_done.wait()

    async def _send_pair(self, ifname: str) -> None:
        # The thread is not abandoned on cancel: once stop_announcing() returns, the last
        # sendp() has returned too and nothing more leaves this node.
        await trio.to_thread.run_sync(send_garp, ifname, str(self.addr))


def virtual_ips(vip: Vip) -> list[VirtualIp]:
    """One VirtualIp per `<virtual_addr>` of the configuration."""
    return [VirtualIp.from_config(i, a) for i in vip.interfaces for a in i.addresses]


def send_garp(ifname: str, addr: str) -> None:
    """Send one gratuitous ARP pair (request, reply) for `addr` out of `ifname` (blocking)."""
    mac = _read_sys(ifname, "address")
    if mac is None:
        raise VipError(f"gratuitous ARP for {addr}: no interface {ifname}")
    ARP, Ether, sendp = import_scapy()

    frame = Ether(src=mac, dst=BROADCAST_MAC)
    request = frame / ARP(op=1, hwsrc=mac, psrc=addr, hwdst=BROADCAST_MAC, pdst=addr)
    # Linux treats a reply as gratuitous (and lets it override a recent entry) only when its
    # target MAC equals its sender MAC (arp_is_garp() in net/ipv4/arp.c), as arping -A sends.
    reply = frame / ARP(op=2, hwsrc=mac, psrc=addr, hwdst=mac, pdst=addr)
    try:
        sendp([request, reply], iface=ifname, verbose=False)
    except OSError as e:
        raise VipError(f"gratuitous ARP for {addr} on {ifname}: {e}") from e


Connection = tuple[str, str, int, int]  # (VIP, client address, client port, port on the VIP)
MAX_TICKLED = 64  # connections a heartbeat carries at most: the newest keep the rest waiting


def client_connections(addr: IPAddress) -> list[Connection]:
    """The established TCP connections of clients to `addr` on this node (its namespace)."""
    found = []
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.raddr and c.laddr.ip == str(addr):
            found.append((str(addr), str(c.raddr.ip), int(c.raddr.port), int(c.laddr.port)))
    return sorted(found)[:MAX_TICKLED]


def send_tickles(connections: list[Connection]) -> None:
    """One bogus ACK from the VIP to each client connection (blocking): see the module doc."""
    from scapy.layers.inet import IP, TCP
    from scapy.sendrecv import send

    packets = [IP(src=vip, dst=client) / TCP(sport=port, dport=client_port, flags="A")
               for vip, client, client_port, port in connections]  # fmt: skip
    if packets:
        try:
            send(packets, verbose=False)
        except OSError as e:
            raise VipError(f"tickle ACKs: {e}") from e


def connections_from_wire(data: object) -> list[Connection]:
    """The `clients` of a heartbeat; ValueError when it is not a list of connections."""
    if not isinstance(data, list) or len(data) > MAX_TICKLED:
        raise ValueError(f"not a list of at most {MAX_TICKLED} connections")
    found = []
    for item in data:
        if not (isinstance(item, list) and len(item) == 4):
            raise ValueError(f"not a connection: {item!r}")
        vip, client, client_port, port = item
        addresses_ok = all(isinstance(a, str) and _is_ip(a) for a in (vip, client))
        ports_ok = all(type(n) is int and 0 < n < 65536 for n in (client_port, port))
        if not (addresses_ok and ports_ok):
            raise ValueError(f"not a connection: {item!r}")
        found.append((vip, client, client_port, port))
    return found


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def import_scapy() -> tuple[Any, Any, Any]:
    # Imported on first use: scapy takes half a second to import, which the CLI must not pay.
    # The daemon imports it at start (Module.run), so that a failover does not.
    from scapy.layers.l2 import ARP, Ether
    from scapy.sendrecv import sendp

    return ARP, Ether, sendp


# ---------------------------------------------------------------- links


def operstate(interface: str) -> str:
    """The kernel's operstate ("up", "down", "lowerlayerdown" ...), "absent" if no such link."""
    return _read_sys(interface, "operstate") or "absent"


def link_up(interface: str) -> bool:
    """The interface can carry traffic: operstate up, or carrier when the driver says unknown.

    Drivers that do not report an operational state (dummy, some tun/tap, lo) show "unknown";
    carrier is the only sign there, and reading it fails with EINVAL when the link is down.
    """
    state = operstate(interface)
    if state == "unknown":
        return _read_sys(interface, "carrier") == "1"
    return state == "up"


def _read_sys(interface: str, attr: str) -> str | None:
    # /sys/class/net shows the network namespace sysfs was mounted in; `ip netns exec`
    # remounts it, so a daemon started that way sees its own namespace's links.
    if "/" in interface or interface in ("", ".", ".."):
        return None
    try:
        return (SYS_CLASS_NET / interface / attr).read_text().strip()
    except OSError:
        return None


# ---------------------------------------------------------------- addresses


def _subnets() -> Iterator[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    """(interface, subnet) for every address of this node's namespace."""
    for ifname, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            net = _network(a.address, a.netmask)
            if net is not None:
                yield ifname, net


def _interfaces_holding(addr: IPAddress) -> dict[str, int]:
    """{interface: prefix length} of the interfaces that have `addr` set."""
    held = {}
    for ifname, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            net = _network(a.address, a.netmask)
            if net is not None and _host(a.address) == addr:
                held[ifname] = net.prefixlen
    return held


def _host(address: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0])  # fe80::1%eth0
    except ValueError:
        return None  # a MAC address (AF_PACKET entry)


def _network(
    address: str, netmask: str | None
) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    host = _host(address)
    if host is None or netmask is None:
        return None
    mask = _host(netmask)
    if mask is None or mask.version != host.version:
        return None
    prefix = bin(int(mask)).count("1")
    return ipaddress.ip_network(f"{host}/{prefix}", strict=False)


# What `ip` says when the address is already there (add) or already gone (del): set or
# removed meanwhile, by us or by hand, which is what we wanted. Kernels with extended acks
# word it their way, older ones give strerror.
_ALREADY = {
    "add": ("address already assigned", "file exists"),
    "del": ("address not found", "cannot assign requested address"),
}


async def _ip_addr(verb: str, addr: IPAddress, prefix: int, ifname: str) -> None:
    """`ip addr add|del ADDR/PREFIX dev IF`, idempotent."""
    argv = ["ip", "addr", verb, f"{addr}/{prefix}", "dev", ifname]
    if verb == "add" and addr.version == 6:
        argv.append("nodad")  # the peer released it; waiting for DAD only delays service
    try:
        proc = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    except OSError as e:
        raise VipError(f"{' '.join(argv)}: {e}") from e
    stderr = proc.stderr.decode(errors="replace").strip()
    if proc.returncode != 0 and not any(m in stderr.lower() for m in _ALREADY[verb]):
        raise VipError(f"{' '.join(argv)} exited with {proc.returncode}: {stderr}")
