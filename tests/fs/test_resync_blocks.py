"""Rewrites by block hashes (hafs.blocks) on real mounts and replica processes.

A file whose content differs on the replica gets only its differing 64 KiB blocks, not
itself whole nor its 1 MiB chunks. After a crash of the replica mid-session its copy is
not exact: a write there with the same size and mtime is found and repaired by sending
its one block; once the copy is exact again, the cheap comparison (size and mtime)
skips every file without the replica reading their content.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from hafs import manifest, wire
from hafs.blocks import BLOCK
from hafs.resync import cheap_compare_trusted, plan_resync
from tests.support.join import Join, wait_until

MiB = 1 << 20
BIG = 32 * MiB
SMALL = 40


def populate(root: Path) -> int:
    """A big file and small ones, with old times; returns the bytes of content."""
    rng = random.Random(7)
    (root / "big").write_bytes(rng.randbytes(BIG))
    (root / "d").mkdir()
    for i in range(SMALL):
        (root / "d" / f"f{i:02}").write_bytes(rng.randbytes(rng.randint(1, 64 << 10)))
    for i, path in enumerate(sorted(root.rglob("*"), reverse=True)):
        t = 1_600_000_000_000_000_000 + i * 1_000_000_007
        os.utime(path, ns=(t, t))
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def write_at(path: Path, offsets: list[int], data: bytes) -> None:
    with open(path, "r+b") as f:
        for offset in offsets:
            f.seek(offset)
            f.write(data)


def rchar(pid: int) -> int:
    """Bytes the process read with read(2) and friends (/proc/PID/io)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


def test_rewrite_sends_only_the_differing_blocks(join: Join) -> None:
    populate(join.primary_dir)
    with join.replica() as rep:
        with join.mount(alone=True) as mnt:
            assert join.mirror().bytes_sent >= BIG
            assert join.alone("test: peer away").returncode == 0
            wait_until(lambda: rep.status()["synced"] is False, 10, "the replica to see it")
            # Three small writes in three blocks of three chunks; then a crash: the journal
            # is unclean, so the whole trees are compared and the big file rewritten.
            offsets = [MiB + 10, 17 * MiB + 3 * BLOCK, BIG - 100]
            write_at(join.mountpoint / "big", offsets, b"changed while alone" * 5)
            mnt.kill()
        with join.mount(alone=True) as mnt:
            counters = join.mirror()
            reply = mnt.status()["resync"]
            print(f"\nmirror: {reply['message']}: {counters}")
            assert reply["journal"] is False and "unclean" in reply["full_reason"], reply
            assert counters.files_copied == 1, counters
            # 95 bytes changed in each of 3 blocks: 3 blocks sent, not 3 MiB nor 32 MiB.
            assert counters.bytes_sent == 3 * BLOCK, counters
            join.assert_identical()


def test_crash_repair_finds_writes_with_the_same_size_and_mtime(join: Join) -> None:
    total = populate(join.primary_dir)
    addr = wire.parse_hostport(join.peer)
    key = bytes.fromhex(join.key.read_text().strip())
    victim = join.replica_dir / "big"
    with join.mount(alone=True) as mnt:
        with join.replica() as rep:
            join.mirror()
            assert wire.fetch_exact(addr, key, 5.0) is True  # made identical, synced
            rep.kill()  # mid-session: its last ops may be on disk with their mtime only
        assert join.alone("test: replica crashed").returncode == 0
        # What such a crash can leave: other bytes, the same size and mtime.
        before = victim.stat()
        write_at(victim, [5 * MiB + 7], b"never acknowledged")
        os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = victim.stat()
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)

        with join.replica() as rep:
            exact = wire.fetch_exact(addr, key, 5.0)
            assert exact is False  # found its session cut off
            remote = wire.fetch_manifest(addr, key, 10.0, digests=False)
            local = manifest.build_manifest(str(join.primary_dir), digests=False)
            trusted = cheap_compare_trusted(replica_exact=exact, journal_unclean=False)
            plan = plan_resync(local, remote, size_mtime_trusted=trusted)
            assert "big" in plan.rewrite  # size and mtime alone would miss it

            counters = join.mirror()
            reply = mnt.status()["resync"]
            print(f"\nmirror: {reply['message']}: {counters}")
            assert reply["journal"] is False, reply  # the replica's copy is not the session's
            assert counters.files_copied == 1, counters
            assert counters.bytes_sent == BLOCK, counters  # one block of a 32 MiB file
            join.assert_identical()

            # Exact again: the cheap comparison reads no file's content on the replica.
            exact = wire.fetch_exact(addr, key, 5.0)
            assert exact is True
            read_before = rchar(rep.pid)
            remote = wire.fetch_manifest(addr, key, 10.0, digests=False)
            read = rchar(rep.pid) - read_before
            assert read < total // 100, (read, total)
            local = manifest.build_manifest(str(join.primary_dir), digests=False)
            trusted = cheap_compare_trusted(replica_exact=exact, journal_unclean=False)
            assert plan_resync(local, remote, size_mtime_trusted=trusted).rewrite == set()
