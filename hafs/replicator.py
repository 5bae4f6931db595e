"""The primary side of the stream: sends ops in order, waits for the replica's acks,
and degrades to ALONE (I5) when the replica fails, hangs or goes away.

Fencing (`hold_on_loss`, the controller's mounts): a stream that fails while mirroring does
not degrade by itself. The mount goes HELD: the calls not yet acknowledged, and every new
mutating call, wait until the controller knows whether the peer may take over. It then
says `alone` (the held calls complete, journaled) or `fence` (they fail with EIO, and so do
all later mutating calls): a primary cut off from its peer and the witness never
acknowledges a change that the SECOND taking over does not have (I1, I8).

Ordering (I2) comes from one FIFO outbox drained by one sender task: a handler applies its
change locally and calls `send` without awaiting in between, so the stream order is the
order in which the changes were made. Acknowledgement (I1) is cumulative: ACK n means
every op up to n was applied; SYNCED n means the FSYNC op n is durable on the replica.

A stream is one session; `run` owns them. The first is opened at start (unless the mount
starts ALONE); later ones by a resync (hafs.resync), which goes ALONE -> RESYNC -> MIRROR.
While a resync's last pass copies the tree, mutating calls wait at a gate (`begin_change`).
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import secrets
import select
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import trio

from hafs import _libc, manifest, ops
from hafs import protocol as p
from hafs.journal import Journal
from hafs.ops import Ack
from hafs.state import StateStore

log = logging.getLogger(__name__)

CONNECT_ATTEMPT_TIMEOUT = 2.0
# A rejoin's passes that copy while the application writes, at most, before the last one
# that pauses its writes (hafs.resync).
LIVE_PASSES = 4
IOV_BATCH = 512  # below IOV_MAX (1024)
# Ack modes that return writes at once: how many bytes may be sent and not yet applied
# before a write waits for the replica after all (memory and the watchdog stay bounded).
UNACKED_WINDOW = 8 << 20
# A call waiting for its ACK or SYNCED first waits on the loop's thread, in poll(2) on the
# stream and /dev/fuse, for at most this long: a reply that comes before the kernel has
# another request for us then costs no trip through trio's scheduler (measured: six
# epoll_wait per write + fdatasync without it). Longer waits go back to the loop.
INLINE_WAIT = 0.002


class Mode(StrEnum):
    CONNECTING = "CONNECTING"
    MIRROR = "MIRROR"
    ALONE = "ALONE"
    RESYNC = "RESYNC"  # still ALONE for the application (journaled) while a resync runs
    HELD = "HELD"  # the stream failed: unacknowledged calls wait for `alone` or `fence`
    FENCED = "FENCED"  # the node stepped down: mutating calls fail with EIO
    STANDALONE = "STANDALONE"


class ResyncInterrupted(Exception):
    """The resync's stream ended (the peer failed, or the mount was told to go ALONE)."""


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
        self.ack = Ack.APPLIED
        self.reason = ""
        self.hold_on_loss = False  # fencing: a failed stream goes HELD, not ALONE
        self._decided: trio.Event | None = None  # set when a HELD mount is told what to do
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
        # For the watchdog: when each unacknowledged frame, and each pending fsync, was sent;
        # with each frame's size, for the window of the ack modes that do not wait.
        self._unacked_since: deque[tuple[int, float, int]] = deque()
        self._unacked_bytes = 0
        self._sync_started: dict[int, float] = {}
        self._tiebreak = itertools.count()
        self._poller: select.poll | None = None  # the stream and /dev/fuse, for _wait_inline
        self._fuse_fd = -1
        self._cancel = trio.CancelScope()  # the current session's
        self._sessions: trio.Nursery | None = None
        self._gate: trio.Event | None = None  # set while mutating calls must wait
        self.resync_scope: trio.CancelScope | None = None  # the running resync's
        self.resync_status: dict[str, object] = {}
        self.live_passes = LIVE_PASSES
        self.resync_maxrate = 0  # bytes/s a resync's live passes send at most; 0: no cap
        self.resync_workers = manifest.WORKERS  # threads reading the tree (<rfs nbrei>)
        self.sent_ops = 0
        self.inline_replies = 0  # replies a waiting call read itself (_wait_inline)
        self.ack_rtt = 0.0  # smoothed seconds from sending an op to its ACK
        self.sync_rtt = 0.0  # smoothed seconds from sending an FSYNC to its SYNCED
        self._token = b""  # the running resync's session token (hafs.state `session`)
        if state.current.replica_of:
            # This directory now changes under a mount: it no longer is the copy some other
            # primary's session left, whatever that primary's journal says.
            state.update(replica_of="")

    # -- called by the file system handlers ----------------------------------------------

    @property
    def mirroring(self) -> bool:
        return self.mode is Mode.MIRROR

    async def begin_change(self, kind: str, ino: int, offset: int = 0, length: int = 0) -> None:
        """Before a local change: wait while a resync copies the tree, then journal if ALONE.

        The caller must make its change and `send` with no await after this returns.
        """
        while self._gate is not None:  # a loop: another resync may have closed it again
            await self._gate.wait()
        if self.mode is Mode.FENCED:
            raise OSError(errno.EIO, f"fenced: {self.reason}")
        self.journal_if_alone(kind, ino, offset, length)

    def journal_if_alone(self, kind: str, ino: int, offset: int = 0, length: int = 0) -> None:
        """Before a local change: in ALONE mode, make the journal line durable first."""
        if self.mode is Mode.ALONE or self.mode is Mode.RESYNC:
            self.journal.record(kind, self.path_of(ino), ino, offset, length)

    def pause_changes(self) -> None:
        """Make mutating calls wait in `begin_change` (reads go on)."""
        if self._gate is None:
            self._gate = trio.Event()

    def resume_changes(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.set()

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
            if frame.op is ops.Op.RENAME:
                self._journal_moved(frame)
            return 0
        seq = self._send_op(frame)
        if kind:
            self._inflight.append(Change(seq, kind, ino, offset, length))
            if also:
                self._inflight.extend(Change(seq, kind, other, 0, 0) for other in also)
        return seq

    def _journal_moved(self, frame: ops.OpFrame) -> None:
        """After a rename while ALONE: the entry now at the new name (and, exchanged, at
        the old one) must be compared whole by the resync; its parents' "entry" records
        only say that names changed there.

        After the change, not before: a crash in between leaves the journal unclean
        (hafs.journal), and then the resync trusts none of it.
        """
        if self.mode is not Mode.ALONE and self.mode is not Mode.RESYNC:
            return
        old_parent, new_parent, flags = frame.ints[:3]
        moved = [(new_parent, frame.blobs[1])]
        if flags & _libc.RENAME_EXCHANGE:
            moved.append((old_parent, frame.blobs[0]))
        for parent, name in moved:
            where = self.path_of(parent)
            path = os.fsdecode(name) if where == "." else f"{where}/{os.fsdecode(name)}"
            self.journal.record("moved", path, parent)

    def send_copy(self, frame: ops.OpFrame) -> int:
        """Queue one op of a resync's copy; raises ResyncInterrupted once the stream ended.

        Not journaled if in flight when the peer fails: the journal is kept until the copy
        is acknowledged, and the next resync compares everything again.
        """
        if self.mode is not Mode.RESYNC or self._writer is None:
            raise ResyncInterrupted(self.reason or f"mode is {self.mode.value}")
        return self._send_op(frame)

    def _send_op(self, frame: ops.OpFrame) -> int:
        seq = self._send_frame(p.FrameType.OP, ops.encode(frame))
        if frame.op is ops.Op.FSYNC:
            self._sync_started[seq] = self._unacked_since[-1][1]
        self.sent_ops += 1
        return seq

    def _send_frame(self, ftype: p.FrameType, parts: list[bytes]) -> int:
        assert self._writer is not None
        bufs = self._writer.seal(ftype, *parts)
        seq = self._writer.seq
        size = sum(map(len, bufs))
        self._unacked_since.append((seq, trio.current_time(), size))
        self._unacked_bytes += size
        self._transmit(bufs)
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

    def watch_requests(self, fuse_fd: int) -> None:
        """The mount's /dev/fuse fd: an inline wait ends when it has a request for us."""
        self._fuse_fd = fuse_fd

    def _wait_inline(self, done: Callable[[], bool]) -> None:
        """Read the replica's replies on this thread until done(), the kernel has another
        request for the mount, the stream has nothing for INLINE_WAIT, or it fails (the
        receiver task finds out how, as it would have)."""
        if self._raw is None or self._outbox or self._sending or self._fuse_fd < 0:
            return
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self._fuse_fd, select.POLLIN)
            self._poller.register(self._raw.fileno(), select.POLLIN)
        deadline = time.monotonic() + INLINE_WAIT
        while not done():
            left_ms = (deadline - time.monotonic()) * 1000
            if left_ms <= 0:
                return
            ready = self._poller.poll(left_ms)
            if not ready or any(fd == self._fuse_fd for fd, _ in ready):
                return
            try:
                data = self._raw.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                return
            if not data:
                return  # end of stream: left to the receiver
            try:
                self.inline_replies += self._on_bytes(data)
            except p.ProtocolError as e:
                self.lose(f"stream failed: {e}")
                return

    async def applied(self, seq: int) -> None:
        """Wait until the replica applied op seq (the watchdog bounds the wait)."""
        if seq == 0 or seq <= self._acked:
            return
        self._wait_inline(lambda: self._acked >= seq)
        if seq <= self._acked:
            return
        if self.mode is Mode.MIRROR or self.mode is Mode.RESYNC:
            event = trio.Event()
            heapq.heappush(self._ack_waiters, (seq, next(self._tiebreak), event))
            await event.wait()
        if seq > self._acked:
            await self._unacknowledged()

    async def written(self, seq: int) -> None:
        """After a WRITE op: wait as the ack mode says (APPLIED: for the replica)."""
        if self.ack is Ack.APPLIED or self._unacked_bytes > UNACKED_WINDOW:
            await self.applied(seq)

    def send_fsync(self, ino: int, datasync: bool) -> int:
        """Queue an FSYNC op; RECEIPT asks the replica to ACK it before its disk sync."""
        flags = ops.FSYNC_DATASYNC * datasync | ops.FSYNC_ACK_FIRST * (self.ack is Ack.RECEIPT)
        return self.send(ops.OpFrame(ops.Op.FSYNC, (ino, flags)))

    async def durable(self, seq: int) -> None:
        """After an FSYNC op: wait until the replica has it as the ack mode says."""
        if self.ack is Ack.RECEIPT and seq:
            await self.applied(seq)
        else:
            await self.synced(seq)

    async def synced(self, seq: int) -> None:
        """Wait until the replica made FSYNC op seq durable."""
        if seq and self.mode is Mode.MIRROR:
            # SYNCED may have arrived while the local fsync ran: its event is then set.
            event = self._sync_waiters.setdefault(seq, trio.Event())
            self._wait_inline(event.is_set)
            if event.is_set() and self.mode is Mode.MIRROR:
                self._sync_waiters.pop(seq, None)
                return
            try:
                await event.wait()
            finally:
                self._sync_waiters.pop(seq, None)
            if self.mode is Mode.MIRROR:
                return
        await self._unacknowledged()

    async def _unacknowledged(self) -> None:
        """A change the peer did not acknowledge: ALONE journaled it, so it may return;
        HELD waits for the controller's word; FENCED fails it."""
        if self.mode is Mode.HELD and self._decided is not None:
            await self._decided.wait()
        if self.mode is Mode.FENCED:
            raise OSError(errno.EIO, f"not replicated, fenced: {self.reason}")

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
            self.lose(f"peer did not acknowledge {what} within {self.timeout:g} s")
            return

    # -- degrade -------------------------------------------------------------------------

    def lose(self, reason: str) -> None:
        """The stream failed: HELD when fencing a mirroring mount, else ALONE (I5).

        Once HELD, only the controller's word (`degrade` or `fence`) moves the mount on."""
        if self.mode is Mode.HELD:
            return
        if self.hold_on_loss and self.mode is Mode.MIRROR:
            self._end_stream()
            self.mode = Mode.HELD
            self.reason = reason
            self._decided = trio.Event()
            self.pause_changes()
            log.error(
                "replication to %s stopped: %s; holding mutating calls until the "
                "controller says alone or fence",
                self._peer_text(),
                reason,
            )
        else:
            self.degrade(reason)

    def degrade(self, reason: str) -> None:
        """Stop replicating: journal what is in flight, persist ALONE, release waiters.

        Also ends a running resync and opens its gate: the waiting calls go on ALONE.
        """
        if self.mode not in (Mode.MIRROR, Mode.CONNECTING, Mode.RESYNC, Mode.HELD):
            return
        self._end_stream()
        self.mode = Mode.ALONE
        self.reason = reason
        log.error(
            "replication to %s stopped: %s; going ALONE (changes journaled)",
            self._peer_text(),
            reason,
        )
        self._release_calls()

    def fence(self, reason: str) -> None:
        """The node steps down: calls not acknowledged by the peer, and every later
        mutating call, fail with EIO (fencing: the peer may be taking over)."""
        if self.mode is Mode.STANDALONE or self.mode is Mode.FENCED:
            return
        self._end_stream()
        self.mode = Mode.FENCED
        self.reason = reason
        log.error("fenced: %s; mutating calls fail with EIO from now on", reason)
        self._release_calls()

    def _end_stream(self) -> None:
        """Journal what is in flight, persist ALONE, and close the stream and any resync."""
        # A resync's mode on disk is still ALONE, and so is a HELD mount's.
        switched = self.mode is Mode.MIRROR or self.mode is Mode.CONNECTING
        for change in self._inflight:
            if change.seq > self._acked:
                self.journal.record(
                    change.kind, self.path_of(change.ino), change.ino, change.offset, change.length
                )
        self._inflight.clear()
        # Everything in flight is journaled now: a later start has nothing unknown to fear.
        self.state.update(
            mode=Mode.ALONE.value,
            session_open=False,
            generation=self.state.current.generation + int(switched),
        )
        self._outbox.clear()
        self._unacked_since.clear()
        self._unacked_bytes = 0
        self._sync_started.clear()
        if self._raw is not None:
            trio.lowlevel.notify_closing(self._raw)  # the receiver may wait on it
            self._raw.close()
            self._raw = None
            self._poller = None
        self._cancel.cancel()
        if self.resync_scope is not None:
            self.resync_scope.cancel()

    def _release_calls(self) -> None:
        """Wake every call waiting for the peer; `_unacknowledged` tells each its fate."""
        for _, _, event in self._ack_waiters:
            event.set()
        self._ack_waiters.clear()
        for event in self._sync_waiters.values():
            event.set()
        self._sync_waiters.clear()
        if self._decided is not None:
            self._decided.set()
            self._decided = None
        self.resume_changes()

    def _peer_text(self) -> str:
        return f"{self.peer[0]}:{self.peer[1]}" if self.peer else "-"

    # -- sessions ------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the replication sessions until cancelled; open the first one if CONNECTING.

        Reports started once connected or ALONE: no file system request may be served while
        the mode is still CONNECTING, since its change would be neither sent nor journaled.
        """
        async with trio.open_nursery() as nursery:
            self._sessions = nursery
            if self.mode is Mode.CONNECTING:
                await self._start_mirroring()
            task_status.started()
            await trio.sleep_forever()

    async def _start_mirroring(self) -> None:
        try:
            await self.open_session()
        except (OSError, p.ProtocolError, trio.TooSlowError) as e:
            self.degrade(f"cannot reach the replica: {e}")
            return
        self.mode = Mode.MIRROR
        self.state.update(role="mount", mode=Mode.MIRROR.value, session_open=True)
        log.info("mirroring to %s", self._peer_text())
        # This mount was MIRROR when it last stopped, cleanly: it missed nothing, so the
        # replica may count itself synchronised (if it was up to date before).
        # Its token too: the replica's copy goes on being that session's.
        token = bytes.fromhex(self.state.current.session)
        self._send_frame(p.FrameType.RESYNC_DONE, [p.RESYNC_BODY.pack(0), token])

    async def open_session(self) -> None:
        """Connect and authenticate to the replica, then run the stream's tasks."""
        assert self._sessions is not None, "run() is not running"
        sock, keys = await self._connect()
        self._begin_session(sock, keys)
        await self._sessions.start(self._session, sock)

    def _begin_session(self, sock: trio.socket.SocketType, keys: p.SessionKeys) -> None:
        """A new stream numbers its frames from 1: nothing of the last one carries over."""
        self._sock = sock
        self._raw = socket.socket(fileno=os.dup(sock.fileno()))
        self._poller = None
        self._writer = p.FrameWriter(keys.send)
        self._reader = p.FrameReader(keys.recv)
        self._acked = 0
        self._sending = False
        self._outbox = []
        self._outbox_ready = trio.Event()
        self._ack_waiters.clear()
        self._sync_waiters.clear()
        self._inflight.clear()
        self._unacked_since.clear()
        self._unacked_bytes = 0
        self._sync_started.clear()

    async def _session(
        self, sock: trio.socket.SocketType, task_status: trio.TaskStatus[None]
    ) -> None:
        raw = self._raw
        self._cancel = trio.CancelScope()
        try:
            with self._cancel:
                task_status.started()
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._sender, sock)
                        nursery.start_soon(self._watchdog)
                        nursery.start_soon(self._receiver, raw)
                except* (OSError, p.ProtocolError) as group:  # trio wraps task errors
                    self.lose(f"stream failed: {group.exceptions[0]}")
        finally:
            sock.close()
            if raw is not None:
                raw.close()
            if self._raw is raw:
                self._raw = None

    async def _connect(self) -> tuple[trio.socket.SocketType, p.SessionKeys]:
        assert self.peer is not None and self.key is not None
        deadline = trio.current_time() + max(self.timeout, CONNECT_ATTEMPT_TIMEOUT)
        while True:
            try:
                with trio.fail_after(CONNECT_ATTEMPT_TIMEOUT):
                    return await self._try_connect()
            except (OSError, trio.TooSlowError):
                if trio.current_time() > deadline:
                    raise
                await trio.sleep(0.2)

    async def _try_connect(self) -> tuple[trio.socket.SocketType, p.SessionKeys]:
        assert self.peer is not None and self.key is not None
        sock = trio.socket.socket(socket.AF_INET6 if ":" in self.peer[0] else socket.AF_INET)
        try:
            await sock.connect(self.peer)
            keys = await _handshake(sock, self.key)
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, keys

    async def _sender(self, sock: trio.socket.SocketType) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready = trio.Event()
            bufs, self._outbox = self._outbox, []
            self._sending = True
            await _send_all(sock, bufs)
            self._sending = False

    async def _receiver(self, raw: socket.socket | None) -> None:
        """Read and handle the replica's replies. The raw socket, not trio's: its recv
        yields after reading, and a call's `_wait_inline` could then read the next bytes
        first. Here no other task runs between reading bytes and feeding them."""
        assert raw is not None
        while self._raw is raw:
            try:
                await trio.lowlevel.wait_readable(raw)
            except trio.ClosedResourceError:
                return  # _end_stream closed the stream
            if self._raw is not raw:
                return  # closed by _end_stream after the wakeup: the stream's fate is set
            try:
                data = raw.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue  # a call's inline wait read it first
            if not data:
                raise p.ProtocolError("replica closed the connection")
            self._on_bytes(data)

    def _on_bytes(self, data: bytes) -> int:
        """Handle the replies in bytes just read from the stream; how many frames."""
        self._reader.feed(data)
        frames = self._reader.frames()
        for frame in frames:
            self._on_frame(frame)
        return len(frames)

    def _on_frame(self, frame: p.Frame) -> None:
        if frame.ftype is p.FrameType.ACK:
            self._on_ack(p.ACK_BODY.unpack(frame.payload)[0])
        elif frame.ftype is p.FrameType.SYNCED:
            (seq,) = p.ACK_BODY.unpack(frame.payload)
            started = self._sync_started.pop(seq, None)
            if started is not None:
                self.sync_rtt = 0.9 * self.sync_rtt + 0.1 * (trio.current_time() - started)
            # It may come before its call waits (the local fsync ran meanwhile). In receipt
            # mode no call waits for an FSYNC op's SYNCED (only the watchdog): none to keep.
            if started is None or self.ack is not Ack.RECEIPT:
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
            _, sent_at, size = self._unacked_since.popleft()
            self._unacked_bytes -= size
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
        await self.applied(self._send_frame(p.FrameType.BYE, []))
        if self.mode is Mode.MIRROR:
            self.state.update(session_open=False)
            log.info("stream to %s drained and closed", self._peer_text())
        self._cancel.cancel()

    # -- resync (driven by hafs.resync) ---------------------------------------------------

    def start_resync(self) -> None:
        """ALONE -> RESYNC: calls still journal; a resync is bringing the peer back."""
        assert self.mode is Mode.ALONE, self.mode
        self.mode = Mode.RESYNC
        # A crash from here on leaves the peer's copy half-way: the next start says unclean.
        self.state.update(session_open=True)
        self._token = secrets.token_bytes(16)

    def finish_resync(self) -> int:
        """The copy is queued: mark it complete and mirror every change from here on.

        Called with no await since the last copy op, so no call can change the tree in
        between. Returns the marker's seq; `confirm_mirror` waits for it.
        """
        if self.mode is not Mode.RESYNC or self._writer is None:
            raise ResyncInterrupted(self.reason or f"mode is {self.mode.value}")
        seq = self._send_frame(p.FrameType.RESYNC_DONE, [p.RESYNC_BODY.pack(1), self._token])
        self.mode = Mode.MIRROR
        self.reason = ""
        self.resume_changes()
        return seq

    async def confirm_mirror(self, marker_seq: int) -> None:
        """Once the replica made the copy durable, the journal is covered: clear it, persist.

        Not under the watchdog: syncing a whole copy may well take longer than the
        timeout. A replica that dies or hangs meanwhile is found by the acks of the calls
        made meanwhile, or by the controller's heartbeats (its `alone` ends the wait).
        """
        await self.synced(marker_seq)
        if self.mode is not Mode.MIRROR:
            raise ResyncInterrupted(self.reason)
        self.journal.clear()
        # The replica persisted this token with the copy (before SYNCED): from here the
        # journal, empty, names every difference from its copy (hafs.resync trusts it).
        self.state.update(
            role="mount", mode=Mode.MIRROR.value, session_open=True, session=self._token.hex()
        )
        log.info("resync done: mirroring to %s", self._peer_text())

    def abort_resync(self, reason: str) -> None:
        """Back to ALONE (the journal untouched) with the reason; the gate opens. A repair
        running in MIRROR is cancelled first, so no copy op follows the released calls."""
        if self.resync_scope is not None:
            self.resync_scope.cancel()
        if self.mode is Mode.RESYNC:
            self.degrade(f"resync failed: {reason}")
        self.resume_changes()

    def snapshot(self) -> dict[str, object]:
        return {
            "mode": self.mode.value,
            "ack": self.ack.value,
            "peer": self._peer_text(),
            "reason": self.reason,
            "acked": self._acked,
            "sent_ops": self.sent_ops,
            "inline_replies": self.inline_replies,
            "ack_rtt_us": round(self.ack_rtt * 1e6),
            "sync_rtt_us": round(self.sync_rtt * 1e6),
            "inflight": len(self._inflight),
            "journal": self.journal.paths(),
            "resync": dict(self.resync_status),
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
