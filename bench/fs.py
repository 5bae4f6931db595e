"""`make bench-fs`: the same I/O on a local directory, a standalone hafs mount and a replicated
hafs mount, with every figure also given as a ratio to the local directory.

Run from the repo: .venv/bin/python bench/fs.py [--rounds N] [--quick] [--only fio|sysbench]
Results: a table on stdout and JSON in bench/results/fs-<timestamp>.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support import cluster  # noqa: E402
from tests.support.mariadb import MariaDB  # noqa: E402

KiB, MiB = 1024, 1024 * 1024
BLOCK = 4 * KiB
RESULTS = REPO / "bench" / "results"
SETUPS = ("local", "standalone", "replicated")


@dataclass(frozen=True)
class Sizes:
    dsync_writes: int = 2000
    randwrite_seconds: float = 2.5
    randwrite_file: int = 64 * MiB
    seq_bytes: int = 256 * MiB
    create_seconds: float = 2.0
    sysbench_seconds: int = 20
    sysbench_threads: int = 4
    sysbench_tables: int = 2
    sysbench_rows: int = 20000


FULL = Sizes()
QUICK = Sizes(
    dsync_writes=500,
    randwrite_seconds=1.0,
    seq_bytes=64 * MiB,
    create_seconds=1.0,
    sysbench_seconds=5,
    sysbench_rows=10000,
)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    group: str  # what --only selects
    higher_is_better: bool


METRICS = (
    Metric("dsync_p50_us", "4K O_DSYNC write p50 (us)", "fio", False),
    Metric("dsync_p99_us", "4K O_DSYNC write p99 (us)", "fio", False),
    Metric("randwrite_fsync_ops", "4K random write+fsync (ops/s)", "fio", True),
    Metric("seq_1m_mbps", "1M sequential write+fsync (MB/s)", "fio", True),
    Metric("create_fsync_unlink_ops", "create+fsync+unlink (ops/s)", "fio", True),
    Metric("sysbench_tps", "MariaDB oltp_write_only (tps)", "sysbench", True),
    Metric("sysbench_p95_ms", "MariaDB oltp_write_only p95 (ms)", "sysbench", False),
)


# --- measurements -------------------------------------------------------------------------


def _fill(path: Path, size: int) -> None:
    """Write SIZE bytes and fsync, so later overwrites measure the data path, not allocation."""
    chunk = os.urandom(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, size, MiB):
            os.pwrite(fd, chunk[: min(MiB, size - off)], off)
        os.fsync(fd)
    finally:
        os.close(fd)


def _percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def dsync_latency(d: Path, sz: Sizes) -> dict[str, float]:
    """Overwrite a preallocated file 4 KiB at a time through an O_DSYNC fd (a redo log)."""
    path = d / "dsync.dat"
    _fill(path, sz.dsync_writes * BLOCK)
    buf = os.urandom(BLOCK)
    lat_ns = []
    fd = os.open(path, os.O_WRONLY | os.O_DSYNC)
    try:
        for i in range(sz.dsync_writes):
            t0 = time.perf_counter_ns()
            os.pwrite(fd, buf, i * BLOCK)
            lat_ns.append(time.perf_counter_ns() - t0)
    finally:
        os.close(fd)
        path.unlink()
    return {
        "dsync_p50_us": _percentile(lat_ns, 50) / 1000,
        "dsync_p99_us": _percentile(lat_ns, 99) / 1000,
    }


def _timed_loop(seconds: float, op: Callable[[int], None]) -> float:
    """Run op(i) until SECONDS have passed (and at most a million times); ops per second."""
    start = time.monotonic()
    deadline, count = start + seconds, 0
    while count < 1_000_000 and time.monotonic() < deadline:
        op(count)
        count += 1
    return count / (time.monotonic() - start)


def randwrite_fsync(d: Path, sz: Sizes) -> dict[str, float]:
    """4 KiB writes at random aligned offsets of a 64 MiB file, fsync after each."""
    path = d / "rand.dat"
    _fill(path, sz.randwrite_file)
    buf, rng = os.urandom(BLOCK), random.Random(42)
    blocks = sz.randwrite_file // BLOCK
    fd = os.open(path, os.O_WRONLY)

    def op(_: int) -> None:
        os.pwrite(fd, buf, rng.randrange(blocks) * BLOCK)
        os.fsync(fd)

    try:
        ops = _timed_loop(sz.randwrite_seconds, op)
    finally:
        os.close(fd)
        path.unlink()
    return {"randwrite_fsync_ops": ops}


def seq_write(d: Path, sz: Sizes) -> dict[str, float]:
    """1 MiB writes to a new file, then one fsync; MB/s counts the fsync."""
    path = d / "seq.dat"
    chunk = os.urandom(MiB)
    t0 = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(sz.seq_bytes // MiB):
            os.write(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.monotonic() - t0
    path.unlink()
    return {"seq_1m_mbps": sz.seq_bytes / 1e6 / elapsed}


def create_fsync_unlink(d: Path, sz: Sizes) -> dict[str, float]:
    """Metadata round trips: create a file, fsync it, close, unlink."""
    sub = d / "create"
    sub.mkdir()

    def op(i: int) -> None:
        path = sub / f"f{i}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        path.unlink()

    try:
        ops = _timed_loop(sz.create_seconds, op)
    finally:
        shutil.rmtree(sub)
    return {"create_fsync_unlink_ops": ops}


def sysbench_tps(d: Path, sz: Sizes) -> dict[str, float]:
    """MariaDB with its datadir in D (installed there, so install goes through hafs too)."""
    with MariaDB(d / "mysql") as db:
        r = db.sysbench(
            "oltp_write_only",
            threads=sz.sysbench_threads,
            seconds=sz.sysbench_seconds,
            tables=sz.sysbench_tables,
            rows=sz.sysbench_rows,
        )
    return {"sysbench_tps": r["tps"], "sysbench_p95_ms": r["p95_ms"]}


MEASUREMENTS: dict[str, list[Callable[[Path, Sizes], dict[str, float]]]] = {
    "fio": [dsync_latency, randwrite_fsync, seq_write, create_fsync_unlink],
    "sysbench": [sysbench_tps],
}


# --- setups -------------------------------------------------------------------------------


@dataclass
class Target:
    """Where a setup's I/O goes, and how to ask hafs what state it is in."""

    path: Path
    mount: cluster.MountProc | None = None
    peer: str | None = None
    key: Path | None = None
    backing: Path | None = None

    def info(self, verify: bool = True) -> dict[str, Any]:
        if self.mount is None:
            return {}
        result: dict[str, Any] = {"mode": _mode(self.mount)}
        if verify and self.peer is not None:
            result["verify"] = _verify(self)
        return result


def _mode(proc: cluster.MountProc) -> str:
    try:
        return str(proc.status().get("mode"))
    except cluster.ClusterError as e:
        return f"status failed: {e}"


def _verify(t: Target) -> str:
    """`hafs fs verify`: replication numbers mean nothing if the replica differs."""
    assert t.backing is not None and t.key is not None and t.peer is not None
    cmd = [str(cluster.HAFS_BIN), "fs", "verify", str(t.backing), "--peer", t.peer]
    try:
        r = subprocess.run([*cmd, "--key", str(t.key)], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "verify timed out"
    text = (r.stdout + r.stderr).strip().splitlines()
    head = "; ".join(text[:5])
    return f"ok: {head}" if r.returncode == 0 else f"DIFFERS (exit {r.returncode}): {head}"


@contextlib.contextmanager
def local_setup(work: Path, mount_args: Sequence[str]) -> Iterator[Target]:
    d = work / "local"
    d.mkdir()
    yield Target(d)


@contextlib.contextmanager
def standalone_setup(work: Path, mount_args: Sequence[str]) -> Iterator[Target]:
    backing, mnt, state = work / "sa-backing", work / "sa-mnt", work / "sa-state"
    for p in (backing, mnt):
        p.mkdir()
    with cluster.mount(backing, mountpoint=mnt, state_dir=state, extra_args=mount_args) as proc:
        yield Target(mnt, mount=proc, backing=backing)


@contextlib.contextmanager
def replicated_setup(work: Path, mount_args: Sequence[str]) -> Iterator[Target]:
    backing, mnt, rdir = work / "rep-backing", work / "rep-mnt", work / "rep-replica"
    for p in (backing, mnt, rdir):
        p.mkdir()
    key = cluster.keygen(work / "cluster.key")
    peer = f"127.0.0.1:{cluster.free_port()}"
    with (
        cluster.replica(rdir, listen=peer, key=key, state_dir=work / "rep-rstate"),
        cluster.mount(
            backing,
            peer=peer,
            key=key,
            mountpoint=mnt,
            state_dir=work / "rep-mstate",
            extra_args=mount_args,
        ) as proc,
    ):
        yield Target(mnt, mount=proc, peer=peer, key=key, backing=backing)


SETUP_FUNCS = {
    "local": local_setup,
    "standalone": standalone_setup,
    "replicated": replicated_setup,
}


# --- running ------------------------------------------------------------------------------


@dataclass
class Run:
    setup: str
    round: int
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    # Other load on this small VM skews everything; keep the evidence with the figures.
    loadavg_start: float = 0.0
    loadavg_end: float = 0.0


def run_setup(
    name: str, rnd: int, base: Path, sz: Sizes, groups: list[str], mount_args: Sequence[str]
) -> Run:
    run = Run(name, rnd, loadavg_start=os.getloadavg()[0])
    t0 = time.monotonic()
    work = base / f"{name}-{rnd}"
    work.mkdir()
    try:
        with SETUP_FUNCS[name](work, mount_args) as target:
            try:
                for group in groups:
                    for measure in MEASUREMENTS[group]:
                        os.sync()  # the previous step's dirty pages must not bill this one
                        got = measure(target.path, sz)
                        run.metrics.update(got)
                        shown = ", ".join(f"{k}={v:.1f}" for k, v in got.items())
                        _progress(f"  {name} r{rnd} {measure.__name__}: {shown}")
            except Exception:
                run.info = target.info(verify=False)  # e.g. the mode it degraded to
                raise
            run.info = target.info()
    except Exception as e:
        run.error = f"{type(e).__name__}: {e}"
        _progress(f"  {name} r{rnd} FAILED: {traceback.format_exc()}")
    finally:
        _remove(work)
        run.seconds = time.monotonic() - t0
        run.loadavg_end = os.getloadavg()[0]
    return run


def _remove(path: Path) -> None:
    """rmtree, but never through a FUSE mount that something left behind."""
    for mp in cluster.fuse_mounts_under(path):
        cluster.force_unmount(mp)
    shutil.rmtree(path, ignore_errors=True)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def summarize(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """Per setup: medians of each metric over the rounds that produced it, and ratios."""
    out: dict[str, dict[str, Any]] = {}
    # bench/fs.py's own setups first, then any other (bench/mysql.py's ack modes)
    others = [r.setup for r in runs if r.setup not in SETUPS]
    for name in (*SETUPS, *dict.fromkeys(others)):
        mine = [r for r in runs if r.setup == name]
        if not mine:
            continue
        medians = {}
        for m in METRICS:
            values = [r.metrics[m.key] for r in mine if m.key in r.metrics]
            if values:
                medians[m.key] = statistics.median(values)
        out[name] = {"median": medians, "runs": [asdict(r) for r in mine]}
    local = out.get("local", {}).get("median", {})
    for entry in out.values():
        entry["ratio_to_local"] = {
            k: v / local[k] for k, v in entry["median"].items() if local.get(k)
        }
    return out


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    names = list(summary)
    rows = [["metric", *names]]
    for m in METRICS:
        if not any(m.key in summary[n]["median"] for n in names):
            continue
        row = [m.label + (" ↑" if m.higher_is_better else " ↓")]
        for n in names:
            v = summary[n]["median"].get(m.key)
            ratio = summary[n]["ratio_to_local"].get(m.key)
            cell = "-" if v is None else f"{v:,.1f}"
            if v is not None and ratio is not None and n != "local":
                cell += f" ({ratio:.2f}x)"
            row.append(cell)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("(ratio = setup / local;  ↑ higher is better, ↓ lower is better)")
    for n in names:
        for r in summary[n]["runs"]:
            load = f"load {r['loadavg_start']:.1f}->{r['loadavg_end']:.1f}"
            extra = " ".join(str(x) for x in (r["error"], r["info"]) if x)
            lines.append(f"{n} round {r['round']}: {load} {extra}".rstrip())
    return "\n".join(lines)


def workdir_facts(work: Path) -> dict[str, Any]:
    """Which file system the work dir is on: it must be the disk, not tmpfs."""
    target = work.resolve()
    # The longest mount point that contains the work dir is the file system it lives on.
    mount_point, fstype = max(
        (m for m in cluster.mounts() if target.is_relative_to(m[0])), key=lambda m: len(m[0])
    )
    same = os.stat(work).st_dev == os.stat(REPO).st_dev
    return {
        "path": str(work),
        "mount_point": mount_point,
        "fstype": fstype,
        "same_fs_as_repo": same,
    }


def write_report(name: str, args: argparse.Namespace, figures: dict[str, Any]) -> None:
    """bench/results/NAME.json: the machine, the arguments, and the run's figures."""
    report = {
        "started": name.partition("-")[2],
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "args": {k: str(v) for k, v in vars(args).items()},
        **figures,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {out.relative_to(REPO)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=1, help="repeat and report medians (default 1)")
    p.add_argument("--quick", action="store_true", help="shorter runs (smoke test)")
    p.add_argument("--only", choices=sorted(MEASUREMENTS), help="run only one group")
    p.add_argument("--setups", default=",".join(SETUPS), help="comma list (default: all three)")
    p.add_argument(
        "--mount-args",
        default="--no-xattrs",
        help="options for both hafs mounts (default: --no-xattrs, as for MariaDB)",
    )
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="parent of the work dir")
    args = p.parse_args(argv)
    args.setups = [s for s in args.setups.split(",") if s]
    unknown = set(args.setups) - set(SETUPS)
    if unknown or args.rounds < 1:
        p.error(f"bad --setups {sorted(unknown)} or --rounds {args.rounds}")
    return args


def _sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every cleanup, like Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    sz = QUICK if args.quick else FULL
    groups = [args.only] if args.only else list(MEASUREMENTS)
    base = Path(tempfile.mkdtemp(prefix="hafs-bench-", dir=args.workdir))
    os.chmod(base, 0o755)  # mariadbd runs as mysql and must reach its datadir
    facts = workdir_facts(base)
    if os.getloadavg()[0] > (os.cpu_count() or 1) / 2:
        _progress(f"WARNING: load average {os.getloadavg()[0]:.1f}: figures will be skewed")
    if facts["fstype"] in ("tmpfs", "ramfs") or not facts["same_fs_as_repo"]:
        _progress(f"WARNING: work dir is not on the repo's disk: {facts}")
    started = time.strftime("%Y%m%d-%H%M%S")
    runs: list[Run] = []
    try:
        for rnd in range(1, args.rounds + 1):
            for name in args.setups:
                _progress(f"round {rnd}/{args.rounds}: {name}")
                runs.append(run_setup(name, rnd, base, sz, groups, args.mount_args.split()))
    finally:
        _remove(base)
    summary = summarize(runs)
    print(format_table(summary))
    write_report(f"fs-{started}", args, {"sizes": asdict(sz), "workdir": facts,
                                          "setups": summary})  # fmt: skip
    return 1 if any(r.error for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
