"""`make bench-failover`: how long a SECOND takes to replace a primary that lost power.

Two real daemons in network namespaces (tests/support/rig.py), a test application (a
sleep started by start_prim), `<heart timeout>` 3 s and pulse 0.7 s unless told otherwise.
Each repeat: node1 PRIM, node2 SECOND; node1's every process is killed at once; the times
come from node2's module log (wall clock, so the CLI's start-up does not count):
- decided: node2 decides to go ALONE (heartbeat timeout + the witness question);
- serving: start_prim has finished on node2 (mount, VIP, gratuitous ARP, application).
The baseline printed beside them is the configured heart timeout, the floor of any
heartbeat-based failover. Ends with `failover_s MEDIAN` (serving).

Run from the repo: .venv/bin/python bench/failover.py [--repeats N] [--timeout MS]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.rig import RigNode, establish, logged_at, two_node_rig  # noqa: E402


def logged_when(node: RigNode, text: str, timeout: float = 30) -> float:
    """When `text` first appears in the node's module log (waits for it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(StopIteration):
            return logged_at(node.module_log(), text)
        time.sleep(0.1)
    raise TimeoutError(f"{node.name}: no {text!r} in the module log\n{node.tail()}")


def one_failover(timeout_ms: int, pulse_ms: int) -> tuple[float, float]:
    base = Path(tempfile.mkdtemp(prefix="hb", dir="/var/tmp"))
    base.chmod(0o755)
    try:
        with two_node_rig(base, timeout=timeout_ms, pulse=pulse_ms) as rig:
            establish(rig)
            killed = time.time()
            rig.node1.kill()
            decided = logged_when(rig.node2, "Transition SECOND -> ALONE") - killed
            serving = (
                logged_when(rig.node2, "script start_prim SECOND ALONE start: exited") - killed
            )
            return decided, serving
    finally:
        shutil.rmtree(base, ignore_errors=True)


def mysql_failovers(repeats: int, timeout: float = 90.0) -> list[float]:
    """On the MySQL rig (tools/rig, `<heart timeout="3000">`, the arbitrating witness): a
    client commits through the VIP from hafs-client; the primary loses power; the seconds
    from the cut to the client's first commit acknowledged after it (what a client sees:
    detection, witness, mount, VIP, MariaDB's recovery, its reconnection). The node boots
    and rejoins; the next repeat cuts the other one, the primary then."""
    from tools.riglib import rig as riglib
    from tools.riglib.client import Ledger, power_cut, start_writer

    rig = riglib.up()
    seconds: list[float] = []
    try:
        prim, second = "node1", "node2"
        for _ in range(repeats):
            writer = start_writer(rig, Ledger())
            try:
                killed, first = power_cut(rig, writer, prim, timeout)
                seconds.append(first - killed)
                rig.boot(prim)
                rig.settled(second, prim)
            finally:
                writer.stop()
            prim, second = second, prim
    finally:
        riglib.down()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=int, default=3000, help="<heart timeout> in ms")
    parser.add_argument("--pulse", type=int, default=700, help="<heart pulse> in ms")
    args = parser.parse_args()
    floor = args.timeout / 1000
    serving = []
    for i in range(args.repeats):
        d, s = one_failover(args.timeout, args.pulse)
        serving.append(s)
        print(f"repeat {i + 1}: decided {d:.2f} s, serving {s:.2f} s "
              f"(heart timeout {floor:g} s: x{s / floor:.2f})", flush=True)  # fmt: skip
    median = statistics.median(serving)
    print(f"ratio failover_vs_heart_timeout {median / floor:.2f}")
    print(f"failover_s {median:.2f}")


if __name__ == "__main__":
    main()
