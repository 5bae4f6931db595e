"""The primary side of the stream: sends ops in order, waits for the replica's acks,
and degrades to ALONE (I5) when the replica fails, hangs or goes away.

Ordering (I2) comes from one FIFO outbox drained by one sender task: a handler applies its
change locally and calls `send` without awaiting in between, so the stream order is the
order in which the changes were made. Acknowledgement (I1) is cumulative: ACK n means
every op up to n was applied; SYNCED n means the FSYNC op n is durable on the replica.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import trio

from hafs import ops
from hafs import protocol as p
from hafs.journal import Journal
from hafs.state import StateStore

log = logging.getLogger(__name__)

CONNECT_ATTEMPT_TIMEOUT = 2.0
IOV_BATCH = 512  # below IOV_MAX (1024)


class Mode(StrEnum):
    CONNECTING = "CONNECTING"
    MIRROR = "MIRROR"
    ALONE = "ALONE"
    STANDALONE = "STANDALONE"


@dataclass(frozen=True)
class Change:
    """What an op changed, for the journal if it is still in flight when the peer fails."""

    seq: int
    kind: str
    ino: int
    offset: int
    length: int


class Replicator:
    def __init__(
        self,
        peer: tuple[str, int] | None,
        key: bytes | None,
        timeout: float,
        state: StateStore,
        journal: Journal,
        path_of: Callable[[int], str],
    ) -> None:
        self.peer = peer
        self.key = key
        self.timeout = timeout
        self.state = state
        self.journal = journal
        self.path_of = path_of
        self.mode = Mode.STANDALONE if peer is None else Mode.CONNECTING
        self.reason = ""
        self._sock: trio.socket.SocketType | None = None
        self._raw: socket.socket | None = None  # same socket, for sends without a task switch
        self._sending = False
        self._writer: p.FrameWriter | None = None
        self._outbox: list[bytes] = []
        self._outbox_ready = trio.Event()
        self._acked = 0
        self._ack_waiters: list[tuple[int, int, trio.Event]] = []
        self._sync_waiters: dict[int, trio.Event] = {}
        self._inflight: deque[Change] = deque()
        # For the watchdog: when each unacknowledged frame, and each pending fsync, was sent.
        self._unacked_since: deque[tuple[int, float]] = deque()
        self._sync_started: dict[int, float] = {}
        self._tiebreak = itertools.count()
        self._cancel = trio.CancelScope()
        self.sent_ops = 0
        self.ack_rtt = 0.0  # smoothed seconds from sending an op to its ACK
        self.sync_rtt = 0.0  # smoothed seconds from sending an FSYNC to its SYNCED

    # -- called by the file system handlers ----------------------------------------------

    @property
    def mirroring(self) -> bool:
        return self.mode is Mode.MIRROR

    def journal_if_alone(self, kind: str, ino: int, offset: int = 0, length: int = 0) -> None:
        """Before a local change: in ALONE mode, make the journal line durable first."""
        if self.mode is Mode.ALONE:
            self.journal.record(kind, self.path_of(ino), ino, offset, length)

    def send(
        self,
        frame: ops.OpFrame,
        kind: str = "",
        ino: int = 0,
        offset: int = 0,
        length: int = 0,
        also: tuple[int, ...] = (),
    ) -> int:
        """Queue one op after its local change; returns its seq, 0 when not mirroring.

        kind/ino (and `also`: more inodes, like a rename's second directory) name what the
        op changes, for the journal if it is still in flight when the peer fails.
        """
        if self.mode is not Mode.MIRROR or self._writer is None:
            return 0
        bufs = self._writer.seal(p.FrameType.OP, *ops.encode(frame))
        seq = self._writer.seq
        now = trio.current_time()
        self._unacked_since.append((seq, now))
        if frame.op is ops.Op.FSYNC:
            self._sync_started[seq] = now
        self._transmit(bufs)
        if kind:
            self._inflight.append(Change(seq, kind, ino, offset, length))
            self._inflight.extend(Change(seq, kind, other, 0, 0) for other in also)
        self.sent_ops += 1
        return seq

    def _transmit(self, bufs: list[bytes]) -> None:
        """Send at once when nothing is queued (saves a task switch per op), else queue."""
        if not self._outbox and not self._sending and self._raw is not None:
            try:
                sent = self._raw.sendmsg(bufs)
            except OSError:  # full (EAGAIN) or broken: the sender task finds out which
                sent = 0
            bufs = _unsent(bufs, sent)
            if not bufs:
                return
        self._outbox.extend(bufs)
        self._outbox_ready.set()

    async def applied(self, seq: int) -> None:
        """Wait until the replica applied op seq (the watchdog bounds the wait)."""
        if seq == 0 or seq <= self._acked or self.mode is not Mode.MIRROR:
            return
        event = trio.Event()
        heapq.heappush(self._ack_waiters, (seq, next(self._tiebreak), event))
        await event.wait()

    async def synced(self, seq: int) -> None:
        """Wait until the replica made FSYNC op seq durable."""
        if seq == 0 or self.mode is not Mode.MIRROR:
            return
        # SYNCED may have arrived while the local fsync ran: its event is then already set.
        event = self._sync_waiters.setdefault(seq, trio.Event())
        try:
            await event.wait()
        finally:
            self._sync_waiters.pop(seq, None)

    async def _watchdog(self) -> None:
        """Degrade when the oldest unacknowledged op or fsync is older than the timeout.

        One periodic check instead of a cancel scope per call: the hot path stays cheap.
        """
        tick = min(0.1, self.timeout / 10)
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            if self._unacked_since and now - self._unacked_since[0][1] > self.timeout:
                what = f"op {self._unacked_since[0][0]}"
            elif self._sync_started and now - min(self._sync_started.values()) > self.timeout:
                what = "an fsync"
            else:
                continue
            self.degrade(f"peer did not acknowledge {what} within {self.timeout:g} s")
            return

    # -- degrade -------------------------------------------------------------------------

    def degrade(self, reason: str) -> None:
        """Stop replicating: journal what is in flight, persist ALONE, release waiters."""
        if self.mode not in (Mode.MIRROR, Mode.CONNECTING):
            return
        self.mode = Mode.ALONE
        self.reason = reason
        log.error(
            "replication to %s stopped: %s; going ALONE (changes journaled)",
            self._peer_text(),
            reason,
        )
        for change in self._inflight:
            if change.seq > self._acked:
                self.journal.record(
                    change.kind, self.path_of(change.ino), change.ino, change.offset, change.length
                )
        self._inflight.clear()
        self.state.update(mode=Mode.ALONE.value, generation=self.state.current.generation + 1)
        for _, _, event in self._ack_waiters:
            event.set()
        self._ack_waiters.clear()
        for event in self._sync_waiters.values():
            event.set()
        self._sync_waiters.clear()
        self._outbox.clear()
        self._unacked_since.clear()
        self._sync_started.clear()
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        self._cancel.cancel()

    def _peer_text(self) -> str:
        return f"{self.peer[0]}:{self.peer[1]}" if self.peer else "-"

    # -- the connection ------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, then run the sender and receiver until the stream ends or fails.

        Reports started once connected or ALONE: no file system request may be served while
        the mode is still CONNECTING, since its change would be neither sent nor journaled.
        """
        if self.mode is not Mode.CONNECTING:
            task_status.started()
            return
        try:
            with self._cancel:
                await self._stream(task_status)
        finally:
            for sock in (self._raw, self._sock):
                if sock is not None:
                    sock.close()
            self._raw = None

    async def _stream(self, task_status: trio.TaskStatus[None]) -> None:
        try:
            await self._connect()
        except (OSError, p.ProtocolError, trio.TooSlowError) as e:
            self.degrade(f"cannot reach the replica: {e}")
            task_status.started()
            return
        self.mode = Mode.MIRROR
        self.state.update(role="mount", mode=Mode.MIRROR.value, session_open=True)
        log.info("mirroring to %s", self._peer_text())
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sender)
                nursery.start_soon(self._watchdog)
                nursery.start_soon(self._receiver)
        except* (OSError, p.ProtocolError) as group:  # trio wraps task errors in a group
            self.degrade(f"stream failed: {group.exceptions[0]}")

    async def _connect(self) -> None:
        assert self.peer is not None and self.key is not None
        deadline = trio.current_time() + max(self.timeout, CONNECT_ATTEMPT_TIMEOUT)
        while True:
            try:
                with trio.fail_after(CONNECT_ATTEMPT_TIMEOUT):
                    await self._try_connect()
                return
            except (OSError, trio.TooSlowError):
                if trio.current_time() > deadline:
                    raise
                await trio.sleep(0.2)

    async def _try_connect(self) -> None:
        assert self.peer is not None and self.key is not None
        sock = trio.socket.socket(socket.AF_INET6 if ":" in self.peer[0] else socket.AF_INET)
        try:
            await sock.connect(self.peer)
            keys = await _handshake(sock, self.key)
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._raw = socket.socket(fileno=os.dup(sock.fileno()))
        self._writer = p.FrameWriter(keys.send)
        self._reader = p.FrameReader(keys.recv)

    async def _sender(self) -> None:
        assert self._sock is not None
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready = trio.Event()
            bufs, self._outbox = self._outbox, []
            self._sending = True
            await _send_all(self._sock, bufs)
            self._sending = False

    async def _receiver(self) -> None:
        assert self._sock is not None
        while True:
            data = await self._sock.recv(1 << 16)
            if not data:
                raise p.ProtocolError("replica closed the connection")
            self._reader.feed(data)
            for frame in self._reader.frames():
                self._on_frame(frame)

    def _on_frame(self, frame: p.Frame) -> None:
        if frame.ftype is p.FrameType.ACK:
            self._on_ack(p.ACK_BODY.unpack(frame.payload)[0])
        elif frame.ftype is p.FrameType.SYNCED:
            (seq,) = p.ACK_BODY.unpack(frame.payload)
            started = self._sync_started.pop(seq, None)
            if started is not None:
                self.sync_rtt = 0.9 * self.sync_rtt + 0.1 * (trio.current_time() - started)
            self._sync_waiters.setdefault(seq, trio.Event()).set()
        elif frame.ftype is p.FrameType.FAILED:
            seq, err = p.FAILED_BODY.unpack(frame.payload)
            raise p.ProtocolError(f"replica could not apply op {seq}: {os.strerror(err)}")
        else:
            raise p.ProtocolError(f"unexpected {frame.ftype.name} frame from the replica")

    def _on_ack(self, seq: int) -> None:
        self._acked = max(self._acked, seq)
        sent_at = -1.0
        while self._unacked_since and self._unacked_since[0][0] <= seq:
            sent_at = self._unacked_since.popleft()[1]
        if sent_at >= 0:  # the newest op this ACK covers: its round trip, smoothed
            self.ack_rtt = 0.9 * self.ack_rtt + 0.1 * (trio.current_time() - sent_at)
        while self._inflight and self._inflight[0].seq <= seq:
            self._inflight.popleft()
        while self._ack_waiters and self._ack_waiters[0][0] <= seq:
            heapq.heappop(self._ack_waiters)[2].set()

    async def drain(self) -> None:
        """Clean end: send BYE and wait until the replica applied everything."""
        if self.mode is not Mode.MIRROR or self._writer is None:
            return
        self._transmit(self._writer.seal(p.FrameType.BYE))
        self._unacked_since.append((self._writer.seq, trio.current_time()))
        await self.applied(self._writer.seq)
        if self.mode is Mode.MIRROR:
            self.state.update(session_open=False)
            log.info("stream to %s drained and closed", self._peer_text())
        self._cancel.cancel()

    def snapshot(self) -> dict[str, object]:
        return {
            "mode": self.mode.value,
            "peer": self._peer_text(),
            "reason": self.reason,
            "acked": self._acked,
            "sent_ops": self.sent_ops,
            "ack_rtt_us": round(self.ack_rtt * 1e6),
            "sync_rtt_us": round(self.sync_rtt * 1e6),
            "inflight": len(self._inflight),
            "journal": self.journal.paths(),
        }


async def _recv_exact(sock: trio.socket.SocketType, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await sock.recv(n - len(buf))
        if not chunk:
            raise p.ProtocolError("replica closed the connection during the handshake")
        buf += chunk
    return bytes(buf)


async def _handshake(sock: trio.socket.SocketType, key: bytes) -> p.SessionKeys:
    ns = p.parse_hello(await _recv_exact(sock, p.HELLO.size))
    nc = os.urandom(p.NONCE_LEN)
    await sock.send(p.client_auth(key, ns, nc, p.Purpose.MIRROR))
    p.check_server_proof(key, ns, nc, p.Purpose.MIRROR, await _recv_exact(sock, p.AUTH_OK.size))
    return p.derive_keys(key, ns, nc, is_client=True)


async def _send_all(sock: trio.socket.SocketType, bufs: list[bytes]) -> None:
    """sendmsg the buffers without joining them, resuming after partial sends."""
    views = deque(memoryview(b) for b in bufs if b)
    while views:
        sent = await sock.sendmsg(list(itertools.islice(views, IOV_BATCH)))
        if sent <= 0:
            raise OSError(errno.EPIPE, "replica connection closed")
        while sent:
            if sent >= len(views[0]):
                sent -= len(views.popleft())
            else:
                views[0] = views[0][sent:]
                sent = 0


def _unsent(bufs: list[bytes], sent: int) -> list[bytes]:
    """What is left of bufs after the first `sent` bytes went out."""
    for i, buf in enumerate(bufs):
        if sent < len(buf):
            return [memoryview(buf)[sent:], *bufs[i + 1 :]] if sent else bufs[i:]  # type: ignore[list-item]
        sent -= len(buf)
    return []
