"""`make bench-resync`: reintegration of a replica, each figure beside its baseline.

One run, three groups (a replica server and a mount on this machine, tests/support):
- sync: the initial full sync of a dataset (default 1 GiB) from a mount to an empty replica
  (`hafs fs mirror`), against `cp -a` of the same data to a fresh directory followed by a
  `sync -f` (the replica syncs its file system before it says it is up to date);
- reintegration: the mount goes ALONE (`hafs fs alone`), 1% then 10% of the dataset changes
  through it, `hafs fs mirror` sends it back; time and bytes sent against the changed bytes
  and the time `cp -a` would take to copy just those bytes;
- files: 1,000,000 unchanged small files (`--files N`). The replica starts with a `cp -a`
  copy: the first mirror has no session to trust, so it compares the whole trees reading
  every file (seeded join); then the mount goes ALONE and `hafs fs mirror --full` compares
  the whole trees by size and mtime (full check: the replica's copy is known exact now).
  Seconds, CPU seconds and peak RSS of the mount and replica processes (psutil, sampled),
  against `rsync -a --dry-run` of the same trees (the classic size+mtime check) and the
  `cp -a`. The manifest alone (hafs.manifest in this process: build, to_bytes, from_bytes)
  is timed too.

Run from the repo: .venv/bin/python bench/resync.py [--quick] [--size 1G] [--files N]
Results: a table and `ratio NAME VALUE` lines on stdout, progress on stderr, JSON in
bench/results/resync-<timestamp>.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.fs import _progress, _remove, _sigterm, workdir_facts, write_report  # noqa: E402
from hafs import manifest  # noqa: E402
from tests.support import cluster  # noqa: E402
from tests.support.join import Join, wait_until  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BIG = 8 * MiB  # most of the dataset's bytes are in files of this size
SMALL_SHARE = 0.15  # the rest in files of 16-128 KiB
FILES_PER_DIR = 1000
# A mirror of a million files reads both trees: no fixed timeout, the benchmark waits.
MIRROR_TIMEOUT = None


@dataclass(frozen=True)
class Sizes:
    dataset: int = GiB
    files: int = 1_000_000
    changes: tuple[float, ...] = (0.01, 0.10)


QUICK = Sizes(dataset=64 * MiB, files=20_000)


@dataclass
class Results:
    figures: dict[str, float] = field(default_factory=dict)  # name -> value
    units: dict[str, str] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def put(self, name: str, value: float, unit: str) -> None:
        self.figures[name], self.units[name] = value, unit
        _progress(f"  {name} = {value:,.3f} {unit}")

    def ratio(self, name: str, num: float, den: float) -> None:
        if den > 0:
            self.ratios[name] = num / den


# ---------------------------------------------------------------------------- datasets


def make_dataset(root: Path, size: int, seed: int = 1) -> list[Path]:
    """About SIZE bytes of random content: big files, and small ones in subdirectories."""
    rng = random.Random(seed)
    files: list[Path] = []
    (root / "big").mkdir()
    for i in range(max(1, int(size * (1 - SMALL_SHARE)) // BIG)):
        files.append(_write(root / "big" / f"b{i:04}", rng.randbytes(BIG)))
    small_bytes = size - len(files) * BIG
    while small_bytes > 0:
        n = len(files)
        d = root / "small" / f"d{n // 100:03}"
        d.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(rng.randint(16, 128) * KiB)
        files.append(_write(d / f"f{n:05}", data))
        small_bytes -= len(data)
    return files


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def make_small_files(root: Path, count: int) -> None:
    """COUNT files of 64-263 bytes, FILES_PER_DIR a directory."""
    d = root
    for i in range(count):
        if i % FILES_PER_DIR == 0:
            d = root / f"d{i // FILES_PER_DIR:04}"
            d.mkdir()
            if i % 100_000 == 0 and i:
                _progress(f"  {i:,} files made")
        fd = os.open(d / f"f{i % FILES_PER_DIR:04}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"x" * (64 + i % 200))
        finally:
            os.close(fd)


def change(mp: Path, files: list[Path], primary: Path, share: float, seed: int) -> int:
    """Change about SHARE of the dataset through the mount; returns the bytes written.

    Big files get one aligned MiB rewritten, small files are rewritten whole, in random
    files, until the share is reached; plus a few files created and deleted."""
    rng = random.Random(seed)
    total = sum(f.stat().st_size for f in files)
    target, written = int(total * share), 0
    order = files[:]
    rng.shuffle(order)
    for f in order:
        if written >= target:
            break
        path = mp / f.relative_to(primary)
        size = f.stat().st_size
        with open(path, "r+b") as fh:
            if size > MiB:
                fh.seek(rng.randrange(size // MiB) * MiB)
                fh.write(rng.randbytes(MiB))
                written += MiB
            else:
                fh.write(rng.randbytes(size))
                written += size
    for i in range(5):
        new = mp / "small" / f"new-{seed}-{i}"
        new.parent.mkdir(exist_ok=True)
        new.write_bytes(rng.randbytes(4 * KiB))
        written += 4 * KiB
    return written


# ---------------------------------------------------------------------------- measuring


def timed(what: Callable[[], object]) -> float:
    start = time.monotonic()
    what()
    return time.monotonic() - start


def cpu_seconds(proc: psutil.Process | None = None) -> float:
    """User + system CPU time of a process (this one by default): on a machine shared with
    other work, a steadier figure than the elapsed time."""
    times = (proc or psutil.Process()).cpu_times()
    return float(times.user + times.system)


def run(*cmd: str, timeout: float | None = None) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=timeout)


def raw_copy(src: Path, dst: Path) -> float:
    """Seconds of `cp -a SRC DST` and a sync of the destination's file system."""
    os.sync()  # earlier dirty pages must not bill this copy
    start = time.monotonic()
    run("cp", "-a", str(src), str(dst))
    run("sync", "-f", str(dst))
    return time.monotonic() - start


def mirror(pair: Join, full: bool = False) -> dict[str, Any]:
    """`hafs fs mirror [--full]`'s request (the CLI prints these counters); must succeed."""
    request = {"cmd": "mirror", "full": full}
    reply = cluster.command(pair.mount_state, request, timeout=MIRROR_TIMEOUT)
    if not reply.get("ok"):
        raise cluster.ClusterError(f"mirror failed: {reply.get('message')}")
    _progress(f"  mirror: {reply.get('message')}")
    return reply


def go_alone(pair: Join, rep: cluster.ReplicaProc, reason: str) -> None:
    result = pair.alone(reason)
    if result.returncode != 0:
        raise cluster.ClusterError(f"alone failed: {result.stderr}{result.stdout}")
    wait_until(lambda: rep.status()["synced"] is False, 30, "the replica to see the end")


def identical(pair: Join) -> bool:
    try:
        pair.assert_identical()
    except AssertionError as e:
        _progress(f"  NOT IDENTICAL: {e}")
        return False
    return True


class PeakRss:
    """Samples the resident memory of some processes until stopped.

    The processes only, not their children: hafs runs none during a resync, and listing
    children reads every /proc entry, ten times a second, on the CPUs being measured."""

    def __init__(self, pids: dict[str, int], interval: float = 0.1) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak = dict.fromkeys(pids, 0)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def rss(self, proc: psutil.Process) -> int:
        with contextlib.suppress(psutil.Error):
            rss: int = proc.memory_info().rss
            return rss
        return 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for name, proc in self.procs.items():
                self.peak[name] = max(self.peak[name], self.rss(proc))

    @contextlib.contextmanager
    def sampling(self) -> Iterator[PeakRss]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()


def new_join(base: Path, name: str, key: Path, replica_dir: Path | None = None) -> Join:
    """Directories for a pair (no process yet); the replica's made empty unless given."""
    state, data = base / f"{name}s", base / name
    state.mkdir()
    data.mkdir()
    if replica_dir is None:
        replica_dir = data / "replica"
        replica_dir.mkdir()
    return cluster.new_pair(Join, state, data, cluster.HAFS_BIN, key, replica_dir)


# ---------------------------------------------------------------------------- the groups


def bench_sync(base: Path, key: Path, sz: Sizes, res: Results) -> None:
    """Initial full sync against cp -a, then reintegration after each share changed."""
    pair = new_join(base, "ds", key)
    _progress(f"sync: making a {sz.dataset / MiB:.0f} MiB dataset")
    files = make_dataset(pair.primary_dir, sz.dataset)
    total = sum(f.stat().st_size for f in files)
    res.info["dataset"] = {"bytes": total, "files": len(files)}
    cp_s = raw_copy(pair.primary_dir, base / "rawcopy")
    _remove(base / "rawcopy")
    res.put("cp_a_MBps", total / MiB / cp_s, "MB/s")
    with pair.replica() as rep, pair.mount(alone=True) as mnt:
        os.sync()
        reply = mirror(pair)
        res.put("full_sync_MBps", total / MiB / reply["seconds"], "MB/s")
        res.put("full_sync_seconds", reply["seconds"], "s")
        res.ratio("full_sync_vs_cp", res.figures["full_sync_MBps"], res.figures["cp_a_MBps"])
        res.info["full_sync"] = {**_counters(reply), "identical": identical(pair)}
        for i, share in enumerate(sz.changes):
            tag = f"reint_{share * 100:g}pct"
            go_alone(pair, rep, f"bench: {tag}")
            written = change(pair.mountpoint, files, pair.primary_dir, share, seed=10 + i)
            os.sync()
            reply = mirror(pair)
            raw_s = written / MiB / res.figures["cp_a_MBps"]
            res.put(f"{tag}_seconds", reply["seconds"], "s")
            res.put(f"{tag}_bytes_sent_MB", reply["bytes_sent"] / MiB, "MB")
            res.put(f"{tag}_changed_MB", written / MiB, "MB")
            res.ratio(f"{tag}_bytes_sent_vs_changed", reply["bytes_sent"], written)
            res.ratio(f"{tag}_seconds_vs_cp_of_changed", reply["seconds"], raw_s)
            res.ratio(
                f"{tag}_seconds_vs_full_sync", reply["seconds"], res.figures["full_sync_seconds"]
            )
            res.info[tag] = {**_counters(reply), "identical": identical(pair)}
        res.info["mode_at_end"] = mnt.status().get("mode")


def bench_files(base: Path, key: Path, sz: Sizes, workers: int, res: Results) -> None:
    """The whole comparison of N unchanged small files, against rsync --dry-run."""
    replica_dir = base / "fs-replica"  # made by cp -a
    pair = new_join(base, "fs", key, replica_dir)
    _progress(f"files: making {sz.files:,} small files")
    res.put("files_make_seconds", timed(lambda: make_small_files(pair.primary_dir, sz.files)), "s")
    res.put("files_cp_a_seconds", raw_copy(pair.primary_dir, replica_dir), "s")
    if workers:
        manifest_figures(pair.primary_dir, workers, res)
    if shutil.which("rsync"):
        os.sync()
        dry = ("rsync", "-a", "--delete", "--dry-run", f"{pair.primary_dir}/", f"{replica_dir}/")
        res.put("files_rsync_dry_run_seconds", timed(lambda: run(*dry)), "s")
    with pair.replica() as rep, pair.mount(alone=True) as mnt:
        # No session yet: the replica's copy may differ anywhere, every file is read.
        seeded = measured_mirror(pair, mnt, rep, "files_seeded_join", res)
        # Now the copy is exact: `hafs fs mirror --full` compares by size and mtime.
        go_alone(pair, rep, "bench: full check")
        check = measured_mirror(pair, mnt, rep, "files_full_check", res, full=True)
    for name, seconds in (("files_seeded_join", seeded), ("files_full_check", check)):
        for base_name in ("files_rsync_dry_run_seconds", "files_cp_a_seconds"):
            if base_name in res.figures:
                tag = base_name.removeprefix("files_").removesuffix("_seconds")
                res.ratio(f"{name}_vs_{tag}", seconds, res.figures[base_name])


def measured_mirror(
    pair: Join,
    mnt: cluster.MountProc,
    rep: cluster.ReplicaProc,
    name: str,
    res: Results,
    full: bool = False,
) -> float:
    """A mirror, with the CPU time and peak RSS of both processes; its seconds."""
    sampler = PeakRss({"mount": mnt.pid, "replica": rep.pid})
    idle = {proc: sampler.rss(p) for proc, p in sampler.procs.items()}
    cpu = {proc: cpu_seconds(p) for proc, p in sampler.procs.items()}
    os.sync()
    with sampler.sampling():
        reply = mirror(pair, full)
    res.put(f"{name}_seconds", reply["seconds"], "s")
    for proc, p in sampler.procs.items():
        res.put(f"{name}_{proc}_cpu_seconds", cpu_seconds(p) - cpu[proc], "s")
        res.put(f"{name}_{proc}_peak_rss_MB", sampler.peak[proc] / MiB, "MB")
        res.put(f"{name}_{proc}_idle_rss_MB", idle[proc] / MiB, "MB")
    res.info[name] = _counters(reply)
    return float(reply["seconds"])


def manifest_figures(root: Path, workers: int, res: Results) -> None:
    """hafs.manifest on the tree, in this process: what a caller's choices cost."""
    os.sync()
    for digests, nworkers in ((True, 1), (False, 1), (False, workers)):
        name = f"manifest_build_{'digests' if digests else 'cheap'}_w{nworkers}"
        start, cpu = time.monotonic(), cpu_seconds()
        m = manifest.build_manifest(str(root), digests=digests, workers=nworkers)
        res.put(f"{name}_seconds", time.monotonic() - start, "s")
        res.put(f"{name}_cpu_seconds", cpu_seconds() - cpu, "s")
    start, cpu = time.monotonic(), cpu_seconds()
    data = manifest.to_bytes(m)
    res.put("manifest_to_bytes_seconds", time.monotonic() - start, "s")
    res.put("manifest_to_bytes_cpu_seconds", cpu_seconds() - cpu, "s")
    res.put("manifest_bytes_MB", len(data) / MiB, "MB")
    start, cpu = time.monotonic(), cpu_seconds()
    manifest.from_bytes(data)
    res.put("manifest_from_bytes_seconds", time.monotonic() - start, "s")
    res.put("manifest_from_bytes_cpu_seconds", cpu_seconds() - cpu, "s")
    cheap = res.figures[f"manifest_build_cheap_w{workers}_seconds"]
    res.ratio("manifest_cheap_vs_digests", cheap, res.figures["manifest_build_digests_w1_seconds"])


def _counters(reply: dict[str, Any]) -> dict[str, Any]:
    keys = ["files_checked", "files_copied", "bytes_sent", "seconds", "journal", "full_reason"]
    keys += ["passes", "paused_seconds", "updated", "removed", "created"]
    return {k: reply.get(k) for k in keys}


# ---------------------------------------------------------------------------- report


def format_table(res: Results) -> str:
    rows = [("figure", "value")] + [
        (name, f"{value:,.2f} {res.units[name]}") for name, value in res.figures.items()
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{a.ljust(width)}  {b}" for a, b in rows]
    lines.insert(1, f"{'-' * width}  -----")
    lines += [f"ratio {name} {value:.3f}" for name, value in res.ratios.items()]
    lines += [f"error {e}" for e in res.errors]
    return "\n".join(lines)


def parse_size(text: str) -> int:
    units = {"K": KiB, "M": MiB, "G": GiB}
    scale = units.get(text[-1:].upper(), 1)
    return int(float(text[:-1] if scale != 1 else text) * scale)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="64 MiB, 20,000 files (smoke test)")
    p.add_argument("--size", type=parse_size, help="dataset size, e.g. 1G, 256M (default 1G)")
    p.add_argument("--files", type=int, help="small files to check (default 1,000,000)")
    p.add_argument(
        "--workers", type=int, default=6, help="manifest threads (nbrei, default 6; 0: skip)"
    )
    p.add_argument("--only", choices=("sync", "files"), help="run only one group")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="parent of the work dir")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    sz = QUICK if args.quick else Sizes()
    if args.size is not None:
        sz = Sizes(args.size, sz.files, sz.changes)
    if args.files is not None:
        sz = Sizes(sz.dataset, args.files, sz.changes)
    base = Path(tempfile.mkdtemp(prefix="hafs-br-", dir=args.workdir))
    base.chmod(0o755)
    facts = workdir_facts(base)
    if os.getloadavg()[0] > (os.cpu_count() or 1) / 2:
        _progress(f"WARNING: load average {os.getloadavg()[0]:.1f}: figures will be skewed")
    started = time.strftime("%Y%m%d-%H%M%S")
    res = Results(info={"loadavg_start": os.getloadavg()[0]})
    try:
        key = cluster.keygen(base / "cluster.key")
        groups = {"sync": lambda: bench_sync(base, key, sz, res)}
        groups["files"] = lambda: bench_files(base, key, sz, args.workers, res)
        for name, group in groups.items():
            if args.only in (None, name):
                try:
                    group()
                except Exception as e:  # the other group still runs; exit status says it
                    res.errors.append(f"{name}: {type(e).__name__}: {e}")
                    _progress(f"{name} FAILED: {e}")
    finally:
        _remove(base)
    res.info["loadavg_end"] = os.getloadavg()[0]
    print(format_table(res))
    write_report(f"resync-{started}", args, {"sizes": asdict(sz), "workdir": facts, **asdict(res)})
    return 1 if res.errors else 0


if __name__ == "__main__":
    sys.exit(main())
