"""Blocking-socket plumbing shared by the replica server and the CLI clients."""

from __future__ import annotations

import json
import os
import socket

from hafs import manifest
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
    addr: tuple[str, int], key: bytes, timeout: float, build_timeout: float | None = None
) -> dict[str, manifest.Entry]:
    """Ask a replica server for the manifest of its copy (a VERIFY connection).

    timeout bounds the connection and authentication; build_timeout (default: timeout) each
    wait after that, the first of which lasts as long as the replica reads its whole tree.
    """
    return manifest.from_bytes(_fetch(addr, key, timeout, build_timeout, b""))


def fetch_partial(
    addr: tuple[str, int], key: bytes, timeout: float, scope: manifest.Scope
) -> manifest.Partial:
    """Ask a replica server for the manifest of the scope's paths, and its session token.

    The scope travels in the request frame, MACed like every frame.
    """
    request = json.dumps(scope.to_json(), ensure_ascii=True).encode("ascii")
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
