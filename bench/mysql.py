"""`make bench` / `make bench-quick`: MariaDB on hafs against what users would run instead.

One run, on two network namespaces joined by a veth/bridge (tools/riglib/netns.py), of
sysbench oltp_write_only and oltp_read_write at 1, 4 and 16 threads on each setup:
  local              MariaDB on a plain directory (no HA: the ceiling)
  standalone         on `hafs fs mount --standalone` (the cost of FUSE alone)
  replicated         on a hafs mount in A replicated to `hafs fs replica` in B (the product)
  replicated_fsync   the same with `--ack fsync` (writes return at once; fsync waits)
  replicated_receipt the same with `--ack receipt` (fsync waits for the replica's memory)
  semisync           primary in A, replica in B, semi-sync AFTER_SYNC, GTID
  semisync_syncrelay the same with sync_relay_log=1 on the replica (acks once on its disk)
  local_binlog       (full mode) local with the binary log, sync_binlog=1: the binlog's cost
plus the 1-thread latency p50/p95, the data path figures of bench/fs.py on the first three
setups, and the failover time on the MySQL rig (bench/failover.py mysql_failovers: power cut
of the primary to the first commit through the VIP). Every figure with its ratio to local,
semisync and semisync_syncrelay; JSON in bench/results/mysql-<timestamp>.json; a PNG chart.

Run from the repo: .venv/bin/python bench/mysql.py [--quick] [--setups a,b] [--chart PNG]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import failover  # noqa: E402
from bench import fs as fsbench  # noqa: E402
from hafs.ops import Ack  # noqa: E402
from tests.support import cluster  # noqa: E402
from tests.support.mariadb import MariaDB, MariaDBError, parse_sysbench  # noqa: E402
from tools.riglib.netns import NetnsLab, Node  # noqa: E402

WORKLOADS = ("oltp_write_only", "oltp_read_write")
THREADS = (1, 4, 16)
CORE_SETUPS = ("local", "standalone", "replicated", "semisync", "semisync_syncrelay")
# hafs's named ack modes (hafs.ops.Ack), weaker than the default: reported beside it.
ACK_SETUPS = ("replicated_fsync", "replicated_receipt")
ALL_SETUPS = (*CORE_SETUPS, *ACK_SETUPS, "local_binlog")
BASELINES = {"local": "local", "semisync": "semisync", "semisync_syncrelay": "syncrelay"}
HAFS_PORT = 7700
MOUNT_ARGS = ("--no-xattrs",)  # as for MariaDB everywhere (examples/mysql, bench/fs.py)
CATCHUP_TIMEOUT = 900.0
DOCS_CHART = REPO / "docs" / "bench-mysql.png"


@dataclass(frozen=True)
class Plan:
    seconds: int  # per sysbench point
    warmup: int  # one write-only run per setup before any point
    tables: int
    rows: int
    failover_repeats: int
    fs_sizes: fsbench.Sizes
    setups: tuple[str, ...]
    pause: float = 1.0  # between points, after os.sync()


FULL = Plan(30, 10, 4, 20000, 5, fsbench.FULL, ALL_SETUPS)
QUICK = Plan(3, 1, 2, 5000, 1, fsbench.QUICK, (*CORE_SETUPS, *ACK_SETUPS), pause=0.5)


# --- the two nodes ------------------------------------------------------------------------


@dataclass
class Lab:
    """Namespaces A (primary side) and B (replica side) and the work dir on the disk."""

    work: Path
    a: Node
    b: Node

    def wrap(self, node: Node, program: str) -> Path:
        """A script that runs PROGRAM in NODE's network namespace only.

        nsenter --net rather than `ip netns exec`: the latter also makes a private mount
        namespace, and then the FUSE mount would be invisible to mariadbd and to cleanup.
        """
        path = self.work / f"in-{node.name}-{Path(program).name}"
        if not path.exists():  # setups start in parallel: a complete file, renamed into place
            tmp = path.with_name(f"{path.name}.{threading.get_ident()}")
            tmp.write_text(
                f'#!/bin/sh\nexec nsenter --net=/run/netns/{node.netns} {program} "$@"\n'
            )
            tmp.chmod(0o755)
            tmp.replace(path)
        return path


@contextlib.contextmanager
def two_nodes(work: Path) -> Iterator[Lab]:
    with NetnsLab(prefix=f"hbench{os.getpid()}-") as lab:
        lab.add_bridge()
        a = lab.add_node("a", "10.79.0.1/24")
        b = lab.add_node("b", "10.79.0.2/24")
        yield Lab(work, a, b)


def ping_rtt_ms(lab: Lab) -> float:
    out = lab.a.run(["ping", "-q", "-c", "20", "-i", "0.05", str(lab.b.addr)]).stdout
    m = re.search(r"= [\d.]+/([\d.]+)/", out)
    return float(m.group(1)) if m else float("nan")


# --- setups -------------------------------------------------------------------------------


@dataclass
class Setup:
    name: str
    db: MariaDB
    target: fsbench.Target | None = None  # local / hafs dir: bench/fs.py's data path figures
    replica: MariaDB | None = None  # semi-sync replica in B
    hafs_in_a: Path | None = None  # `hafs` in namespace A, for `hafs fs verify`
    hafs_procs: list[cluster.HafsProc] = field(default_factory=list)


def _server(lab: Lab, node: Node, datadir: Path, **kw: Any) -> MariaDB:
    """A MariaDB (the same durability settings everywhere) whose mariadbd runs in NODE."""
    db = MariaDB(datadir, **kw)
    db.mariadbd = str(lab.wrap(node, db.mariadbd))
    # Its own tmpdir: installs run in parallel, and a shared /tmp of #sql-temptable files
    # once lost one install's temporary table ("Unknown table 'mysql.tmp_proxies_priv'").
    db.extra_cnf = {"tmpdir": str(db.rundir), **db.extra_cnf}
    return db


@contextlib.contextmanager
def local_setup(lab: Lab, binlog: bool = False) -> Iterator[Setup]:
    name = "local_binlog" if binlog else "local"
    d = lab.work / name
    d.mkdir()
    with _server(lab, lab.a, d / "mysql", binlog=binlog) as db:
        yield Setup(name, db, None if binlog else fsbench.Target(d))


@contextlib.contextmanager
def standalone_setup(lab: Lab) -> Iterator[Setup]:
    with (
        fsbench.standalone_setup(lab.work, MOUNT_ARGS) as target,
        _server(lab, lab.a, target.path / "mysql") as db,
    ):
        assert target.mount is not None
        yield Setup("standalone", db, target, hafs_procs=[target.mount])


@contextlib.contextmanager
def replicated_setup(lab: Lab, ack: str = "applied") -> Iterator[Setup]:
    """fs.replicated_setup's pair, but the replica listens in B and the mount runs in A."""
    name = "replicated" if ack == "applied" else f"replicated_{ack}"
    dirs = [lab.work / f"{name}-{n}" for n in ("backing", "mnt", "replica")]
    for d in dirs:
        d.mkdir()
    key = cluster.keygen(lab.work / f"{name}.key")
    port = HAFS_PORT + list(Ack).index(Ack(ack))
    peer, hafs_a = f"{lab.b.addr}:{port}", lab.wrap(lab.a, str(cluster.HAFS_BIN))
    rstate, mstate = lab.work / f"{name}-rstate", lab.work / f"{name}-mstate"
    args = (*MOUNT_ARGS, "--ack", ack)
    with (
        cluster.replica(dirs[2], listen=peer, key=key, state_dir=rstate,
                        hafs_bin=lab.wrap(lab.b, str(cluster.HAFS_BIN))) as rproc,
        cluster.mount(dirs[0], peer=peer, key=key, mountpoint=dirs[1], state_dir=mstate,
                      hafs_bin=hafs_a, extra_args=args) as mproc,
        _server(lab, lab.a, dirs[1] / "mysql") as db,
    ):  # fmt: skip
        target = fsbench.Target(dirs[1], mount=mproc, peer=peer, key=key, backing=dirs[0])
        yield Setup(name, db, target, hafs_in_a=hafs_a, hafs_procs=[mproc, rproc])


PRIMARY_CNF = {
    "bind-address": "0.0.0.0",
    "binlog_format": "ROW",
    "gtid_strict_mode": "ON",
    "rpl_semi_sync_master_wait_point": "AFTER_SYNC",
}


def replica_cnf(syncrelay: bool) -> dict[str, str]:
    cnf = {
        "bind-address": "0.0.0.0",
        "server-id": "2",
        "gtid_strict_mode": "ON",
        "relay-log": "relay-bin",
        "rpl_semi_sync_slave_enabled": "1",
    }
    if syncrelay:
        # With GTID the replica's position is mysql.gtid_slave_pos (InnoDB, committed with
        # the applied transaction), so relay-log.info / master.info carry no durability:
        # only the relay log itself must be on disk before the ack.
        cnf["sync_relay_log"] = "1"
    return cnf


@contextlib.contextmanager
def semisync_setup(lab: Lab, syncrelay: bool) -> Iterator[Setup]:
    name = "semisync_syncrelay" if syncrelay else "semisync"
    port = 3307 if syncrelay else 3306
    d = lab.work / name
    primary = _server(lab, lab.a, d / "primary", binlog=True, port=port, extra_cnf=PRIMARY_CNF)
    replica = _server(lab, lab.b, d / "replica", port=port, extra_cnf=replica_cnf(syncrelay))
    with primary, replica:
        start_replication(primary, replica, f"{lab.a.addr}", port)
        yield Setup(name, primary, replica=replica)


def start_replication(primary: MariaDB, replica: MariaDB, host: str, port: int) -> None:
    # Semi-sync goes on only now: with no replica connected every commit (these users)
    # would wait rpl_semi_sync_master_timeout.
    primary.sql(
        "CREATE USER 'repl'@'%' IDENTIFIED BY 'repl';"
        "GRANT REPLICATION SLAVE ON *.* TO 'repl'@'%'; RESET MASTER;"
        "SET GLOBAL rpl_semi_sync_master_enabled = ON"
    )
    replica.sql(
        f"CHANGE MASTER TO MASTER_HOST='{host}', MASTER_PORT={port}, MASTER_USER='repl',"
        " MASTER_PASSWORD='repl', MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1;"
        "START SLAVE"
    )
    deadline = time.monotonic() + 60
    while semisync_counters(primary).get("Rpl_semi_sync_master_clients") != "1":
        if time.monotonic() > deadline:
            raise MariaDBError(f"semi-sync replica never connected: {show_status(replica)}")
        time.sleep(0.2)


SETUP_FUNCS: dict[str, Callable[[Lab], contextlib.AbstractContextManager[Setup]]] = {
    "local": local_setup,
    "standalone": standalone_setup,
    "replicated": replicated_setup,
    "replicated_fsync": lambda lab: replicated_setup(lab, "fsync"),
    "replicated_receipt": lambda lab: replicated_setup(lab, "receipt"),
    "semisync": lambda lab: semisync_setup(lab, syncrelay=False),
    "semisync_syncrelay": lambda lab: semisync_setup(lab, syncrelay=True),
    "local_binlog": lambda lab: local_setup(lab, binlog=True),
}


# --- observing the servers and hafs -------------------------------------------------------


def show_status(db: MariaDB, like: str = "%") -> dict[str, str]:
    out = db.sql(f"SHOW GLOBAL STATUS LIKE '{like}'")
    return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)


def semisync_counters(db: MariaDB) -> dict[str, str]:
    return show_status(db, "Rpl_semi_sync_master_%")


def wait_caught_up(s: Setup, timeout: float = CATCHUP_TIMEOUT) -> float:
    """Seconds until the semi-sync replica has applied everything (0 without a replica)."""
    if s.replica is None:
        return 0.0
    t0, target = time.monotonic(), s.db.sql("SELECT @@gtid_binlog_pos").strip()
    while s.replica.sql("SELECT @@gtid_slave_pos").strip() != target:
        if time.monotonic() - t0 > timeout:
            raise MariaDBError(f"{s.name}: replica not at {target} after {timeout:.0f}s")
        time.sleep(0.1)
    return time.monotonic() - t0


def semisync_check(s: Setup, before: dict[str, str], after: dict[str, str]) -> dict[str, Any]:
    """What semi-sync did during one point; `fell_back` if any commit went without an ack."""

    def delta(key: str) -> int:
        return int(after.get(key, 0)) - int(before.get(key, 0))

    waits = delta("Rpl_semi_sync_master_tx_waits")
    return {
        "yes_tx": delta("Rpl_semi_sync_master_yes_tx"),
        "no_tx": delta("Rpl_semi_sync_master_no_tx"),
        "ack_wait_avg_us": delta("Rpl_semi_sync_master_tx_wait_time") / waits if waits else 0,
        "status": after.get("Rpl_semi_sync_master_status"),
        "fell_back": delta("Rpl_semi_sync_master_no_tx") > 0
        or after.get("Rpl_semi_sync_master_status") != "ON",
    }


def hafs_rss_mb(s: Setup) -> dict[str, float]:
    rss = {}
    for p in s.hafs_procs:
        with contextlib.suppress(psutil.Error, cluster.ClusterError):
            rss[p.name] = psutil.Process(p.pid).memory_info().rss / 2**20
    return rss


# --- one sysbench point -------------------------------------------------------------------


def histogram_percentiles(output: str) -> dict[str, float]:
    """p50 (and the histogram's own p95) from sysbench's --histogram, in ms."""
    rows = [(float(v), int(c)) for v, c in re.findall(r"^\s*([\d.]+) \|\**\s+(\d+)$", output, re.M)]
    total, seen, found = sum(c for _, c in rows), 0, {}
    for value, count in rows:
        seen += count
        for pct in (50, 95):
            if f"p{pct}_hist_ms" not in found and seen >= total * pct / 100:
                found[f"p{pct}_hist_ms"] = value
    return found


def sysbench_args(plan: Plan, threads: int, seconds: int) -> list[str]:
    shape = [f"--tables={plan.tables}", f"--table-size={plan.rows}"]
    return [*shape, f"--threads={threads}", f"--time={seconds}", "--percentile=95",
            "--histogram=on"]  # fmt: skip


def prepare(s: Setup, plan: Plan) -> None:
    """sbtest tables, then a short write-only run: warm buffer pool, hafs and replicas."""
    s.db.sysbench("oltp_write_only", threads=4, seconds=plan.warmup, tables=plan.tables,
                  rows=plan.rows)  # fmt: skip
    wait_caught_up(s)


@dataclass(kw_only=True)
class Point(fsbench.Run):
    """One sysbench run: bench/fs.py's Run (metrics = parse_sysbench + percentiles)."""

    workload: str
    threads: int


def run_point(s: Setup, workload: str, threads: int, plan: Plan) -> Point:
    pt = Point(setup=s.name, round=1, workload=workload, threads=threads,
               loadavg_start=os.getloadavg()[0])  # fmt: skip
    try:
        before = semisync_counters(s.db) if s.replica else {}
        # MariaDB.sysbench() has no --histogram; its runner does (shared with the tests).
        args = sysbench_args(plan, threads, plan.seconds)
        out = s.db._sysbench(workload, "run", args, timeout=plan.seconds + 300)
        pt.metrics = {**parse_sysbench(out), **histogram_percentiles(out)}
        if s.replica:
            pt.info["semisync"] = semisync_check(s, before, semisync_counters(s.db))
            pt.info["replica_catchup_s"] = round(wait_caught_up(s), 2)
        if s.target is not None and s.target.mount is not None:
            pt.info.update(s.target.info(verify=False), rss_mb=hafs_rss_mb(s))
    except Exception as e:
        pt.error = f"{type(e).__name__}: {e}"
        progress(f"  {s.name} {workload} {threads}t FAILED: {traceback.format_exc()}")
    pt.loadavg_end = os.getloadavg()[0]
    return pt


def point_problems(pt: Point) -> list[str]:
    """What makes a point's figure meaningless or shows hafs misbehaving: said loudly."""
    where = f"{pt.setup} {pt.workload} {pt.threads}t"
    found = [f"{where}: {pt.error}"] if pt.error else []
    ss = pt.info.get("semisync", {})
    if ss.get("fell_back"):
        found.append(f"{where}: SEMI-SYNC FELL BACK TO ASYNC (no_tx +{ss['no_tx']}, "
                     f"status {ss['status']}): this figure is not semi-synchronous")  # fmt: skip
    expected = "MIRROR" if pt.setup.startswith("replicated") else "STANDALONE"
    if pt.info.get("mode", expected) != expected:
        found.append(f"{where}: hafs mount mode {pt.info['mode']} (not {expected})")
    big = {k: v for k, v in pt.info.get("rss_mb", {}).items() if v > 150}
    if big:
        found.append(f"{where}: hafs RSS over 150 MB: {big}")
    return found


def progress(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def show_point(pt: Point) -> None:
    f = pt.metrics
    shown = f"{f['tps']:.1f} tps p95 {f['p95_ms']:.2f} ms" if f else pt.error
    extra = {k: v for k, v in pt.info.items() if k != "rss_mb"}
    progress(f"  {pt.setup:<18} {pt.workload:<15} {pt.threads:>2}t  {shown}  {extra or ''}")


def run_points(setups: list[Setup], plan: Plan, points: list[Point]) -> None:
    """Per thread count, per workload, every setup in turn, starting each time with the next
    setup, so that drift and other load hit all setups alike. Appends to POINTS as it goes
    (kept if the run is cut short)."""
    turn = 0
    for threads in THREADS:
        for workload in WORKLOADS:
            progress(f"{workload}, {threads} thread(s), {plan.seconds} s per setup")
            for s in setups[turn:] + setups[:turn]:
                os.sync()  # the previous point's dirty pages must not bill this one
                time.sleep(plan.pause)
                pt = run_point(s, workload, threads, plan)
                show_point(pt)
                points.append(pt)
            turn = (turn + 1) % len(setups)


# --- the data path (bench/fs.py's figures) and the final checks -----------------------------


def data_path(setups: list[Setup], plan: Plan) -> dict[str, dict[str, Any]]:
    """bench/fs.py's fio group on the local dir and both hafs mounts of this run (the
    replicated one over the veth), in a `fio` dir beside MariaDB's datadir."""
    runs = []
    for s in setups:
        if s.target is None:
            continue
        run = fsbench.Run(s.name, 1, loadavg_start=os.getloadavg()[0])
        d = s.target.path / "fio"
        d.mkdir()
        try:
            for measure in fsbench.MEASUREMENTS["fio"]:
                os.sync()
                run.metrics.update(measure(d, plan.fs_sizes))
        except Exception as e:
            run.error = f"{type(e).__name__}: {e}"
        run.loadavg_end = os.getloadavg()[0]
        run.info = s.target.info(verify=False)
        progress(f"  data path {s.name}: {run.metrics} {run.error or ''}")
        runs.append(run)
    return fsbench.summarize(runs)


def verify_replica(s: Setup) -> str:
    """`hafs fs verify` from namespace A once MariaDB has stopped: equal trees or not."""
    t = s.target
    if t is None or t.peer is None or s.hafs_in_a is None:
        return ""
    s.db.stop()
    cmd = [str(s.hafs_in_a), "fs", "verify", str(t.backing), "--peer", t.peer, "--key", str(t.key)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    head = "; ".join((r.stdout + r.stderr).strip().splitlines()[:5])
    return f"ok: {head}" if r.returncode == 0 else f"DIFFERS (exit {r.returncode}): {head}"


def hafs_log_errors(s: Setup) -> list[str]:
    """Lines of the hafs processes' logs that look like trouble."""
    found = []
    for p in s.hafs_procs:
        with contextlib.suppress(OSError):
            for line in p.log_path.read_text(errors="replace").splitlines():
                if re.search(r"ERROR|WARNING|Traceback|\bALONE\b|HELD|FENCED", line):
                    found.append(f"{s.name} {p.name}: {line.strip()[:200]}")
    return found[:20]


def failovers(repeats: int) -> dict[str, Any]:
    """bench/failover.py on the MySQL rig: power cut of the primary to the first commit
    acknowledged through the VIP."""
    seconds = failover.mysql_failovers(repeats)
    progress(f"  failover (power cut to first commit): {' '.join(f'{s:.2f}' for s in seconds)}")
    return {"first_commit_s": seconds,
            "median_s": statistics.median(seconds) if seconds else float("nan")}  # fmt: skip


# --- figures, ratios, table, chart --------------------------------------------------------


def tps_of(points: list[Point], setup: str, workload: str, threads: int, key: str = "tps") -> float:
    for pt in points:
        if (pt.setup, pt.workload, pt.threads) == (setup, workload, threads) and key in pt.metrics:
            return pt.metrics[key]
    return float("nan")


def ratios(points: list[Point], pt: Point, key: str) -> dict[str, float]:
    """pt's figure KEY over the same figure of each baseline setup."""
    mine = pt.metrics.get(key, float("nan"))
    return {
        label: mine / base
        for base_setup, label in BASELINES.items()
        if (base := tps_of(points, base_setup, pt.workload, pt.threads, key)) == base and base
    }


def _cells(r: dict[str, float]) -> list[str]:
    return [f"{r[label]:.2f}x" if label in r else "-" for label in BASELINES.values()]


def format_table(points: list[Point], setups: Sequence[str]) -> list[str]:
    vs = [f"vs {label}" for label in BASELINES.values()]
    rows = [["workload", "thr", "setup", "tps", "p95 ms", *vs]]
    for workload in WORKLOADS:
        for threads in THREADS:
            shape = (workload, threads)
            for pt in (
                p for n in setups for p in points if (p.setup, p.workload, p.threads) == (n, *shape)
            ):
                f = pt.metrics
                tps = f"{f['tps']:,.1f}" if f else "FAILED"
                p95 = f"{f['p95_ms']:.2f}" if f else "-"
                rows.append([workload, str(threads), pt.setup, tps, p95,
                             *_cells(ratios(points, pt, "tps"))])  # fmt: skip
    return _aligned(rows) + ["(tps ratio = setup / baseline: higher is better)"]


def format_latency(points: list[Point], setups: Sequence[str]) -> list[str]:
    vs = [f"p95 vs {label}" for label in BASELINES.values()]
    rows = [["setup (oltp_write_only, 1 thread)", "p50 ms", "p95 ms", "avg ms", *vs]]
    for pt in points:
        if pt.workload != WORKLOADS[0] or pt.threads != 1 or not pt.metrics:
            continue
        f = pt.metrics
        rows.append([pt.setup, f"{f.get('p50_hist_ms', float('nan')):.2f}",
                     f"{f['p95_ms']:.2f}", f"{f['avg_ms']:.2f}",
                     *_cells(ratios(points, pt, "p95_ms"))])  # fmt: skip
    rows[1:] = sorted(rows[1:], key=lambda r: setups.index(r[0]))
    return _aligned(rows) + ["(latency of a whole transaction: 4 writes + COMMIT; lower is better)"]


def _aligned(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return [lines[0], "  ".join("-" * w for w in widths), *lines[1:]]


def headline(points: list[Point], fail: dict[str, Any]) -> list[tuple[str, float]]:
    def tps(setup: str) -> float:
        return tps_of(points, setup, "oltp_write_only", 4)

    return [
        ("ratio hafs_vs_local_4t", tps("replicated") / tps("local")),
        ("ratio hafs_vs_semisync_4t", tps("replicated") / tps("semisync")),
        ("ratio hafs_vs_syncrelay_4t", tps("replicated") / tps("semisync_syncrelay")),
        ("ratio standalone_vs_local_4t", tps("standalone") / tps("local")),
        # The named ack modes, weaker than the default (hafs.ops.Ack): for the record.
        ("ratio hafs_fsync_vs_local_4t", tps("replicated_fsync") / tps("local")),
        ("ratio hafs_fsync_vs_semisync_4t", tps("replicated_fsync") / tps("semisync")),
        ("ratio hafs_receipt_vs_semisync_4t", tps("replicated_receipt") / tps("semisync")),
        ("failover_s", fail.get("median_s", float("nan"))),
    ]


def latency_target(points: list[Point], rtt_ms: float) -> str:
    """The issue's target: hafs 1-thread p95 <= local p95 + 2 round trips + 0.5 ms."""
    hafs, local = (
        tps_of(points, s, "oltp_write_only", 1, "p95_ms") for s in ("replicated", "local")
    )
    limit = local + 2 * rtt_ms + 0.5
    verdict = "met" if hafs <= limit else "NOT met"
    return (f"latency target: hafs p95 {hafs:.2f} ms <= local p95 {local:.2f} + 2 x RTT "
            f"{rtt_ms:.3f} + 0.5 = {limit:.2f} ms: {verdict}")  # fmt: skip


def draw_chart(points: list[Point], setups: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5), gridspec_kw={"width_ratios": [3, 3, 2]})
    width = 0.8 / len(setups)
    for ax, workload in zip(axes[:2], WORKLOADS, strict=True):
        for i, name in enumerate(setups):
            values = [tps_of(points, name, workload, t) for t in THREADS]
            ax.bar([x + i * width for x in range(len(THREADS))], values, width, label=name)
        ax.set_xticks([x + width * (len(setups) - 1) / 2 for x in range(len(THREADS))])
        ax.set_xticklabels([f"{t} thr" for t in THREADS])
        ax.set_title(f"{workload} (TPS, higher is better)")
    for i, key in enumerate(("p50_hist_ms", "p95_ms")):
        values = [tps_of(points, name, "oltp_write_only", 1, key) for name in setups]
        axes[2].bar([x + i * 0.4 for x in range(len(setups))], values, 0.4, label=key[:3])
    axes[2].set_xticks([x + 0.2 for x in range(len(setups))])
    axes[2].set_xticklabels(setups, rotation=30, ha="right")
    axes[2].set_title("write_only 1 thread latency (ms)")
    axes[0].legend(fontsize=8)
    axes[2].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --- running ------------------------------------------------------------------------------


@dataclass
class Outcome:
    points: list[Point] = field(default_factory=list)
    data_path: dict[str, Any] = field(default_factory=dict)
    failover: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _start_one(lab: Lab, name: str, plan: Plan) -> tuple[Setup, contextlib.ExitStack]:
    with contextlib.ExitStack() as stack:
        s = stack.enter_context(SETUP_FUNCS[name](lab))
        prepare(s, plan)
        return s, stack.pop_all()


def start_setups(stack: contextlib.ExitStack, lab: Lab, plan: Plan, out: Outcome) -> list[Setup]:
    """Every setup up at once, so that the points can interleave; started in parallel (the
    installs wait on fsyncs, not CPU). One that fails is reported and left out."""
    progress(f"starting {', '.join(plan.setups)}")
    futures: list[Future[tuple[Setup, contextlib.ExitStack]]] = []
    try:
        with ThreadPoolExecutor(len(plan.setups)) as pool:
            futures = [pool.submit(_start_one, lab, name, plan) for name in plan.setups]
    finally:  # the pool has waited for every start: whatever came up is stopped with STACK
        for f in futures:
            if f.exception() is None:
                stack.enter_context(f.result()[1])
    setups = []
    for name, f in zip(plan.setups, futures, strict=True):
        if (e := f.exception()) is not None:
            out.problems.append(f"{name}: setup failed: {type(e).__name__}: {e}")
            progress(f"  {name} FAILED: {''.join(traceback.format_exception(e))}")
        else:
            setups.append(f.result()[0])
    return setups


def final_checks(setups: list[Setup], out: Outcome) -> None:
    for s in setups:
        if s.target is not None and s.target.mount is not None:
            info: dict[str, Any] = {**s.target.info(verify=False), "verify": verify_replica(s)}
            info["log_lines"] = hafs_log_errors(s)
            out.checks[s.name] = info
            if info["verify"].startswith("DIFFERS"):
                out.problems.append(f"{s.name}: hafs fs verify: {info['verify']}")
        if s.replica is not None:
            replica = show_status(s.replica, "Slave_running")
            out.checks[s.name] = {**replica, **show_status(s.replica, "Rpl_semi_sync_slave_%")}


def run_bench(base: Path, plan: Plan, out: Outcome) -> float:
    """Setups up, data path, the points, final checks; everything down again. Returns RTT."""
    with contextlib.ExitStack() as stack:
        lab = stack.enter_context(two_nodes(base))
        rtt = ping_rtt_ms(lab)
        progress(f"veth round trip A->B: {rtt:.3f} ms")
        setups = start_setups(stack, lab, plan, out)
        progress("data path (bench/fs.py fio group)")
        out.data_path = data_path(setups, plan)
        run_points(setups, plan, out.points)
        final_checks(setups, out)
    return rtt


def report(out: Outcome, plan: Plan, rtt: float, started: str, args: argparse.Namespace,
           loads: dict[str, str]) -> list[tuple[str, float]]:  # fmt: skip
    setups = [s for s in plan.setups if any(p.setup == s for p in out.points)]
    lines = ["", "== sysbench (one run, points interleaved) ==", *format_table(out.points, setups),
             "", "== commit latency ==", *format_latency(out.points, setups),
             latency_target(out.points, rtt), "",
             "== data path (bench/fs.py fio group; ratio to local) ==",
             fsbench.format_table(out.data_path), "",
             "== failover (MySQL rig: power cut of the primary -> first commit through the VIP,"
             " <heart timeout=3000>) ==",
             f"seconds: {out.failover.get('first_commit_s')}", "",
             f"load: before [{loads['before']}] after [{loads['after']}]"]  # fmt: skip
    for name, info in out.checks.items():
        lines.append(f"check {name}: {info}")
    lines += [f"PROBLEM: {p}" for p in out.problems] or ["problems: none"]
    print("\n".join(lines))
    chart = args.chart or (
        DOCS_CHART if not args.quick else fsbench.RESULTS / f"mysql-{started}.png"
    )
    mode = "quick" if args.quick else "full"
    draw_chart(out.points, setups, chart, f"hafs vs MariaDB semi-sync, {mode} run {started}")
    print(f"chart: {chart}")
    heads = headline(out.points, out.failover)
    fsbench.write_report(f"mysql-{started}", args, {
        "plan": asdict(plan), "veth_rtt_ms": rtt, "load": loads,
        "points": [asdict(p) for p in out.points], "data_path": out.data_path,
        "failover": out.failover, "checks": out.checks, "problems": out.problems,
        "headline": dict(heads)})  # fmt: skip
    return heads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs (make bench-quick, < 5 min)")
    p.add_argument("--setups", help=f"comma list of {','.join(ALL_SETUPS)}")
    p.add_argument("--seconds", type=int, help="per sysbench point (full 30, quick 3)")
    p.add_argument("--failover-repeats", type=int, help="full 5, quick 1; 0 skips")
    p.add_argument("--chart", type=Path, help="PNG (default: docs/bench-mysql.png; quick: results)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="on the disk")
    args = p.parse_args(argv)
    if args.setups and set(args.setups.split(",")) - set(ALL_SETUPS):
        p.error(f"--setups: choose from {','.join(ALL_SETUPS)}")
    return args


def plan_from(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    if args.setups:
        plan = replace(plan, setups=tuple(args.setups.split(",")))
    if args.seconds:
        plan = replace(plan, seconds=args.seconds)
    if args.failover_repeats is not None:
        plan = replace(plan, failover_repeats=args.failover_repeats)
    return plan


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = plan_from(args)
    signal.signal(signal.SIGTERM, fsbench._sigterm)
    base = Path(tempfile.mkdtemp(prefix="hbench-", dir=args.workdir))
    os.chmod(base, 0o755)  # mariadbd runs as mysql and must reach its datadir
    started, loads, out = time.strftime("%Y%m%d-%H%M%S"), {"before": uptime()}, Outcome()
    progress(f"load before: {loads['before']}; work dir {fsbench.workdir_facts(base)}")
    rtt = float("nan")
    try:
        rtt = run_bench(base, plan, out)
    except Exception:
        out.problems.append(f"bench aborted: {traceback.format_exc()}")
    finally:
        fsbench._remove(base)
    if plan.failover_repeats:
        progress(f"failover, {plan.failover_repeats} repeats")
        try:
            out.failover = failovers(plan.failover_repeats)
        except Exception as e:
            out.problems.append(f"failover: {type(e).__name__}: {e}")
    loads["after"] = uptime()
    out.problems += [msg for pt in out.points for msg in point_problems(pt)]
    for name, value in report(out, plan, rtt, started, args, loads):
        print(f"{name} {value:.2f}")
    return 1 if out.problems else 0


if __name__ == "__main__":
    sys.exit(main())
