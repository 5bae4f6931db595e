"""Blocking-socket plumbing shared by the replica server and the CLI clients."""

from __future__ import annotations

import contextlib
import json
import os
import socket

from hafs import blocks, manifest
from hafs import protocol as p


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise p.ProtocolError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def client_handshake(sock: socket.socket, key: bytes, purpose: p.Purpose) -> p.SessionKeys:
    """Authenticate to a replica server (both sides prove they hold the key)."""
    ns = p.parse_hello(recv_exact(sock, p.HELLO.size))
    nc = os.urandom(p.NONCE_LEN)
    sock.sendall(p.client_auth(key, ns, nc, purpose))
    p.check_server_proof(key, ns, nc, purpose, recv_exact(sock, p.AUTH_OK.size))
    return p.derive_keys(key, ns, nc, is_client=True)


def server_handshake(sock: socket.socket, key: bytes) -> tuple[p.SessionKeys, p.Purpose]:
    ns = os.urandom(p.NONCE_LEN)
    sock.sendall(p.server_hello(ns))
    nc, purpose = p.check_client_auth(key, ns, recv_exact(sock, p.AUTH.size))
    sock.sendall(p.server_proof(key, ns, nc, purpose))
    return p.derive_keys(key, ns, nc, is_client=False), purpose


def connect(
    addr: tuple[str, int], key: bytes, purpose: p.Purpose, timeout: float
) -> tuple[socket.socket, p.SessionKeys]:
    sock = socket.create_connection(addr, timeout=timeout)
    try:
        keys = client_handshake(sock, key, purpose)
    except BaseException:
        sock.close()
        raise
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock, keys


def recv_frames(sock: socket.socket, reader: p.FrameReader) -> list[p.Frame]:
    """Block until at least one whole frame arrived; [] means the peer closed."""
    while True:
        # recv_into a reused buffer: recv(1 MiB) would mmap and munmap a fresh one per call.
        n = sock.recv_into(reader.scratch)
        if not n:
            return []
        reader.feed(memoryview(reader.scratch)[:n])
        frames = reader.frames()
        if frames:
            return frames


def fetch_manifest(
    addr: tuple[str, int],
    key: bytes,
    timeout: float,
    build_timeout: float | None = None,
    *,
    digests: bool = True,
) -> dict[str, manifest.Entry]:
    """Ask a replica server for the manifest of its copy (a VERIFY connection).

    timeout bounds the connection and authentication; build_timeout (default: timeout) each
    wait after that, the first of which lasts as long as the replica reads its whole tree.
    digests=False: no content read (every digest ""), for a comparison by size and mtime.
    """
    request = b"" if digests else WHOLE_WITHOUT_DIGESTS
    return manifest.from_bytes(_fetch(addr, key, timeout, build_timeout, request))


# The MANIFEST_REQ of the whole tree without digests; empty asks it with them.
WHOLE_WITHOUT_DIGESTS = b'{"whole":true,"digests":false}'


def fetch_exact(addr: tuple[str, int], key: bytes, timeout: float) -> bool:
    """Whether the replica's copy is exact (hafs.replica `copy_exact`): a block request
    for no file, answered by the reply's header alone."""
    client = BlockClient(addr, key, timeout, timeout)
    try:
        client.hashes(blocks.BlockRequest(blocks.BLOCK, os.urandom(blocks.SALT_LEN), ()))
    finally:
        client.close()
    assert client.exact is not None
    return client.exact


class BlockClient:
    """Asks a replica server for block hashes (hafs.blocks), request after request on one
    VERIFY connection, made at the first. One request at a time; `close` from any thread
    ends a request under way (it then raises OSError or ProtocolError)."""

    def __init__(
        self, addr: tuple[str, int], key: bytes, timeout: float, reply_timeout: float
    ) -> None:
        self.addr = addr
        self.key = key
        self.timeout = timeout  # connection and authentication
        self.reply_timeout = reply_timeout  # each wait for a frame of a reply
        self.exact: bool | None = None  # what the last reply said
        self._sock: socket.socket | None = None
        self._writer: p.FrameWriter | None = None
        self._reader: p.FrameReader | None = None
        self._closed = False

    def hashes(self, request: blocks.BlockRequest) -> list[blocks.FileBlocks | None]:
        """Per item, the replica's size and hashes of the file, or None if it has none."""
        sock, writer, reader = self._connection()
        sock.sendall(b"".join(writer.seal(p.FrameType.BLOCKS_REQ, request.to_bytes())))
        parser = blocks.ReplyParser(request)
        while True:
            frames = recv_frames(sock, reader)
            if not frames:
                raise p.ProtocolError("replica closed before the block hashes ended")
            for i, frame in enumerate(frames):
                if frame.ftype is not p.FrameType.BLOCKS:
                    raise p.ProtocolError(f"unexpected {frame.ftype.name} frame")
                if frame.payload:
                    parser.feed(frame.payload)
                    continue
                if not parser.done or i != len(frames) - 1:
                    raise p.ProtocolError("block reply does not match its request")
                self.exact = parser.exact
                return parser.results

    def _connection(self) -> tuple[socket.socket, p.FrameWriter, p.FrameReader]:
        if self._sock is None or self._writer is None or self._reader is None:
            if self._closed:
                raise p.ProtocolError("block client closed")
            sock, keys = connect(self.addr, self.key, p.Purpose.VERIFY, self.timeout)
            sock.settimeout(self.reply_timeout)
            self._sock = sock
            self._writer, self._reader = p.FrameWriter(keys.send), p.FrameReader(keys.recv)
        return self._sock, self._writer, self._reader

    def close(self) -> None:
        self._closed = True
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a recv under way in another thread
            sock.close()


def fetch_partial(
    addr: tuple[str, int], key: bytes, timeout: float, scope: manifest.Scope, digests: bool = True
) -> manifest.Partial:
    """Ask a replica server for the manifest of the scope's paths, and its session token.

    The scope travels in the request frame, MACed like every frame. digests=False: the
    replica reads no content (its answer is as quick as its metadata).
    """
    doc: dict[str, object] = dict(scope.to_json())
    if not digests:
        doc = {"scope": doc, "digests": False}
    request = json.dumps(doc, ensure_ascii=True).encode("ascii")
    return manifest.partial_from_bytes(_fetch(addr, key, timeout, None, request))


def _fetch(
    addr: tuple[str, int], key: bytes, timeout: float, build_timeout: float | None, request: bytes
) -> bytes:
    sock, keys = connect(addr, key, p.Purpose.VERIFY, timeout)
    with sock:
        sock.settimeout(timeout if build_timeout is None else build_timeout)
        writer, reader = p.FrameWriter(keys.send), p.FrameReader(keys.recv)
        sock.sendall(b"".join(writer.seal(p.FrameType.MANIFEST_REQ, request)))
        chunks: list[bytes] = []
        while True:
            frames = recv_frames(sock, reader)
            if not frames:
                raise p.ProtocolError("replica closed before the manifest ended")
            for frame in frames:
                if frame.ftype is not p.FrameType.MANIFEST:
                    raise p.ProtocolError(f"unexpected {frame.ftype.name} frame")
                if not frame.payload:
                    return b"".join(chunks)
                chunks.append(bytes(frame.payload))
