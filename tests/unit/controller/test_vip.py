"""The virtual IP: alias set and removed in namespaces, gratuitous ARP seen by a client.

VirtualIp runs inside a node's namespace through a small script (VIP_SCRIPT), so `ip`,
psutil and /sys see that node's links, as the daemon will under `ip netns exec` on the rig.
"""

from __future__ import annotations

import ipaddress
import json
import select
import socket
import subprocess
import sys
from collections.abc import Collection
from typing import Any

import pytest
import trio
import trio.testing

from controller import vip as vip_module
from controller.config import Vip, VipInterface, VirtualAddress
from controller.vip import GarpTiming, VipError, VirtualIp, virtual_ips
from tests.support.netns import NetnsLab, Node

NET = "10.77.7"
VIP = f"{NET}.100"

# Runs `ops` in order on one VirtualIp and prints each outcome as JSON. A short GARP schedule
# (3 pairs, a second burst 0.3 s later, no refresh) lets "announce" run to its end.
VIP_SCRIPT = r"""
import ipaddress, json, sys
import trio
from controller.vip import GarpTiming, VipError, VirtualIp

spec = json.loads(sys.argv[1])

async def main():
    timing = GarpTiming(count=3, interval=0.05, repeat_delay=0.3, refresh_for=0)
    vip = VirtualIp(ipaddress.ip_address(spec["addr"]), spec.get("interface"),
                    arpreroute=spec.get("arpreroute", False), garp=timing)
    out = []
    for op in spec["ops"]:
        try:
            if op == "held":
                out.append(vip.held())
            elif op == "announce":
                async with trio.open_nursery() as nursery:
                    await nursery.start(vip.announce)
                out.append("ok")
            else:
                await getattr(vip, op)()
                out.append("ok")
        except VipError as e:
            out.append(f"VipError: {e}")
    print(json.dumps(out))

trio.run(main)
"""

# Prints "ready" once capturing, then every ARP packet for the address in argv[1] as JSON,
# until argv[2] of them were seen or argv[3] seconds passed.
SNIFF_SCRIPT = r"""
import json, sys
from scapy.layers.l2 import ARP, Ether
from scapy.sendrecv import sniff

vip, count, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
packets = sniff(iface="eth0", count=count, timeout=timeout,
                lfilter=lambda p: ARP in p and p[ARP].psrc == vip,
                started_callback=lambda: print("ready", flush=True))
for p in packets:
    a = p[ARP]
    print(json.dumps({"time": float(p.time), "dst": p[Ether].dst, "op": a.op,
                      "hwsrc": a.hwsrc, "hwdst": a.hwdst, "psrc": a.psrc, "pdst": a.pdst}))
"""


def vip_ops(node: Node, *ops: str, addr: str = VIP, **spec: Any) -> list[Any]:
    out = node.python(VIP_SCRIPT, json.dumps({"addr": addr, "ops": ops, **spec}))
    result: list[Any] = json.loads(out.stdout)
    return result


def lab_with(lab: NetnsLab, *names: str) -> list[Node]:
    lab.add_bridge()
    hosts = {"node1": 1, "node2": 2, "client": 10}
    return [lab.add_node(n, f"{NET}.{hosts[n]}/24") for n in names]


def readline(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


# ---------------------------------------------------------------- in namespaces


def test_take_and_release_are_idempotent(netns_lab: NetnsLab) -> None:
    (node1,) = lab_with(netns_lab, "node1")

    assert vip_ops(node1, "held", "take", "take", "held") == [False, "ok", "ok", True]
    assert node1.addresses().count(f"{VIP}/24") == 1  # the subnet's prefix, set once

    assert vip_ops(node1, "release", "release", "held") == ["ok", "ok", False]
    assert node1.addresses() == [f"{NET}.1/24"]


# What take() and release() do when the address changed between their look and their `ip`
# command: set twice, removed twice, without an error.
RACE_SCRIPT = r"""
import ipaddress, json, sys
import trio
from controller.vip import _ip_addr

async def main():
    addr = ipaddress.ip_address(sys.argv[1])
    for verb in ("add", "add", "del", "del"):
        await _ip_addr(verb, addr, 24, "eth0")

trio.run(main)
"""


def test_address_changed_under_our_feet(netns_lab: NetnsLab) -> None:
    (node1,) = lab_with(netns_lab, "node1")
    node1.python(RACE_SCRIPT, VIP)
    assert node1.addresses() == [f"{NET}.1/24"]


def test_placement_and_errors(netns_lab: NetnsLab) -> None:
    (node1,) = lab_with(netns_lab, "node1")

    # Named interface without a subnet holding the address: a host prefix.
    assert vip_ops(node1, "take", addr="10.99.0.100", interface="eth0") == ["ok"]
    assert "10.99.0.100/32" in node1.addresses()

    (missing,) = vip_ops(node1, "take", interface="nosuch0")
    assert missing.startswith("VipError: ip addr add 10.77.7.100/32 dev nosuch0 exited with")
    assert "nosuch0" in missing  # ip's own stderr: Cannot find device "nosuch0"

    (unplaced,) = vip_ops(node1, "take", addr="10.99.1.100")
    assert unplaced == (
        "VipError: no interface has a subnet holding 10.99.1.100: name one in <interface name=...>"
    )


def test_client_follows_the_vip_by_gratuitous_arp(netns_lab: NetnsLab) -> None:
    node1, node2, client = lab_with(netns_lab, "node1", "node2", "client")
    # Linux creates a neighbour entry from an unsolicited ARP only with arp_accept; it
    # updates an existing one without. Pin the default the client may have inherited from
    # the host, so the test shows what a stock client does: it learnt the VIP by talking to
    # node1, and it must move to node2 from the announcement alone.
    for conf in ("all", "eth0"):
        client.sysctl(f"net.ipv4.conf.{conf}.arp_accept", 0)

    assert vip_ops(node1, "take") == ["ok"]
    client.run(["ping", "-c", "1", "-W", "2", VIP])
    assert client.arp_table()[VIP] == node1.mac

    assert vip_ops(node1, "release") == ["ok"]
    # Control: setting the address announces nothing by itself; the client still points
    # at node1, and would until its entry went stale and failed a probe.
    assert vip_ops(node2, "take", "release") == ["ok", "ok"]
    assert client.arp_table()[VIP] == node1.mac

    sniffer = client.popen(
        [sys.executable, "-c", SNIFF_SCRIPT, VIP, "12", "10"], stdout=subprocess.PIPE, text=True
    )
    assert readline(sniffer, 10).strip() == "ready"
    assert vip_ops(node2, "take", "announce", arpreroute=True) == ["ok", "ok"]
    # The client sent nothing to the VIP since node1 released it.
    assert client.arp_table()[VIP] == node2.mac

    out, _ = sniffer.communicate(timeout=15)
    packets = [json.loads(line) for line in out.splitlines()]
    assert len(packets) == 12  # 2 bursts of 3 pairs
    assert [p["op"] for p in packets] == [1, 2] * 6
    for p in packets:
        assert (p["dst"], p["hwsrc"], p["psrc"], p["pdst"]) == (
            "ff:ff:ff:ff:ff:ff",
            node2.mac,
            VIP,
            VIP,
        )
        assert p["hwdst"] == ("ff:ff:ff:ff:ff:ff" if p["op"] == 1 else node2.mac)
    assert packets[6]["time"] - packets[0]["time"] >= 0.25  # the second burst came later

    client.run(["ping", "-c", "1", "-W", "2", VIP])
    assert client.arp_table()[VIP] == node2.mac


# ---------------------------------------------------------------- schedule, no network


def test_garp_schedule() -> None:
    assert list(GarpTiming(refresh_for=0).offsets()) == pytest.approx(
        [0, 0.2, 0.4, 0.6, 0.8, 5.0, 5.2, 5.4, 5.6, 5.8]
    )
    offsets = list(GarpTiming(refresh_interval=30, refresh_for=600).offsets())
    assert offsets[10:] == [30.0 * k for k in range(1, 21)]
    assert list(GarpTiming(count=1, repeat_delay=0, refresh_for=0).offsets()) == [0]


def test_from_config() -> None:
    addr = ipaddress.ip_address("192.0.2.100")
    itf = VipInterface((VirtualAddress(addr),), "eth1", arpreroute=True, arpinterval=30.0)
    (vip,) = virtual_ips(Vip((itf,)))
    assert (vip.addr, vip.interface, vip.arpreroute) == (addr, "eth1", True)
    assert (vip.garp.refresh_interval, vip.garp.refresh_for) == (30.0, 1200.0)


def recording_vip(sent: list[float], fail_at: Collection[int] = ()) -> VirtualIp:
    # interface="lo" is only read to place the address: nothing is set on this host.
    vip = VirtualIp(ipaddress.ip_address("192.0.2.100"), "lo", arpreroute=True)

    async def send_pair(ifname: str) -> None:
        n = len(sent)
        sent.append(trio.current_time())
        if n in fail_at:
            raise VipError("sendp failed")

    vip._send_pair = send_pair  # type: ignore[method-assign]
    return vip


@pytest.fixture
def no_scapy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sends are faked: spare the tests scapy's import."""
    monkeypatch.setattr(vip_module, "import_scapy", lambda: (None, None, None))


@pytest.mark.usefixtures("no_scapy")
def test_announce_schedule_and_stop() -> None:
    sent: list[float] = []
    vip = recording_vip(sent)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(vip.announce)
            assert sent == [0.0]  # started() comes after the first pair
            await trio.sleep(6)
            assert len(sent) == 10
            await trio.sleep(60)
            assert len(sent) == 11  # the first refresh
            await nursery.start(vip.announce)  # a second take: the schedule starts over
            assert len(sent) == 12
            await trio.sleep(1)
            assert len(sent) == 16  # one burst, not two interleaved
            await vip.stop_announcing()
            stopped = len(sent)
            await trio.sleep(3600)
            assert len(sent) == stopped
            await vip.stop_announcing()  # nothing to stop: fine

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert sent[:10] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 5.0, 5.2, 5.4, 5.6, 5.8])


@pytest.mark.usefixtures("no_scapy")
def test_announce_failures() -> None:
    async def main() -> None:
        sent: list[float] = []
        first_fails = recording_vip(sent, fail_at={0})
        async with trio.open_nursery() as nursery:
            with pytest.raises(VipError, match="sendp failed"):
                await nursery.start(first_fails.announce)

        sent = []
        later_fails = recording_vip(sent, fail_at={1, 2})
        async with trio.open_nursery() as nursery:
            await nursery.start(later_fails.announce)
            await trio.sleep(6)  # logged, not raised: the schedule goes on
            assert len(sent) == 10
            nursery.cancel_scope.cancel()

        quiet = VirtualIp(ipaddress.ip_address("192.0.2.100"), "lo", arpreroute=False)
        async with trio.open_nursery() as nursery:
            await nursery.start(quiet.announce)  # arpreroute off: returns at once, sends none

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


# ---------------------------------------------------------------- tickle ACKs


def test_client_connections_lists_the_established_connections_to_the_address() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            with accepted:
                found = vip_module.client_connections(ipaddress.ip_address("127.0.0.1"))
                mine = ("127.0.0.1", "127.0.0.1", client.getsockname()[1], port)
                assert mine in found
                assert all(c[0] == "127.0.0.1" for c in found)
    assert not vip_module.client_connections(ipaddress.ip_address("192.0.2.1"))


@pytest.mark.parametrize(
    "clients",
    [
        "10.0.0.1",
        [["10.0.0.100", "10.0.0.10", 40000]],
        [["10.0.0.100", "not-an-ip", 40000, 3306]],
        [["10.0.0.100", "10.0.0.10", 0, 3306]],
        [["10.0.0.100", "10.0.0.10", True, 3306]],
        [[167772260, "10.0.0.10", 40000, 3306]],
        [["10.0.0.100", "10.0.0.10", 40000, 3306]] * (vip_module.MAX_TICKLED + 1),
    ],
)
def test_a_heartbeat_client_list_that_is_not_one_is_refused(clients: object) -> None:
    with pytest.raises(ValueError):
        vip_module.connections_from_wire(clients)


def test_a_heartbeat_client_list_round_trips() -> None:
    wire = [["10.0.0.100", "10.0.0.10", 40000, 3306]]
    assert vip_module.connections_from_wire(wire) == [("10.0.0.100", "10.0.0.10", 40000, 3306)]
