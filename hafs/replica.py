"""The replica server: accepts the authenticated stream of a mount and applies it in order.

Plain blocking sockets and threads, not trio: the server does one thing per connection.
Every op is acknowledged cumulatively (ACK of the last applied seq after each batch read
from the socket); an FSYNC op is answered with SYNCED once its fd is durable. An FSYNC of
a file with little written since its last sync (a redo log's commit) is synced on the
stream's thread at the end of its batch, after the batch's ACK went out, and SYNCED goes
out at once: handing it to a worker thread and back cost more than the sync itself on a
busy 2-CPU machine (futex ping-pong for the GIL, measured). Larger ones run on worker
threads so that the stream keeps being applied while the disk writes them back
(fdatasync releases the GIL).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from hafs import _libc, blocks, manifest, ops, wire
from hafs import protocol as p
from hafs.apply import Applier
from hafs.state import StateStore

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
LINGER_TIMEOUT = 10.0  # after refusing an op, for the primary to read why and hang up
SETTLE_TIMEOUT = 60.0  # at exit, for the session's copy to be synced
VERIFY_IDLE_TIMEOUT = 900.0  # between the requests of a VERIFY connection
JOURNAL = "journal"  # a mount's ALONE journal in the same state directory (hafs.mount)
MANIFEST_CHUNK = 4 << 20


@dataclass
class ReplicaStats:
    mode: str = "LISTENING"
    # A session is live and its primary said this copy is identical to its own (RESYNC_DONE):
    # the controller waits for this before it counts this node as a synchronised SECOND.
    synced: bool = False
    sessions: int = 0
    applied: int = 0
    refused: int = 0


class ReplicaServer:
    def __init__(
        self,
        data_dir: str,
        listen: tuple[str, int],
        key: bytes,
        state: StateStore,
        workers: int = manifest.WORKERS,
    ) -> None:
        self.data_dir = data_dir
        self.workers = workers  # threads reading the tree and hashing blocks (<rfs nbrei>)
        self.root_fd = os.open(data_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.key = key
        self.state = state
        self.listener = socket.create_server(listen, reuse_port=False)
        self.listen_addr = self.listener.getsockname()[:2]
        self._mirror_lock = threading.Lock()
        self._waiting = 0  # sessions waiting for the lock, to replace the current one
        self._waiting_lock = threading.Lock()
        self._mirror_sock: socket.socket | None = None
        self.stats = ReplicaStats()
        self._stop = threading.Event()
        if state.current.applying:
            # The last session ended with its copy not synced: this process or its node
            # crashed, which may have kept a file's new mtime and lost its new data. Nor
            # is the copy surely that session's any more: a primary's journal, which
            # names only what changed after it, must not be trusted (hafs.resync).
            log.warning("the last session was cut off before its copy was synced: not exact")
            state.update(exact="", applying=False, replica_of="")

    def snapshot(self) -> dict[str, object]:
        return {
            "role": "replica",
            "dir": self.data_dir,
            "listen": f"{self.listen_addr[0]}:{self.listen_addr[1]}",
            "uptodate": self.state.current.uptodate,
            **asdict(self.stats),
        }

    def stop(self) -> None:
        self._stop.set()
        self.listener.close()
        sock = self._mirror_sock
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)

    def serve_forever(self) -> None:
        while not self._stop.is_set():
            try:
                conn, addr = self.listener.accept()
            except OSError:
                break
            peer = f"{addr[0]}:{addr[1]}"
            threading.Thread(
                target=self._handle, args=(conn, peer), daemon=True, name=f"conn-{peer}"
            ).start()
        # Let a session stopped by stop() sync its copy and say so (`applying`), or the
        # next start would take the copy for one cut off by a crash.
        if self._mirror_lock.acquire(timeout=SETTLE_TIMEOUT):
            self._mirror_lock.release()

    def _handle(self, conn: socket.socket, peer: str) -> None:
        with conn:
            try:
                conn.settimeout(HANDSHAKE_TIMEOUT)
                keys, purpose = wire.server_handshake(conn, self.key)
                conn.settimeout(None)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except (p.ProtocolError, OSError, ValueError) as e:
                self.stats.refused += 1
                log.warning("refused connection from %s: %s", peer, e)
                return
            log.info("%s connection from %s authenticated", purpose.name, peer)
            if purpose is p.Purpose.MIRROR:
                self._mirror(conn, peer, keys)
            else:
                self._verify(conn, peer, keys)

    def _mirror(self, conn: socket.socket, peer: str, keys: p.SessionKeys) -> None:
        with self._waiting_lock:
            self._waiting += 1
        old = self._mirror_sock
        if old is not None:  # a new primary session supersedes a dead one
            log.info("new stream from %s replaces the previous one", peer)
            with contextlib.suppress(OSError):  # it may be gone already
                old.shutdown(socket.SHUT_RDWR)
        with self._mirror_lock:
            with self._waiting_lock:
                self._waiting -= 1
            self._mirror_sock = conn
            self.stats.sessions += 1
            self.stats.mode = "APPLYING"
            try:
                MirrorSession(self, conn, peer, keys).run()
            finally:
                self._mirror_sock = None
                self.stats.mode = "LISTENING"
                self.stats.synced = False

    def _verify(self, conn: socket.socket, peer: str, keys: p.SessionKeys) -> None:
        """A VERIFY connection: one manifest request, or block requests until it closes."""
        reader, writer = p.FrameReader(keys.recv), p.FrameWriter(keys.send)
        conn.settimeout(VERIFY_IDLE_TIMEOUT)  # a client that went away frees its thread
        try:
            while frames := wire.recv_frames(conn, reader):
                for frame in frames:
                    if frame.ftype is p.FrameType.MANIFEST_REQ:
                        data = self._manifest(bytes(frame.payload))
                        _send_chunked(conn, writer, p.FrameType.MANIFEST, data)
                        return
                    if frame.ftype is not p.FrameType.BLOCKS_REQ:
                        why = f"expected a manifest request or a block request: {frame.ftype.name}"
                        raise p.ProtocolError(why)
                    request = blocks.BlockRequest.from_bytes(bytes(frame.payload))
                    data = blocks.reply(self.root_fd, request, self.copy_exact(), self.workers)
                    _send_chunked(conn, writer, p.FrameType.BLOCKS, data)
        except (p.ProtocolError, OSError, manifest.ManifestError) as e:
            log.warning("verify request from %s failed: %s", peer, e)

    def _manifest(self, request: bytes) -> bytes:
        """The whole tree's manifest, or (a scope in the request) a partial one.

        A partial one carries the token of the last session this copy completed, if the
        copy is still that session's: the primary then trusts its journal (hafs.resync).
        """
        if not request:
            return manifest.to_bytes(manifest.build_manifest(self.root_fd))
        if request == wire.WHOLE_WITHOUT_DIGESTS:
            whole = manifest.build_manifest(self.root_fd, digests=False, workers=self.workers)
            return manifest.to_bytes(whole)
        try:
            doc = json.loads(request)
            digests = not (isinstance(doc, dict) and "scope" in doc)  # else {"scope", "digests"}
            if not digests and (set(doc) != {"scope", "digests"} or doc["digests"] is not False):
                raise manifest.ManifestError("a scoped request has a scope and digests false")
            scope = manifest.Scope.from_json(doc if digests else doc["scope"])
        except ValueError as e:  # ManifestError included
            raise p.ProtocolError(f"malformed manifest request: {e}") from e
        part = manifest.build_partial(self.root_fd, scope, digests=digests)
        return manifest.to_bytes(part.entries, part.loose, self.completed_session())

    def root_id(self) -> str:
        st = os.fstat(self.root_fd)
        return f"{st.st_dev}:{st.st_ino}"

    def session_waiting(self) -> bool:
        with self._waiting_lock:
            return self._waiting > 0

    def history(self) -> str:
        """What describes the changes made to this directory other than by replication.

        A mount on it that makes a change its peer may not have goes ALONE (`mode`,
        `generation`), journals it (the journal grows) or dies with the journal open
        (`journal.live` stays, see `copy_exact`): each changes this, or is seen there.
        """
        current = self.state.current
        try:
            journal = (self.state.dir / JOURNAL).stat().st_size
        except FileNotFoundError:
            journal = 0
        return f"{self.root_id()} {current.mode} {current.generation} {journal}"

    def copy_exact(self) -> bool:
        """Whether every file's size and mtime tell its content (hafs.resync may compare by
        them alone): since the copy was made identical to a primary's and durable, only
        replication ops changed it, each applied whole and synced before its session
        ended (else `applying` voided it at start), and no mount changed it unreplicated.
        """
        exact = self.state.current.exact
        live = (self.state.dir / f"{JOURNAL}.live").exists()  # a mount died here
        return bool(exact) and exact == self.history() and not live

    def mark_exact(self) -> str:
        """The `exact` of a copy just made identical to a primary's and durable.

        A `journal.live` left by a mount that died here before is removed: the copy is no
        longer what that mount left, and one found from now on is a later mount's.
        """
        (self.state.dir / f"{JOURNAL}.live").unlink(missing_ok=True)
        return self.history()

    def sync_copy(self) -> None:
        """Flush the whole copy to disk (syncfs on its file system)."""
        _libc.syncfs_dir(self.root_fd)

    def completed_session(self) -> str:
        """The token of the last session completed on this very directory, or ""."""
        current = self.state.current
        token, _, root = current.replica_of.rpartition("@")
        if not token or not current.uptodate or root != self.root_id():
            return ""  # another directory now (replaced), or behind since
        return token


class MirrorSession:
    """One primary's stream: decode, confine, apply, acknowledge."""

    def __init__(
        self, server: ReplicaServer, conn: socket.socket, peer: str, keys: p.SessionKeys
    ) -> None:
        self.server = server
        self.conn = conn
        self.peer = peer
        self.reader = p.FrameReader(keys.recv)
        self.writer = p.FrameWriter(keys.send)
        self.send_lock = threading.Lock()
        self.applier = Applier(server.root_fd)
        self.syncs = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fsync")
        self.unsynced: dict[int, int] = {}  # ino -> bytes written since its last FSYNC
        # FSYNCs of this batch synced on the stream's thread at its end: (fd, datasync, seq)
        self.inline: list[tuple[int, bool, int]] = []
        self.ack_first = False  # an FSYNC of this batch asked for its ACK before the sync
        self.failed = False
        self.was_uptodate = server.state.current.uptodate
        # A refusal and a completed RESYNC_DONE sync may race (different threads): the
        # refusal must win, whatever the order.
        self.verdict_lock = threading.Lock()

    def run(self) -> None:
        state = self.server.state
        # Until this session's RESYNC_DONE, the copy may be anything between the old one
        # and the primary's: a crash in between must not leave it claiming to be up to date.
        # Nor may it claim any earlier session's copy (replica_of): ops of this one follow.
        # A mount's token kept in this state directory is void too: it applies here no more.
        # `applying`: a crash before this session's copy is synced voids `exact`.
        state.update(
            role="replica",
            session_open=True,
            uptodate=False,
            replica_of="",
            session="",
            applying=True,
        )
        clean = False
        try:
            clean = self._loop()
        except p.ProtocolError as e:
            self.server.stats.refused += 1
            log.error("stream from %s refused: %s; nothing after it applied", self.peer, e)
        except OSError as e:
            log.warning("stream from %s broke: %s", self.peer, e)
        finally:
            self._close_inline()
            self.syncs.shutdown(wait=True)
            self.applier.close()
            self._settle()
        if clean:
            state.update(session_open=False)
            log.info("stream from %s ended cleanly", self.peer)
        elif self.failed:
            self._linger()

    def _settle(self) -> None:
        """However the session ended: sync what it applied, then clear `applying`. Each op
        was applied whole, so the copy stays exact once on disk.

        Not while another session waits to start: it would wait for the sync, and its
        primary's watchdog with it. `applying` stays set, and that session's end syncs
        for both.
        """
        if self.server.session_waiting():
            return
        try:
            self.server.sync_copy()
        except OSError as e:
            log.error("syncfs after the stream from %s failed: %s: copy not exact", self.peer, e)
            self.server.state.update(exact="", applying=False)
            return
        self.server.state.update(applying=False)

    def _linger(self) -> None:
        """After FAILED: drop what the primary still sends until it hangs up. Closing with
        its frames unread would reset the connection, and it might never read why."""
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_WR)
            self.conn.settimeout(LINGER_TIMEOUT)
            while self.conn.recv_into(self.reader.scratch):
                pass

    def _loop(self) -> bool:
        while True:
            frames = wire.recv_frames(self.conn, self.reader)
            if not frames:
                log.warning("stream from %s closed without BYE", self.peer)
                return False
            last = 0
            for frame in frames:
                if frame.ftype is p.FrameType.BYE:
                    if not self._end_batch(last, True):
                        return False
                    self._send(p.FrameType.ACK, p.ACK_BODY.pack(frame.seq))
                    return True
                if frame.ftype is p.FrameType.RESYNC_DONE:
                    self._resync_done(frame)
                    last = frame.seq
                    continue
                if frame.ftype is not p.FrameType.OP:
                    raise p.ProtocolError(f"unexpected {frame.ftype.name} frame in a stream")
                if not self._apply(frame):
                    self._close_inline()
                    return False
                last = frame.seq
            ack_first, self.ack_first = self.ack_first or len(self.inline) < len(frames), False
            if not self._end_batch(last, ack_first):
                return False

    def _end_batch(self, last: int, ack_first: bool) -> bool:
        """ACK the batch; sync its small FSYNCs here, then SYNCED them (with the ACK if no
        op of the batch but the FSYNCs waits for it). False if a sync failed."""
        if not self.inline:
            if last:
                self._send(p.FrameType.ACK, p.ACK_BODY.pack(last))
            return True
        replies: list[tuple[p.FrameType, bytes]] = []
        if last:
            if ack_first:  # writes of other calls wait for it: not behind the disk
                self._send(p.FrameType.ACK, p.ACK_BODY.pack(last))
            else:
                replies.append((p.FrameType.ACK, p.ACK_BODY.pack(last)))
        inline, self.inline = self.inline, []
        for i, (fd, datasync, seq) in enumerate(inline):
            try:
                (os.fdatasync if datasync else os.fsync)(fd)
            except OSError as e:
                for later, _, _ in inline[i + 1 :]:
                    os.close(later)
                self._refuse(seq, e.errno or errno.EIO, f"fsync failed: {e}")
                return False
            finally:
                os.close(fd)
            replies.append((p.FrameType.SYNCED, p.ACK_BODY.pack(seq)))
        self._send_many(replies)
        return True

    def _close_inline(self) -> None:
        inline, self.inline = self.inline, []
        for fd, _, _ in inline:
            os.close(fd)

    def _apply(self, frame: p.Frame) -> bool:
        try:
            op = ops.decode(frame.payload)
        except p.ProtocolError as e:
            self._refuse(frame.seq, errno.EPROTO, f"malformed op: {e}")
            raise
        try:
            self.applier.apply(op)
            if op.op is ops.Op.WRITE:
                ino = op.ints[0]
                self.unsynced[ino] = self.unsynced.get(ino, 0) + len(op.blobs[0])
            elif op.op is ops.Op.FORGET:
                self.unsynced.pop(op.ints[0], None)
            elif op.op is ops.Op.FSYNC:
                ino, flags = op.ints
                fd = self.applier.fsync_target(ino)
                datasync = bool(flags & ops.FSYNC_DATASYNC)
                self.ack_first = self.ack_first or bool(flags & ops.FSYNC_ACK_FIRST)
                if self.unsynced.pop(ino, 0) <= ops.INLINE_SYNC_BYTES:
                    self.inline.append((fd, datasync, frame.seq))
                else:
                    self.syncs.submit(self._sync, fd, datasync, frame.seq)
        except p.ProtocolError as e:
            self._refuse(frame.seq, errno.EPERM, f"refused {op.op.name}: {e}")
            raise
        except OSError as e:
            self._refuse(frame.seq, e.errno or errno.EIO, f"could not apply {op.op.name}: {e}")
            return False
        self.server.stats.applied += 1
        return True

    def _resync_done(self, frame: p.Frame) -> None:
        """The copy now equals the primary's: make it durable, then say so (I7).

        The file system sync runs on a sync thread, as an FSYNC does, so the stream keeps
        being applied and acknowledged meanwhile; SYNCED answers it.
        """
        try:
            (copied,) = p.RESYNC_BODY.unpack_from(frame.payload)
            # Then the mount's session token (hafs.state), absent from older mounts.
            token = bytes(frame.payload[p.RESYNC_BODY.size :]).hex()
        except struct.error as e:
            raise p.ProtocolError(f"malformed RESYNC_DONE: {e}") from e
        if not copied and not self.was_uptodate:
            # A mount that starts in MIRROR vouches only for having missed nothing since
            # its last session; this copy was already behind before that.
            log.warning("stream from %s: copy not up to date, it needs a resync", self.peer)
            return
        self.syncs.submit(self._sync_copy, frame.seq, bool(copied), token)

    def _sync_copy(self, seq: int, copied: bool, token: str = "") -> None:
        try:
            self.server.sync_copy()  # the copy must survive a crash before uptodate says so
        except OSError as e:
            self._refuse(seq, e.errno or errno.EIO, f"syncfs failed: {e}")
            with contextlib.suppress(OSError):
                self.conn.shutdown(socket.SHUT_RDWR)
            return
        with self.verdict_lock:
            if self.failed:
                return
            replica_of = f"{token}@{self.server.root_id()}" if token else ""
            exact = self.server.state.current.exact
            if copied:  # the copy is identical to the primary's, and now durable
                exact = self.server.mark_exact()
            self.server.state.update(uptodate=True, replica_of=replica_of, exact=exact)
            self.server.stats.synced = True
        log.info("stream from %s: copy %s", self.peer, "resynchronised" if copied else "in sync")
        with contextlib.suppress(OSError):  # a broken stream is noticed by the main loop
            self._send(p.FrameType.SYNCED, p.ACK_BODY.pack(seq))

    def _refuse(self, seq: int, err: int, why: str) -> None:
        """Tell the primary nothing from seq on was applied; this copy is now behind."""
        log.error("stream from %s, op %d: %s", self.peer, seq, why)
        with self.verdict_lock:
            self.failed = True
            self.server.stats.synced = False
            self.server.state.update(uptodate=False)
        with contextlib.suppress(OSError):
            self._send(p.FrameType.FAILED, p.FAILED_BODY.pack(seq, err))

    def _sync(self, fd: int, datasync: bool, seq: int) -> None:
        try:
            (os.fdatasync if datasync else os.fsync)(fd)
        except OSError as e:
            self._refuse(seq, e.errno or errno.EIO, f"fsync failed: {e}")
            with contextlib.suppress(OSError):
                self.conn.shutdown(socket.SHUT_RDWR)
            return
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):  # a broken stream is noticed by the main loop
            self._send(p.FrameType.SYNCED, p.ACK_BODY.pack(seq))

    def _send(self, ftype: p.FrameType, payload: bytes) -> None:
        with self.send_lock:
            try:
                self.conn.sendall(b"".join(self.writer.seal(ftype, payload)))
            except OSError:
                if ftype is not p.FrameType.FAILED:
                    raise

    def _send_many(self, frames: list[tuple[p.FrameType, bytes]]) -> None:
        """Several frames in one send: one wakeup of the primary's receiver, not several."""
        with self.send_lock:
            parts = [part for ftype, payload in frames for part in self.writer.seal(ftype, payload)]
            self.conn.sendall(b"".join(parts))


def _send_chunked(
    conn: socket.socket, writer: p.FrameWriter, ftype: p.FrameType, data: bytes
) -> None:
    """data in frames of at most MANIFEST_CHUNK, then an empty frame that ends it."""
    for start in range(0, len(data), MANIFEST_CHUNK):
        conn.sendall(b"".join(writer.seal(ftype, data[start : start + MANIFEST_CHUNK])))
    conn.sendall(b"".join(writer.seal(ftype)))
