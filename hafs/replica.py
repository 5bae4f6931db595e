"""The replica server: accepts the authenticated stream of a mount and applies it in order.

Plain blocking sockets and threads, not trio: the server does one thing per connection,
and fsyncs run on worker threads so that the stream keeps being applied while the disk
syncs (fdatasync releases the GIL). Every op is acknowledged cumulatively (ACK of the
last applied seq after each batch read from the socket); an FSYNC op is answered with
SYNCED once its fd is durable.
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

from hafs import _libc, manifest, ops, wire
from hafs import protocol as p
from hafs.apply import Applier
from hafs.state import StateStore

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
LINGER_TIMEOUT = 10.0  # after refusing an op, for the primary to read why and hang up
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
        self, data_dir: str, listen: tuple[str, int], key: bytes, state: StateStore
    ) -> None:
        self.data_dir = data_dir
        self.root_fd = os.open(data_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.key = key
        self.state = state
        self.listener = socket.create_server(listen, reuse_port=False)
        self.listen_addr = self.listener.getsockname()[:2]
        self._mirror_lock = threading.Lock()
        self._mirror_sock: socket.socket | None = None
        self.stats = ReplicaStats()
        self._stop = threading.Event()

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
                self._send_manifest(conn, peer, keys)

    def _mirror(self, conn: socket.socket, peer: str, keys: p.SessionKeys) -> None:
        old = self._mirror_sock
        if old is not None:  # a new primary session supersedes a dead one
            log.info("new stream from %s replaces the previous one", peer)
            with contextlib.suppress(OSError):  # it may be gone already
                old.shutdown(socket.SHUT_RDWR)
        with self._mirror_lock:
            self._mirror_sock = conn
            self.stats.sessions += 1
            self.stats.mode = "APPLYING"
            try:
                MirrorSession(self, conn, peer, keys).run()
            finally:
                self._mirror_sock = None
                self.stats.mode = "LISTENING"
                self.stats.synced = False

    def _send_manifest(self, conn: socket.socket, peer: str, keys: p.SessionKeys) -> None:
        reader, writer = p.FrameReader(keys.recv), p.FrameWriter(keys.send)
        try:
            frames = wire.recv_frames(conn, reader)
            if not frames or frames[0].ftype is not p.FrameType.MANIFEST_REQ:
                raise p.ProtocolError("expected a manifest request")
            data = self._manifest(bytes(frames[0].payload))
            for start in range(0, len(data), MANIFEST_CHUNK):
                conn.sendall(
                    b"".join(
                        writer.seal(p.FrameType.MANIFEST, data[start : start + MANIFEST_CHUNK])
                    )
                )
            conn.sendall(b"".join(writer.seal(p.FrameType.MANIFEST)))
        except (p.ProtocolError, OSError, manifest.ManifestError) as e:
            log.warning("verify request from %s failed: %s", peer, e)

    def _manifest(self, request: bytes) -> bytes:
        """The whole tree's manifest, or (a scope in the request) a partial one.

        A partial one carries the token of the last session this copy completed, if the
        copy is still that session's: the primary then trusts its journal (hafs.resync).
        """
        if not request:
            return manifest.to_bytes(manifest.build_manifest(self.root_fd))
        try:
            scope = manifest.Scope.from_json(json.loads(request))
        except ValueError as e:  # ManifestError included
            raise p.ProtocolError(f"malformed manifest request: {e}") from e
        part = manifest.build_partial(self.root_fd, scope)
        return manifest.to_bytes(part.entries, part.loose, self.completed_session())

    def root_id(self) -> str:
        st = os.fstat(self.root_fd)
        return f"{st.st_dev}:{st.st_ino}"

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
        state.update(role="replica", session_open=True, uptodate=False, replica_of="", session="")
        clean = False
        try:
            clean = self._loop()
        except p.ProtocolError as e:
            self.server.stats.refused += 1
            log.error("stream from %s refused: %s; nothing after it applied", self.peer, e)
        except OSError as e:
            log.warning("stream from %s broke: %s", self.peer, e)
        finally:
            self.syncs.shutdown(wait=True)
            self.applier.close()
        if clean:
            state.update(session_open=False)
            log.info("stream from %s ended cleanly", self.peer)
        elif self.failed:
            self._linger()

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
                    self._send(p.FrameType.ACK, p.ACK_BODY.pack(frame.seq))
                    return True
                if frame.ftype is p.FrameType.RESYNC_DONE:
                    self._resync_done(frame)
                    last = frame.seq
                    continue
                if frame.ftype is not p.FrameType.OP:
                    raise p.ProtocolError(f"unexpected {frame.ftype.name} frame in a stream")
                if not self._apply(frame):
                    return False
                last = frame.seq
            self._send(p.FrameType.ACK, p.ACK_BODY.pack(last))

    def _apply(self, frame: p.Frame) -> bool:
        try:
            op = ops.decode(frame.payload)
        except p.ProtocolError as e:
            self._refuse(frame.seq, errno.EPROTO, f"malformed op: {e}")
            raise
        try:
            self.applier.apply(op)
            if op.op is ops.Op.FSYNC:
                fd = self.applier.fsync_target(op.ints[0])
                self.syncs.submit(self._sync, fd, bool(op.ints[1]), frame.seq)
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
            fd = os.open(f"/proc/self/fd/{self.server.root_fd}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _libc.syncfs(fd)  # the copy must survive a crash before uptodate says so
            finally:
                os.close(fd)
        except OSError as e:
            self._refuse(seq, e.errno or errno.EIO, f"syncfs failed: {e}")
            with contextlib.suppress(OSError):
                self.conn.shutdown(socket.SHUT_RDWR)
            return
        with self.verdict_lock:
            if self.failed:
                return
            replica_of = f"{token}@{self.server.root_id()}" if token else ""
            self.server.state.update(uptodate=True, replica_of=replica_of)
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
