"""Checkers: the runner on a mock clock, processes counted for real, links and the witness in
namespaces (the checker runs inside the node's namespace through a small script)."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio
import trio.testing

from controller.checkers import Checker, CheckResult, run_checker
from controller.checkers.process import ProcessChecker
from controller.checkers.witness import reachable
from controller.config import MonitoredProcess
from tests.support.netns import NetnsLab, Node

NET = "10.77.8"

# ---------------------------------------------------------------- runner


@dataclass
class ScriptedChecker:
    """Returns the scripted results in turn (True: ok), sleeping `slow` s on each check."""

    results: list[bool]
    slow: float = 0.0
    name: str = "scripted"
    interval: float = 10.0
    polled_at: list[float] = field(default_factory=list)

    async def check(self) -> CheckResult:
        self.polled_at.append(trio.current_time())
        ok = self.results.pop(0) if self.results else True
        await trio.sleep(self.slow)
        return CheckResult(ok, f"poll {len(self.polled_at)}")


def run_polls(checker: ScriptedChecker, polls: int, **kw: Any) -> list[str]:
    """Run `checker` for `polls` polls; the details passed to on_failure."""
    failures: list[str] = []

    def on_failure(c: Checker, result: CheckResult) -> None:
        assert c is checker and not result.ok
        failures.append(result.detail)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(run_checker, checker, on_failure, **kw))
            assert len(checker.polled_at) == 1  # started() follows the first poll
            await trio.sleep(checker.interval * (polls - 1) + checker.interval / 2)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return failures


def test_runner_reports_each_failing_poll() -> None:
    checker = ScriptedChecker([True, False, False, True, False])
    assert run_polls(checker, 6) == ["poll 2", "poll 3", "poll 5"]
    assert checker.polled_at == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]


def test_runner_fall() -> None:
    checker = ScriptedChecker([False, True, False, False, False, True])
    assert run_polls(checker, 6, fall=2) == ["poll 4", "poll 5"]


def test_runner_timeout_is_a_failure_and_keeps_the_rate() -> None:
    checker = ScriptedChecker([True, True, True], slow=4.0)
    assert run_polls(checker, 3, timeout=3.0) == [
        "scripted: no answer within 3 s",
        "scripted: no answer within 3 s",
        "scripted: no answer within 3 s",
    ]
    assert checker.polled_at == [0.0, 10.0, 20.0]


# ---------------------------------------------------------------- processes


@pytest.fixture
def sleepers(tmp_path: Path) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """Three processes named hafsck<pid> (a symlink to sleep): two marked by "0.5"."""
    name = f"hafsck{os.getpid()}"  # the kernel keeps 15 characters of a name
    link = tmp_path / name
    link.symlink_to("/bin/sleep")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for args in (["600", "0.5"], ["600", "0.5"], ["600"]):
            procs.append(subprocess.Popen([str(link), *args]))
        yield name, procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def check(proc: MonitoredProcess) -> CheckResult:
    return trio.run(ProcessChecker(proc).check)


def test_process_checker(sleepers: tuple[str, list[subprocess.Popen[bytes]]]) -> None:
    name, procs = sleepers
    marked = r"^600 0\.5$"

    assert check(MonitoredProcess(name, atleast=3)) == CheckResult(True, f"{name}: 3 running")
    assert check(MonitoredProcess(name, atleast=2, argregex=marked)).ok
    assert check(MonitoredProcess("", atleast=2, nameregex=r"^hafsck\d+$", argregex=marked)).ok
    assert check(MonitoredProcess(name, atmax=1, argregex=marked)) == CheckResult(
        False, f"{name}: 2 running, at most 1 expected"
    )
    assert check(MonitoredProcess("nosuch-hafs-proc")) == CheckResult(
        False, "nosuch-hafs-proc: 0 running, at least 1 expected"
    )

    # A killed process is a zombie until reaped: it must not count.
    procs[0].send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while psutil.Process(procs[0].pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert check(MonitoredProcess(name, atleast=2, argregex=marked)) == CheckResult(
        False, f"{name}: 1 running, at least 2 expected"
    )
    label = f"nameregex=^hafsck\\d+$ argregex={marked}"
    assert check(MonitoredProcess("", atleast=2, nameregex=r"^hafsck\d+$", argregex=marked)) == (
        CheckResult(False, f"{label}: 1 running, at least 2 expected")
    )


# ---------------------------------------------------------------- interface

# The kernel's link watcher may take up to a second to publish an operstate change, as a
# checker polling every few seconds would not notice: wait for the expected side.
INTERFACE_SCRIPT = r"""
import json, sys
import trio
from controller.checkers.interface import InterfaceChecker

async def main():
    want_ok = sys.argv[1] == "up"
    out = []
    for name in sys.argv[2:]:
        with trio.move_on_after(3):
            while (r := await InterfaceChecker(name).check()).ok != want_ok:
                await trio.sleep(0.05)
        out.append([r.ok, r.detail])
    print(json.dumps(out))

trio.run(main)
"""


def intf_check(node: Node, want: str, *interfaces: str) -> list[list[Any]]:
    result: list[list[Any]] = json.loads(node.python(INTERFACE_SCRIPT, want, *interfaces).stdout)
    return result


def test_interface_checker(netns_lab: NetnsLab) -> None:
    netns_lab.add_bridge()
    node = netns_lab.add_node("node1", f"{NET}.1/24")

    assert intf_check(node, "up", "eth0", "lo") == [
        [True, "eth0: link up"],
        [True, "lo: link up"],  # lo's operstate is "unknown": its carrier says up
    ]
    assert intf_check(node, "down", "nosuch0") == [[False, "nosuch0: link absent"]]

    node.set_link(False)
    assert intf_check(node, "down", "eth0") == [[False, "eth0: link down"]]
    node.set_link(True)
    assert intf_check(node, "up", "eth0") == [[True, "eth0: link up"]]

    netns_lab.set_port(node, False)  # the cable pulled at the switch: no carrier
    ((ok, detail),) = intf_check(node, "down", "eth0")
    assert not ok and detail in ("eth0: link down", "eth0: link lowerlayerdown")


# ---------------------------------------------------------------- witness

WITNESS_SCRIPT = r"""
import json, sys, time
import trio
from controller.checkers.witness import reachable

async def main():
    out = []
    for addrs in json.loads(sys.argv[1]):
        t = time.monotonic()
        ok = await reachable(addrs, timeout=float(sys.argv[2]))
        out.append([ok, time.monotonic() - t])
    print(json.dumps(out))

trio.run(main)
"""
TIMEOUT = 1.5


def ask(node: Node, *witness_lists: list[str]) -> list[tuple[bool, float]]:
    out = node.python(WITNESS_SCRIPT, json.dumps(witness_lists), str(TIMEOUT))
    return [(ok, elapsed) for ok, elapsed in json.loads(out.stdout)]


def test_witness(netns_lab: NetnsLab) -> None:
    netns_lab.add_bridge()
    node1 = netns_lab.add_node("node1", f"{NET}.1/24")
    witness = netns_lab.add_node("witness", f"{NET}.5/24")
    nohost = f"{NET}.77"
    w = str(witness.addr)

    (alive, first_answers, dead) = ask(node1, [w], [nohost, w], [nohost])
    assert alive[0] and alive[1] < 1.0
    assert first_answers[0] and first_answers[1] < 1.0  # in parallel: no wait for the dead one
    assert not dead[0] and dead[1] < TIMEOUT + 0.5

    netns_lab.cut(node1, witness)
    ((cut_off, elapsed),) = ask(node1, [w])
    assert not cut_off and elapsed < TIMEOUT + 0.5

    netns_lab.heal()
    ((healed, _),) = ask(node1, [w])
    assert healed


def test_witness_none_configured() -> None:
    assert trio.run(reachable, []) is False
