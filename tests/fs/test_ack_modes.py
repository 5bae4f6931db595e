"""The mount's named ack modes (`--ack fsync|receipt`, hafs.ops.Ack) on real mounts.

Both return a write without waiting for the replica, and keep the guarantee that matters to
a database: an fsync that returned is on the replica, in stream order (I2, I3), so after a
crash of the primary the replica holds every fsynced record and a prefix of the rest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.fs.test_failures import (
    FAST_CALL,
    MARGIN,
    Rig,
    blocked_call,
    continued_on_exit,
    journal_lines,
    kill_mount_mid_stream,
    replica_idle,
    tree,
    write_file,
)
from tests.support.cluster import TIMEOUT, wait_until
from tests.support.records import RECORD, RecordWriter, check_records, record

MODES = ("fsync", "receipt")
WRITERS = 8
SLOW_SYNC = 0.6  # seconds strace makes every fdatasync of the replica take


@contextlib.contextmanager
def slow_fdatasync(pid: int) -> Iterator[None]:
    """Every fdatasync of process PID (all its threads) takes SLOW_SYNC longer: a slow
    disk on the replica, made with strace's fault injection (no hook in hafs)."""
    delay_us = int(SLOW_SYNC * 1e6)
    tracer = subprocess.Popen(
        ["strace", "-f", "-p", str(pid), "-e", "trace=fdatasync",
         "-e", f"inject=fdatasync:delay_enter={delay_us}", "-o", "/dev/null"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert tracer.stderr is not None
        # strace says "Process N attached" for each thread, the stream's included.
        line = tracer.stderr.readline()
        assert "attached" in line, f"strace did not attach: {line!r}"
        time.sleep(0.2)  # the other threads' lines follow at once
        yield
    finally:
        tracer.send_signal(signal.SIGINT)  # detaches, the replica goes on
        tracer.communicate(timeout=30)


@pytest.mark.parametrize(
    ("ack", "waits_for_disk"), [("applied", True), ("fsync", True), ("receipt", False)]
)
def test_fsync_waits_for_the_replicas_disk_except_in_receipt_mode(
    rig: Rig, ack: str, waits_for_disk: bool
) -> None:
    """applied and fsync: an fdatasync returns once the replica's disk has the data too;
    receipt: once the replica applied it, before its disk sync (DRBD protocol B)."""
    with rig.replica() as rep, rig.mount(extra_args=("--ack", ack)) as mnt:
        path = rig.mountpoint / "commit.log"
        write_file(path, b"")
        fd = os.open(path, os.O_RDWR)
        try:
            with slow_fdatasync(rep.pid):
                os.pwrite(fd, record(0), 0)
                start = time.monotonic()
                os.fdatasync(fd)
                seconds = time.monotonic() - start
        finally:
            os.close(fd)
        assert mnt.status()["mode"] == "MIRROR"
    if waits_for_disk:
        assert seconds >= SLOW_SYNC * 0.9, f"fdatasync took {seconds:.3f} s: not the replica's"
    else:
        assert seconds < SLOW_SYNC / 2, f"fdatasync took {seconds:.3f} s: waited for its disk"


def write_and_fsync(path: Path, seconds: float) -> int:
    """Records and an fsync after each, for SECONDS; how many records."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    deadline, i = time.monotonic() + seconds, 0
    try:
        while time.monotonic() < deadline:
            os.pwrite(fd, record(i), i * RECORD)
            os.fdatasync(fd)
            i += 1
    finally:
        os.close(fd)
    return i


@pytest.mark.parametrize("ack", ("applied", *MODES))
def test_concurrent_writers_keep_the_stream_whole_and_the_copies_equal(rig: Rig, ack: str) -> None:
    """Many calls waiting at once: replies read by the call itself (hafs.replicator
    _wait_inline) and by the receiver task interleave, and must keep the stream in order:
    the mount stays MIRROR and the replica ends equal to the primary."""
    with rig.replica() as rep:
        with rig.mount(extra_args=("--ack", ack)) as mnt:
            stop_checking = threading.Event()
            modes: set[str] = set()

            def watch() -> None:
                while not stop_checking.wait(0.2):
                    modes.add(mnt.status()["mode"])

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            with ThreadPoolExecutor(WRITERS) as pool:
                paths = [rig.mountpoint / f"w{i}.dat" for i in range(WRITERS)]
                counts = list(pool.map(lambda path: write_and_fsync(path, 4.0), paths))
            stop_checking.set()
            watcher.join(5)
            assert min(counts) > 10, counts
            status = mnt.status()
            assert modes == {"MIRROR"}, (modes, status)
            # Calls read replies themselves, beside the receiver task: else this test
            # proves nothing of how the two interleave.
            assert status["inline_replies"] > 0, status
        wait_until(lambda: replica_idle(rep), 10, "the replica to end the session")
        assert tree(rig.replica_dir) == tree(rig.primary_dir)


@pytest.mark.parametrize("ack", MODES)
def test_write_returns_without_the_replica_and_fsync_waits_for_it(rig: Rig, ack: str) -> None:
    """With the replica stopped, a write returns at once; the fsync after it waits until the
    mount gives up on the peer (ALONE), and the file is journaled for the resync."""
    with rig.replica() as rep, rig.mount(extra_args=("--ack", ack)) as mnt:
        assert mnt.status()["ack"] == ack
        path = rig.mountpoint / "unsynced.dat"
        write_file(path, b"")
        fd = os.open(path, os.O_RDWR)
        try:
            with continued_on_exit(rep):
                os.kill(rep.pid, signal.SIGSTOP)
                start = time.monotonic()
                assert os.pwrite(fd, record(0), 0) == RECORD
                assert time.monotonic() - start < FAST_CALL, "the write waited for the replica"
                assert mnt.status()["mode"] == "MIRROR"
                thread, result = blocked_call(lambda: os.fsync(fd), "fsync")
                time.sleep(0.5)
                assert thread.is_alive(), f"fsync returned without the replica: {result}"
                thread.join(TIMEOUT + MARGIN)
                assert not thread.is_alive(), "fsync still blocked after the timeout"
        finally:
            os.close(fd)
        assert "error" not in result, result
        status = mnt.status()
        assert status["mode"] == "ALONE", status
        assert any(
            r["path"] == "unsynced.dat" and r["kind"] == "data"
            for r in journal_lines(rig.mount_state)
        ), journal_lines(rig.mount_state)


@pytest.mark.parametrize("ack", MODES)
def test_mount_sigkill_replica_holds_every_fsynced_record_and_a_prefix(rig: Rig, ack: str) -> None:
    """I1 as these modes promise it, I2, I3: after SIGKILL of the mount mid-stream the replica
    holds every record an fsync returned for, and records in order, never past the primary."""
    with rig.replica() as rep, rig.mount(extra_args=("--ack", ack)) as mnt:
        path = rig.mountpoint / "stream.dat"
        write_file(path, b"")
        writer = RecordWriter(path, fsync_every=5).start()
        kill_mount_mid_stream(mnt, writer, lambda: writer.synced >= 300)
        wait_until(lambda: replica_idle(rep), 10, "the replica to end the dead session")
        n = check_records((rig.replica_dir / "stream.dat").read_bytes(), "replica")
        assert n >= writer.synced, f"fsynced records lost: replica {n}, synced {writer.synced}"
        primary = check_records((rig.primary_dir / "stream.dat").read_bytes(), "primary")
        assert n <= primary <= writer.acked + 1, (writer.synced, n, primary, writer.acked)
