"""The rig's MySQL client: transactions through the virtual IP from hafs-client, and the
ledger of what was sent and what was acknowledged, checked against the table afterwards.

`make demo` and the fault tests (tests/rig/test_mysql_faults.py) both use it. The writer is
a process inside the client namespace (`python -m tools.riglib.client write`), so its
traffic really crosses the rig's bridge to whichever node holds the VIP; it prints one JSON
line per event (`send` before a transaction, `ack` once its COMMIT returned, `error` when the
outcome is unknown) and `Writer` reads them into a `Ledger` in the parent. Timestamps are
CLOCK_MONOTONIC, the same clock in every namespace, so the parent can compare them with the
moment it injected a fault.

Every row has its own id; the table's primary key is a separate AUTO_INCREMENT, so a row
stored twice shows as a duplicate id. Transactions alternate between one autocommit INSERT
and BEGIN; three INSERTs; COMMIT, which must be all there or not at all. A transaction whose
outcome is unknown is never retried: its ids are sent but not acknowledged, and may or may
not be in the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from tools.riglib.node import REPO, VIP
from tools.riglib.rig import NODES, PREFIX, PersistentRig, RigError

TABLE = "ledger"
CREATE_TABLE = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} (seq BIGINT AUTO_INCREMENT PRIMARY KEY, "
    "id BIGINT NOT NULL, txn BIGINT NOT NULL, kind VARCHAR(12) NOT NULL, KEY (id)) "
    "ENGINE=InnoDB"
)
ROWS_PER_TRANSACTION = 3  # the multi-statement transactions; autocommit ones have one row
CONNECT_TIMEOUT = 2  # seconds: a node that is gone must not hold the writer long
IO_TIMEOUT = 10  # a COMMIT that stalls longer has an unknown outcome
MAX_SECONDS = 900.0  # the writer stops by itself after this, whatever happens to its parent
STOP_TIMEOUT = 2 * IO_TIMEOUT + 5


# ---------------------------------------------------------------------- inside hafs-client


def _emit(event: str, **fields: Any) -> None:
    print(json.dumps({"ev": event, "t": time.monotonic(), **fields}), flush=True)


def write(args: argparse.Namespace) -> int:
    """The writer loop, run inside the client namespace until SIGTERM or `args.seconds`."""
    import pymysql

    stopping = threading.Event()

    def stop(_signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    deadline = time.monotonic() + args.seconds
    next_id, txn = args.first_id, args.first_txn
    conn: Any = None
    down_since: float | None = None
    while not stopping.is_set() and time.monotonic() < deadline:
        if conn is None:
            try:
                conn = pymysql.connect(
                    host=args.host, user=args.user, password=args.password,
                    database=args.database, connect_timeout=CONNECT_TIMEOUT,
                    read_timeout=IO_TIMEOUT, write_timeout=IO_TIMEOUT, autocommit=True,
                )  # fmt: skip
            except pymysql.Error as e:
                if down_since is None:
                    down_since = time.monotonic()
                    _emit("down", msg=str(e))
                time.sleep(0.2)
                continue
            down_since = None
            _emit("connected")
        multi = txn % 2 == 1
        ids = list(range(next_id, next_id + (ROWS_PER_TRANSACTION if multi else 1)))
        next_id += len(ids)
        _emit("send", txn=txn, ids=ids)
        try:
            with conn.cursor() as cur:
                if multi:
                    cur.execute("BEGIN")
                for i in ids:
                    cur.execute(
                        f"INSERT INTO {TABLE} (id, txn, kind) VALUES (%s, %s, %s)",
                        (i, txn, "transaction" if multi else "autocommit"),
                    )
                if multi:
                    cur.execute("COMMIT")
            _emit("ack", txn=txn, ids=ids)
        except pymysql.Error as e:
            _emit("error", txn=txn, msg=str(e))
            with contextlib.suppress(Exception):
                conn.close()
            conn = None
        txn += 1
        if args.interval:
            time.sleep(args.interval)
    return 0


def arp(args: argparse.Namespace) -> int:
    """Ask who has `args.address` (a broadcast ARP request from eth0); print every MAC that
    answered, as a JSON list."""
    from scapy.layers.l2 import ARP, Ether
    from scapy.sendrecv import srp

    request = Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(pdst=args.address)
    answered, _ = srp(request, iface="eth0", timeout=args.timeout, multi=True, verbose=0)
    print(json.dumps(sorted({reply.hwsrc for _, reply in answered})))
    return 0


# ---------------------------------------------------------------------- in the parent


@dataclass
class Ledger:
    """What the client sent and what the cluster acknowledged, across writers."""

    sent: dict[int, list[int]] = field(default_factory=dict)  # txn -> ids
    acked: dict[int, float] = field(default_factory=dict)  # txn -> when its COMMIT returned
    errors: list[tuple[float, str]] = field(default_factory=list)
    next_id: int = 1
    next_txn: int = 1

    def record(self, event: dict[str, Any]) -> None:
        kind = event["ev"]
        if kind == "send":
            self.sent[event["txn"]] = event["ids"]
            self.next_id = max(self.next_id, event["ids"][-1] + 1)
            self.next_txn = max(self.next_txn, event["txn"] + 1)
        elif kind == "ack":
            self.acked[event["txn"]] = event["t"]
        elif kind in ("error", "down"):
            self.errors.append((event["t"], event["msg"]))

    def acked_rows(self) -> int:
        return sum(len(self.sent[t]) for t in self.acked)

    def first_ack_after(self, moment: float) -> float | None:
        return min((t for t in self.acked.values() if t > moment), default=None)

    def longest_gap(self, since: float, until: float) -> float:
        """The longest time without an acknowledged commit between two moments."""
        times = sorted(t for t in self.acked.values() if since < t < until)
        marks = [since, *times, until]
        return max(b - a for a, b in zip(marks, marks[1:], strict=False))

    def check(self, rows: list[tuple[int, int]]) -> LedgerCheck:
        """Compare the table's (id, txn) rows with the ledger."""
        return LedgerCheck.of(self, rows)


@dataclass(frozen=True)
class LedgerCheck:
    """The table against the ledger: `problems` is empty when every acknowledged
    transaction is there exactly once, whole, and nothing the client never sent is."""

    acked_txns: int
    acked_rows: int
    rows: int
    unacked_present: int  # sent, outcome unknown, committed after all
    problems: tuple[str, ...]

    @classmethod
    def of(cls, ledger: Ledger, rows: list[tuple[int, int]]) -> LedgerCheck:
        count = Counter(i for i, _ in rows)
        txn_of = {i: t for t, ids in ledger.sent.items() for i in ids}
        problems = []
        twice = sorted(i for i, n in count.items() if n > 1)
        if twice:
            problems.append(f"{len(twice)} ids stored more than once: {twice[:10]}")
        never_sent = sorted(i for i in count if i not in txn_of)
        if never_sent:
            problems.append(f"{len(never_sent)} rows the client never sent: {never_sent[:10]}")
        wrong_txn = sorted(i for i, t in rows if i in txn_of and txn_of[i] != t)
        if wrong_txn:
            problems.append(f"{len(wrong_txn)} rows with another transaction: {wrong_txn[:10]}")
        lost = sorted(t for t in ledger.acked if any(i not in count for i in ledger.sent[t]))
        if lost:
            problems.append(f"{len(lost)} acknowledged transactions missing: {lost[:10]}")
        partial = sorted(
            t for t, ids in ledger.sent.items() if 0 < sum(i in count for i in ids) < len(ids)
        )
        if partial:
            problems.append(f"{len(partial)} transactions stored in part: {partial[:10]}")
        unacked = sum(
            1 for t, ids in ledger.sent.items() if t not in ledger.acked and ids[0] in count
        )
        return cls(len(ledger.acked), ledger.acked_rows(), len(rows), unacked, tuple(problems))

    def summary(self) -> str:
        verdict = "OK" if not self.problems else "; ".join(self.problems)
        return (
            f"{self.acked_txns} transactions acknowledged ({self.acked_rows} rows), "
            f"{self.rows} rows in the table, {self.unacked_present} unacknowledged "
            f"transactions committed after all: {verdict}"
        )


class Writer:
    """The writer process in the client namespace, feeding `ledger` from a reader thread."""

    def __init__(self, netns: str, ledger: Ledger, interval: float = 0.01) -> None:
        self.ledger = ledger
        self.lock = threading.Lock()
        argv = ["ip", "netns", "exec", netns, sys.executable, "-m", "tools.riglib.client",
                "write", "--first-id", str(ledger.next_id), "--first-txn",
                str(ledger.next_txn), "--interval", str(interval)]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )  # fmt: skip
        self.reader = threading.Thread(target=self._read, name="ledger-reader", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.lock:
                self.ledger.record(json.loads(line))

    def acked(self) -> int:
        with self.lock:
            return len(self.ledger.acked)

    def acks_after(self, moment: float) -> int:
        with self.lock:
            return sum(1 for t in self.ledger.acked.values() if t > moment)

    def longest_gap(self, since: float, until: float | None = None) -> float:
        with self.lock:
            return self.ledger.longest_gap(since, until or time.monotonic())

    def wait_acks(self, n: int, timeout: float) -> None:
        """Until `n` more transactions are acknowledged (the load really flows)."""
        target = self.acked() + n
        deadline = time.monotonic() + timeout
        while self.acked() < target:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise WriterError(f"{self.acked()} of {target} acknowledged: {self.stderr()}")
            time.sleep(0.1)

    def first_ack_after(self, moment: float, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                first = self.ledger.first_ack_after(moment)
            if first is not None:
                return first
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise WriterError(f"no commit acknowledged in {timeout:g} s: {self.stderr()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM: the writer ends after its current transaction."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(5)

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return "(writer running)"
        return self.proc.stderr.read()[-2000:]


class WriterError(AssertionError):
    """The writer did not get the acknowledgements waited for."""


# ---------------------------------------------------------------------- on the rig


def power_cut(rig: PersistentRig, writer: Writer, node: str, timeout: float) -> tuple[float, float]:
    """Kill `node` under load: when (monotonic) it was cut, and when the first commit was
    acknowledged once it was dead; the difference is the failover a client sees."""
    writer.wait_acks(100, 60)
    killed = time.monotonic()
    rig.kill(node)
    return killed, writer.first_ack_after(time.monotonic(), timeout)


def start_writer(rig: PersistentRig, ledger: Ledger, interval: float = 0.01) -> Writer:
    """Create the table if needed and start writing through the VIP."""
    _sql(rig, CREATE_TABLE)
    return Writer(PREFIX + "client", ledger, interval)


def check_table(rig: PersistentRig, ledger: Ledger) -> LedgerCheck:
    """The table as the node serving the VIP has it, against the ledger."""
    rows = []
    for line in _sql(rig, f"SELECT id, txn FROM {TABLE}").splitlines():
        if line.strip():
            i, t = line.split("\t")
            rows.append((int(i), int(t)))
    return ledger.check(rows)


def _sql(rig: PersistentRig, query: str) -> str:
    reply = rig.client_sql(query)
    if reply.returncode != 0:
        raise RigError(f"{query}: {reply.stderr.strip()}")
    return reply.stdout


def vip_answerers(rig: PersistentRig) -> list[str]:
    """Which namespaces answer ARP for the VIP, asked from the client (node names, or the
    MAC when it is no rig node's)."""
    reply = rig.host("client").run(
        [sys.executable, "-m", "tools.riglib.client", "arp", VIP], check=False, timeout=60, cwd=REPO
    )
    if reply.returncode != 0:
        raise RigError(f"arp {VIP}: {reply.stderr.strip()}")
    names = {rig.host(n).mac: n for n in NODES}
    return [names.get(mac, mac) for mac in json.loads(reply.stdout)]


def vip_holders(rig: PersistentRig) -> list[str]:
    """The nodes with the VIP on an interface."""
    return [n for n in NODES if any(a.startswith(VIP + "/") for a in rig.host(n).addresses())]


def main(argv: list[str] | None = None) -> int:
    top = argparse.ArgumentParser(prog="python -m tools.riglib.client")
    sub = top.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="insert rows through the VIP, one JSON line per event")
    w.set_defaults(run=write)
    w.add_argument("--host", default=VIP)
    w.add_argument("--user", default="hafs")
    w.add_argument("--password", default="hafs")
    w.add_argument("--database", default="hafs")
    w.add_argument("--first-id", type=int, default=1)
    w.add_argument("--first-txn", type=int, default=1)
    w.add_argument("--interval", type=float, default=0.01, help="seconds between transactions")
    w.add_argument("--seconds", type=float, default=MAX_SECONDS)
    a = sub.add_parser("arp", help="the MACs that answer ARP for ADDRESS, as JSON")
    a.set_defaults(run=arp)
    a.add_argument("address", nargs="?", default=VIP)
    a.add_argument("--timeout", type=float, default=2.0)
    args = top.parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
