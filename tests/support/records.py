"""Records for write-stream tests: 4 KiB blocks that name their own index and carry a
checksum, so a lost, torn or misplaced write shows; and a thread that writes them."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

RECORD = 4096
MAGIC = 0x68616673_7265636F  # "hafsreco"


def record(i: int) -> bytes:
    """4 KiB naming its own index, with a checksum over the whole record."""
    head = struct.pack("<QQ", MAGIC, i)
    seed = hashlib.sha256(head).digest()
    body = (seed * (RECORD // len(seed)))[: RECORD - len(head) - 32]
    return head + body + hashlib.sha256(head + body).digest()


def check_records(data: bytes, what: str) -> int:
    """The number of records in DATA, which must be records 0..n-1 in order, each intact."""
    assert len(data) % RECORD == 0, f"{what}: size {len(data)} is not whole records"
    n = len(data) // RECORD
    for i in range(n):
        chunk = data[i * RECORD : (i + 1) * RECORD]
        if chunk != record(i):
            found = struct.unpack_from("<QQ", chunk)
            pytest.fail(f"{what}: record {i} of {n} is damaged or misplaced (head {found})")
    return n


@dataclass
class Call:
    start: float
    seconds: float


@dataclass
class RecordWriter:
    """A thread writing records 0, 1, 2... at their offsets through one O_RDWR fd.

    `acked` counts the records whose pwrite returned; with one thread at most one more
    write is in flight. An fsync every `fsync_every` records; `synced` counts the records
    the last fsync that returned covers.
    """

    path: Path
    fsync_every: int = 8
    max_records: int = 25_000
    acked: int = 0
    synced: int = 0
    error: OSError | None = None
    calls: list[Call] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> RecordWriter:
        self.thread = threading.Thread(target=self._run, name="record-writer", daemon=True)
        self.thread.start()
        return self

    def _timed(self, call: Callable[[], Any]) -> Any:
        start = time.monotonic()
        result = call()
        self.calls.append(Call(start, time.monotonic() - start))
        return result

    def _run(self) -> None:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            self.error = e
            return
        try:
            for i in range(self.max_records):
                if self.stop.is_set():
                    return
                n = self._timed(lambda i=i: os.pwrite(fd, record(i), i * RECORD))
                if n != RECORD:
                    self.error = OSError(errno.EIO, f"short write of record {i}: {n} bytes")
                    return
                self.acked = i + 1
                if self.fsync_every and self.acked % self.fsync_every == 0:
                    self._timed(lambda: os.fsync(fd))
                    self.synced = self.acked
        except OSError as e:
            self.error = e
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

    def finish(self, timeout: float = 15.0) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout)
            assert not self.thread.is_alive(), "the writer is stuck in a call on the mount"

    def slowest(self) -> float:
        return max((c.seconds for c in self.calls), default=0.0)
