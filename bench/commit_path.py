"""`make bench-commit`: what one commit (a 4 KiB write + fdatasync) costs each process.

On a loopback pair (a replica server and a mount, tests/support/cluster.py), a loop of
pwrite + fdatasync on one file through the mount, as a redo log's commit. Per pair: the
write and the fdatasync latency (p50/p95) and the CPU each hafs process spent (user and
system, from /proc), for a `--standalone` mount (the baseline: FUSE alone) and each ack
mode, in turn, in rounds. With --strace, the mount's system calls per pair (strace -c over a
second loop, so that tracing does not slow the timed one). Ratios are to the baseline.

Run from the repo: .venv/bin/python bench/commit_path.py [--pairs N] [--rounds N] [--strace]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support import cluster  # noqa: E402

SETUPS = ("standalone", "applied", "fsync", "receipt")
PORT = 7795
BLOCK = b"x" * 4096
SPREAD = 256  # the loop rewrites the file's first 1 MiB, block by block
WARMUP = 200


@dataclass
class Pair:
    """A running setup: its mount point and its hafs processes by role."""

    mountpoint: Path
    procs: dict[str, psutil.Process]


@contextlib.contextmanager
def started(work: Path, setup: str) -> Iterator[Pair]:
    dirs = {n: work / f"{setup}-{n}" for n in ("backing", "mnt", "replica", "ms", "rs")}
    for d in dirs.values():
        d.mkdir()
    with contextlib.ExitStack() as stack:
        procs: dict[str, psutil.Process] = {}
        peer, key, args = None, None, ["--no-xattrs"]
        if setup != "standalone":
            key, peer = cluster.keygen(work / f"{setup}.key"), f"127.0.0.1:{PORT}"
            args += ["--ack", setup]
            replica = stack.enter_context(
                cluster.replica(dirs["replica"], listen=peer, key=key, state_dir=dirs["rs"])
            )
            procs["replica"] = psutil.Process(replica.pid)
        mount = stack.enter_context(
            cluster.mount(dirs["backing"], peer=peer, key=key, mountpoint=dirs["mnt"],
                          state_dir=dirs["ms"], extra_args=args)
        )  # fmt: skip
        procs["mount"] = psutil.Process(mount.pid)
        yield Pair(dirs["mnt"], procs)


def commit_loop(path: Path, pairs: int) -> list[tuple[float, float]]:
    """pwrite + fdatasync PAIRS times: (write seconds, fdatasync seconds) of each."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    timings = []
    try:
        for i in range(pairs):
            start = time.perf_counter()
            os.pwrite(fd, BLOCK, (i % SPREAD) * len(BLOCK))
            written = time.perf_counter()
            os.fdatasync(fd)
            timings.append((written - start, time.perf_counter() - written))
    finally:
        os.close(fd)
    return timings


def cpu_seconds(procs: dict[str, psutil.Process]) -> dict[str, float]:
    return {
        f"{role}_{kind}": getattr(proc.cpu_times(), kind)
        for role, proc in procs.items()
        for kind in ("user", "system")
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def measure(pair: Pair, pairs: int) -> dict[str, float]:
    """The timed loop: latencies (µs) and CPU per pair (µs) of each hafs process."""
    path = pair.mountpoint / "commit.log"
    commit_loop(path, WARMUP)
    before = cpu_seconds(pair.procs)
    start = time.perf_counter()
    timings = commit_loop(path, pairs)
    wall = time.perf_counter() - start
    after = cpu_seconds(pair.procs)
    writes, syncs = [w for w, _ in timings], [s for _, s in timings]
    figures = {
        "pair_us": wall / pairs * 1e6,
        "write_p50_us": percentile(writes, 0.5) * 1e6,
        "write_p95_us": percentile(writes, 0.95) * 1e6,
        "fdatasync_p50_us": percentile(syncs, 0.5) * 1e6,
        "fdatasync_p95_us": percentile(syncs, 0.95) * 1e6,
    }
    figures.update({f"{k}_us": (after[k] - before[k]) / pairs * 1e6 for k in before})
    return figures


def syscalls(pair: Pair, pairs: int) -> dict[str, float]:
    """strace -c of the mount over a second loop: calls per pair, by system call."""
    out = pair.mountpoint.parent / "strace.txt"
    tracer = subprocess.Popen(
        ["strace", "-c", "-f", "-p", str(pair.procs["mount"].pid), "-o", str(out)],
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # attached to every thread
    try:
        commit_loop(pair.mountpoint / "commit.log", pairs)
    finally:
        tracer.terminate()
        tracer.wait(30)
    counts = {}
    for line in out.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[3].isdigit() and fields[-1] != "total":
            counts[fields[-1]] = int(fields[3]) / pairs
    return counts


def report(results: dict[str, list[dict[str, float]]], calls: dict[str, dict[str, float]]) -> None:
    medians = {
        setup: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        for setup, runs in results.items()
    }
    base = medians["standalone"]
    keys = list(dict.fromkeys(k for m in medians.values() for k in m))  # latencies, then CPU
    print(f"{'per write + fdatasync':<24}" + "".join(f"{s:>22}" for s in medians))
    for key in keys:
        cells = []
        for setup in medians:
            value = medians[setup].get(key)
            if value is None:
                cells.append(f"{'-':>22}")
            elif setup == "standalone" or not base.get(key):
                cells.append(f"{value:>22,.0f}")
            else:
                cells.append(f"{f'{value:,.0f} ({value / base[key]:.2f}x)':>22}")
        print(f"{key:<24}" + "".join(cells))
    print("(medians over the rounds; µs; ratio = setup / standalone, lower is better)")
    for setup, counts in calls.items():
        shown = ", ".join(f"{name} {n:.1f}" for name, n in sorted(counts.items()) if n >= 0.5)
        print(f"syscalls of the mount per pair, {setup}: {shown}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=3000, help="timed pairs per point")
    parser.add_argument("--rounds", type=int, default=3, help="every setup once per round")
    parser.add_argument("--strace", action="store_true", help="also count the mount's syscalls")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="on the disk")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="hcommit-", dir=args.workdir))
    results: dict[str, list[dict[str, float]]] = {s: [] for s in SETUPS}
    calls: dict[str, dict[str, float]] = {}
    try:
        for round_no in range(args.rounds):
            (work / f"r{round_no}").mkdir()
            for setup in SETUPS:
                with started(work / f"r{round_no}", setup) as pair:
                    results[setup].append(measure(pair, args.pairs))
                    if args.strace and round_no == 0:
                        calls[setup] = syscalls(pair, min(args.pairs, 2000))
                took = results[setup][-1]["pair_us"]
                print(f"round {round_no + 1} {setup}: {took:.0f} us per pair", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results, calls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
