"""No acknowledged commit lost under faults, on the persistent MySQL rig (issue 5).

A client in hafs-client commits through the virtual IP (tools/riglib/client.py: autocommit
INSERTs and 3-row transactions, each acknowledged commit recorded) while a fault is injected
with tools/rig's own commands. After each: every acknowledged transaction is in the table of
the node serving the VIP, once and whole; no row the client never sent is there; exactly one
node answers ARP for the VIP; and once the faulty node is back, `hafs verify` on the PRIM
says identical. The failover (or stall) time is printed, never asserted: this machine is
shared.

The rig has fixed names: these tests run one at a time, each on a fresh rig that the fixture
takes down even when the test fails.
"""

from __future__ import annotations

import time

import pytest

from tests.rig.test_mysql_rig import mysql_rig  # noqa: F401  the fixture: up, then down
from tools.riglib.client import (
    Ledger,
    Writer,
    check_table,
    power_cut,
    start_writer,
    vip_answerers,
)
from tools.riglib.rig import MODULE, NODES, PersistentRig

pytestmark = [pytest.mark.mariadb, pytest.mark.usefixtures("mysql_rig")]

FAILOVER_TIMEOUT = 90.0


def report(test: str, **facts: object) -> None:
    print(f"\n[{test}] " + ", ".join(f"{k}={v}" for k, v in facts.items()), flush=True)


def assert_served_by(rig: PersistentRig, ledger: Ledger, node: str) -> None:
    result = check_table(rig, ledger)
    assert result.problems == (), result.summary()
    assert vip_answerers(rig) == [node]


def assert_identical(rig: PersistentRig, prim: str) -> None:
    verify = rig.node(prim).hafs("verify", "-m", MODULE, check=False, timeout=600)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "identical" in verify.stdout, verify.stdout


def power_cut_pause(rig: PersistentRig, writer: Writer, node: str) -> float:
    """Kill `node` under load: the seconds from the cut to the first commit acknowledged
    once the node is dead, or the longest pause of the client's commits around it."""
    killed, first = power_cut(rig, writer, node, FAILOVER_TIMEOUT)
    writer.wait_acks(20, 60)
    return max(first - killed, writer.longest_gap(killed))


def power_loss_and_return(victim: str, survivor: str, name: str) -> None:
    """`victim` loses power under load: `survivor` serves alone with every acknowledged
    commit; `victim` boots, rejoins as SECOND and its copy is made identical."""
    rig, ledger = PersistentRig.current(), Ledger()
    writer = start_writer(rig, ledger)
    try:
        failover = power_cut_pause(rig, writer, victim)
        rig.node(survivor).wait_state("ALONE", colour="green", timeout=FAILOVER_TIMEOUT)
        writer.wait_acks(50, 60)
        rig.boot(victim)
        rig.settled(survivor, victim)
        writer.wait_acks(50, 60)
    finally:
        writer.stop()
    report(name, failover_s=f"{failover:.1f}", acked=len(ledger.acked))
    assert_served_by(rig, ledger, survivor)
    assert_identical(rig, survivor)
    if victim == "node1":  # the client's connection was on the dead primary: reset at once
        assert "tickle ACKs sent to" in rig.node(survivor).module_log()


def test_primary_power_loss() -> None:
    power_loss_and_return("node1", "node2", "primary power loss")


def test_secondary_power_loss() -> None:
    # The primary's commits wait for the lost SECOND until the replication timeout (3 s).
    power_loss_and_return("node2", "node1", "secondary power loss")


def partition(cuts: list[tuple[str, str]], serving: str, name: str) -> None:
    """Cut `cuts` under load: `serving` must be the one node serving (ALONE, VIP), the
    other must wait; heal; `serving` must have kept every acknowledged commit."""
    rig, ledger = PersistentRig.current(), Ledger()
    other = next(n for n in NODES if n != serving)
    writer = start_writer(rig, ledger)
    try:
        writer.wait_acks(100, 60)
        cut = time.monotonic()
        for a, b in cuts:
            rig.cut(a, b)
        rig.node(serving).wait_state("ALONE", colour="green", timeout=FAILOVER_TIMEOUT)
        time.sleep(5)  # the other node's heartbeat timeout (3 s) and witness question
        during = vip_answerers(rig)
        other_state = rig.node(other).state()["state"]
        writer.wait_acks(50, 60)
        failover = writer.longest_gap(cut)
        rig.heal()
        rig.settled(serving, other)
        writer.wait_acks(50, 60)
    finally:
        writer.stop()
    result = check_table(rig, ledger)
    report(name, failover_s=f"{failover:.1f}", vip_answered_by=during,
           **{other: other_state}, acked=len(ledger.acked))  # fmt: skip
    assert (during, other_state, result.problems) == ([serving], "WAIT", ()), result.summary()
    assert_served_by(rig, ledger, serving)
    assert_identical(rig, serving)


def test_cut_between_the_nodes_with_the_witness() -> None:
    # Both reach the witness: the arbitrating witness keeps node1, which renews its lease.
    partition([("node1", "node2")], "node1", "cut node1-node2")


def test_primary_cut_off_from_the_peer_and_the_witness() -> None:
    # The client still reaches node1: only the witness tells it not to serve.
    partition([("node1", "node2"), ("node1", "witness")], "node2", "node1 isolated")


def test_packet_loss_on_the_primary() -> None:
    rig, ledger = PersistentRig.current(), Ledger()
    writer = start_writer(rig, ledger)
    try:
        writer.wait_acks(100, 60)
        start = time.monotonic()
        rig.lab.loss(rig.host("node1"), 10)
        time.sleep(20)
        rig.lab.loss(rig.host("node1"), 0)
        lossy = writer.acks_after(start)
        rig.settled("node1", "node2")
        writer.wait_acks(50, 60)
        stall = writer.longest_gap(start)
    finally:
        writer.stop()
    report("10% loss on node1", longest_stall_s=f"{stall:.1f}", acked_under_loss=lossy,
           acked=len(ledger.acked))  # fmt: skip
    assert_served_by(rig, ledger, "node1")
    assert_identical(rig, "node1")


def test_power_loss_during_reintegration_under_a_rate_limit() -> None:
    rig, ledger = PersistentRig.current(), Ledger()
    node1 = rig.node("node1")
    writer = start_writer(rig, ledger)
    try:
        failover = power_cut_pause(rig, writer, "node1")
        writer.wait_acks(200, 60)  # changes node1 misses: the reintegration has work to do
        rig.lab.rate(rig.host("node1"), "1mbit")
        rig.boot("node1")
        node1.wait_state("SECOND", timeout=60)  # resynchronising: not green yet
        time.sleep(2)
        assert node1.state()["colour"] != "green", "the reintegration ended before the cut"
        rig.kill("node1")
        writer.wait_acks(50, 60)
        rig.lab.rate(rig.host("node1"), None)
        rig.boot("node1")
        rig.settled("node2", "node1")
        writer.wait_acks(50, 60)
    finally:
        writer.stop()
    report("kill during reintegration at 1mbit", failover_s=f"{failover:.1f}",
           acked=len(ledger.acked))  # fmt: skip
    assert_served_by(rig, ledger, "node2")
    assert_identical(rig, "node2")
