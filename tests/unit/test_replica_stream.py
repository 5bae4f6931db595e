"""The replica server's MIRROR stream over a real socket: acknowledgements and syncs.

A small FSYNC (a redo log's commit) is synced on the stream's thread at the end of its
batch, a large one on a worker thread; either way SYNCED goes out only after the sync
returned (I1), and ACK covers every applied op of the batch.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hafs import ops, replica, wire
from hafs import protocol as p
from hafs.ops import Op, OpFrame
from hafs.replica import ReplicaServer

ROOT = ops.ROOT_INO


@dataclass
class Syncs:
    """os.fdatasync replaced: records (thread name, time it returned) per call."""

    delay: float = 0.0
    error: int = 0
    calls: list[tuple[str, float]] = field(default_factory=list)

    def __call__(self, fd: int) -> None:
        os.fstat(fd)  # a real, open fd
        time.sleep(self.delay)
        if self.error:
            raise OSError(self.error, os.strerror(self.error))
        self.calls.append((threading.current_thread().name, time.monotonic()))


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> Syncs:
    recorder = Syncs()
    monkeypatch.setattr(os, "fdatasync", recorder)
    return recorder


class Stream:
    def __init__(self, server: ReplicaServer) -> None:
        self.sock, keys = wire.connect(server.listen_addr, server.key, p.Purpose.MIRROR, 5.0)
        self.sock.settimeout(5.0)
        self.writer, self.reader = p.FrameWriter(keys.send), p.FrameReader(keys.recv)
        self.got: list[tuple[p.FrameType, int, float]] = []  # type, body seq, arrival

    def send(self, *frames: OpFrame) -> list[int]:
        """All frames in one sendall (one batch for the replica); their seqs."""
        parts: list[bytes] = []
        seqs = []
        for frame in frames:
            parts += self.writer.seal(p.FrameType.OP, *ops.encode(frame))
            seqs.append(self.writer.seq)
        self.sock.sendall(b"".join(parts))
        return seqs

    def wait_for(self, ftype: p.FrameType, seq: int) -> float:
        """Read replies until ftype covering seq arrived; its arrival time."""
        while True:
            for kind, body, at in self.got:
                if kind is ftype and (body == seq or (ftype is p.FrameType.ACK and body >= seq)):
                    return at
                if kind is p.FrameType.FAILED:
                    raise AssertionError(f"FAILED {body}")
            frames = wire.recv_frames(self.sock, self.reader)
            assert frames, "replica closed the stream"
            now = time.monotonic()
            for f in frames:
                body = p.FAILED_BODY.unpack(f.payload)[0] if f.ftype is p.FrameType.FAILED else 0
                if f.ftype in (p.FrameType.ACK, p.FrameType.SYNCED):
                    body = p.ACK_BODY.unpack(f.payload)[0]
                self.got.append((f.ftype, body, now))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def stream(server: ReplicaServer) -> Iterator[Stream]:
    s = Stream(server)
    yield s
    s.close()


def create(ino: int, name: bytes) -> OpFrame:
    return OpFrame(Op.CREATE, (ROOT, ino, 0o100644, 0, 0), (name,))


def write(ino: int, data: bytes, offset: int = 0) -> OpFrame:
    return OpFrame(Op.WRITE, (ino, offset), (data,))


def fsync(ino: int, flags: int = ops.FSYNC_DATASYNC) -> OpFrame:
    return OpFrame(Op.FSYNC, (ino, flags))


def test_small_fsync_synced_on_the_stream_thread(
    server: ReplicaServer, stream: Stream, syncs: Syncs
) -> None:
    syncs.delay = 0.2
    (_, w, f) = stream.send(create(10, b"log"), write(10, b"x" * 4096), fsync(10))
    acked = stream.wait_for(p.FrameType.ACK, w)
    synced = stream.wait_for(p.FrameType.SYNCED, f)
    (name, returned), *_ = syncs.calls
    assert name.startswith("conn-")  # no hop to a worker thread
    # The write's ACK did not wait for the disk; SYNCED did.
    assert acked < returned <= synced
    assert Path(server.data_dir, "log").read_bytes() == b"x" * 4096


def test_fsync_alone_answered_with_ack_and_synced_together(stream: Stream, syncs: Syncs) -> None:
    stream.send(create(10, b"log"), write(10, b"x"))
    stream.wait_for(p.FrameType.ACK, 2)
    (f,) = stream.send(fsync(10))
    synced = stream.wait_for(p.FrameType.SYNCED, f)
    assert stream.wait_for(p.FrameType.ACK, f) == synced  # one reply, one wakeup
    assert len(syncs.calls) == 1


def test_fsync_asking_ack_first_is_acked_before_the_disk_sync(stream: Stream, syncs: Syncs) -> None:
    """The mount's ack="receipt": its fsync waits for the ACK, which must not wait for the
    replica's disk; SYNCED still comes once the sync returned."""
    syncs.delay = 0.3
    stream.send(create(10, b"log"), write(10, b"x"))
    stream.wait_for(p.FrameType.ACK, 2)
    (f,) = stream.send(fsync(10, ops.FSYNC_DATASYNC | ops.FSYNC_ACK_FIRST))
    acked = stream.wait_for(p.FrameType.ACK, f)
    synced = stream.wait_for(p.FrameType.SYNCED, f)
    ((_, returned),) = syncs.calls
    assert acked < returned <= synced
    assert synced - acked > 0.2


def test_large_fsync_runs_on_a_worker_thread(
    stream: Stream, syncs: Syncs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replica.ops, "INLINE_SYNC_BYTES", 1024)
    (_, _, f) = stream.send(create(10, b"data"), write(10, b"y" * 4096), fsync(10))
    stream.wait_for(p.FrameType.SYNCED, f)
    assert [name.startswith("fsync") for name, _ in syncs.calls] == [True]
    # Synced since: the next small one is inline again.
    (_, g) = stream.send(write(10, b"z", 5), fsync(10))
    stream.wait_for(p.FrameType.SYNCED, g)
    assert syncs.calls[1][0].startswith("conn-")


def test_inline_sync_failure_refuses_the_fsync(
    server: ReplicaServer, stream: Stream, syncs: Syncs
) -> None:
    syncs.error = errno.EIO
    (_, f) = stream.send(create(10, b"log"), fsync(10))
    with pytest.raises(AssertionError, match=f"FAILED {f}"):
        stream.wait_for(p.FrameType.SYNCED, f)
    assert not any(kind is p.FrameType.SYNCED for kind, _, _ in stream.got)
    assert server.state.current.uptodate is False
