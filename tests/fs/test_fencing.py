"""Fencing on real mounts (`hafs fs mount --fence`, as the daemon mounts): a mount whose
replica stops acknowledging holds the calls (HELD) instead of going ALONE by itself, until
it is told `alone` (the held calls complete, journaled) or `fence` (they fail with EIO, as
does every later change). The application never gets an acknowledgement the replica lacks
while the node does not know whether its peer is taking over (design.md I1, I8).
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Iterator

import pytest

from tests.fs.test_failures import Rig, continued_on_exit, read_state, write_file
from tests.support import cluster
from tests.support.cluster import TIMEOUT, wait_until
from tests.support.records import RecordWriter, check_records

HELD_FOR = TIMEOUT + 1.0  # how long a test watches the held writer make no progress


@pytest.fixture
def held(rig: Rig) -> Iterator[tuple[cluster.ReplicaProc, cluster.MountProc, RecordWriter]]:
    """A fenced mount whose replica hung (SIGSTOP) under a writer: the mount is HELD."""
    with rig.replica() as rep, rig.mount(extra_args=["--fence"]) as mnt:
        path = rig.mountpoint / "held.dat"
        write_file(path, b"")
        writer = RecordWriter(path, fsync_every=4)
        with continued_on_exit(rep):
            writer.start()
            try:
                wait_until(lambda: writer.acked >= 100 or writer.error is not None, 60, "records")
                assert writer.error is None, writer.error
                os.kill(rep.pid, signal.SIGSTOP)
                wait_until(lambda: mnt.status()["mode"] == "HELD", TIMEOUT + 10, "HELD")
                yield rep, mnt, writer
            finally:
                writer.stop.set()
                if rep.running():
                    os.kill(rep.pid, signal.SIGCONT)
                writer.finish()


def held_writer_makes_no_progress(writer: RecordWriter) -> int:
    before = writer.acked
    time.sleep(HELD_FOR)
    assert writer.error is None, f"a held call failed before any decision: {writer.error!r}"
    assert writer.acked == before, "a call returned while the mount held it"
    return before


def replica_records(rig: Rig) -> int:
    return check_records((rig.replica_dir / "held.dat").read_bytes(), "replica held.dat")


def test_held_calls_wait_beyond_the_timeout_then_alone_completes_them(
    rig: Rig, held: tuple[cluster.ReplicaProc, cluster.MountProc, RecordWriter]
) -> None:
    _, mnt, writer = held
    stalled = held_writer_makes_no_progress(writer)
    status = mnt.status()
    assert "acknowledge" in status["reason"], status
    assert read_state(rig.mount_state)["mode"] == "ALONE", "HELD journals like ALONE on disk"

    reply = cluster.command(rig.mount_state, {"cmd": "alone", "reason": "test says alone"})
    assert reply["ok"], reply
    wait_until(lambda: writer.acked >= stalled + 50 or writer.error is not None, 20, "writes")
    assert writer.error is None, f"the application saw an error: {writer.error!r}"
    status = mnt.status()
    assert status["mode"] == "ALONE", status
    assert "held.dat" in status["journal"], status


def test_fence_fails_the_held_calls_and_later_changes_never_acknowledges_them(
    rig: Rig, held: tuple[cluster.ReplicaProc, cluster.MountProc, RecordWriter]
) -> None:
    rep, mnt, writer = held
    stalled = held_writer_makes_no_progress(writer)

    reply = cluster.command(rig.mount_state, {"cmd": "fence", "reason": "peer taking over"})
    assert reply["ok"], reply
    wait_until(lambda: writer.error is not None, 10, "the held call to fail")
    assert writer.error is not None and writer.error.errno == errno.EIO, writer.error
    assert writer.acked == stalled, "a held call was acknowledged"
    assert mnt.status()["mode"] == "FENCED"
    with pytest.raises(OSError) as new_write:
        write_file(rig.mountpoint / "after-fence", b"x")
    assert new_write.value.errno == errno.EIO
    assert (rig.mountpoint / "held.dat").stat().st_size > 0, "reads go on while fenced"

    os.kill(rep.pid, signal.SIGCONT)  # whatever it received, it applies now
    wait_until(lambda: rep.status()["mode"] == "LISTENING", 20, "the replica's session to end")
    assert replica_records(rig) >= writer.acked, "I1: an acknowledged record is not on the peer"


def test_stopping_a_held_mount_fails_the_held_calls(
    held: tuple[cluster.ReplicaProc, cluster.MountProc, RecordWriter],
) -> None:
    _, mnt, writer = held
    stalled = writer.acked
    os.kill(mnt.pid, signal.SIGTERM)
    wait_until(lambda: writer.error is not None, 15, "the held call to fail")
    assert writer.acked == stalled, "a held call was acknowledged"
    wait_until(lambda: not mnt.running(), 15, "the mount to exit")
