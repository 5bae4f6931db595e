"""The one wire format of hafs: authenticated, versioned, length-prefixed frames.

Connection set-up (both sides hold the same cluster key K):
  server -> client  HELLO    magic, version, 32-byte server nonce
  client -> server  AUTH     32-byte client nonce, purpose byte, HMAC(K, "client"|Ns|Nc|purpose)
  server -> client  AUTH_OK  HMAC(K, "server"|Ns|Nc|purpose)
Both then derive one session key per direction from K and the two nonces, so a recorded
session cannot be replayed into a new one. Every later frame is

  header  !BBIQ  version, type, payload length, sequence number
  payload
  mac     16-byte keyed BLAKE2b over header and payload

and the sequence number of each direction must be exactly the previous one plus one, so a
dropped, reordered or replayed frame is detected. See docs/protocol.md.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from enum import IntEnum

VERSION = 1
MAGIC = b"HAFS"
NONCE_LEN = 32
MAC_LEN = 16
MAX_PAYLOAD = 8 << 20  # a FUSE write is at most 1 MiB; anything far larger is malformed
HEADER = struct.Struct("!BBIQ")
HELLO = struct.Struct(f"!4sB{NONCE_LEN}s")
AUTH = struct.Struct(f"!{NONCE_LEN}sB32s")
AUTH_OK = struct.Struct("!32s")


class ProtocolError(Exception):
    """The peer sent something that is not a valid hafs frame; the connection must close."""


class AuthError(ProtocolError):
    """The peer could not prove it holds the cluster key."""


class Purpose(IntEnum):
    """What a connection is for, fixed at authentication."""

    MIRROR = 1  # the replication stream of a mount
    VERIFY = 2  # a manifest request
    ADMIN = 3  # node to node: the daemons' admin channel (hafs module apply)


class FrameType(IntEnum):
    OP = 1  # primary -> replica: one operation (see hafs.ops)
    ACK = 2  # replica -> primary: every op up to seq applied
    SYNCED = 3  # replica -> primary: the FSYNC op with this seq is durable
    FAILED = 4  # replica -> primary: op seq could not be applied; nothing after it is
    BYE = 5  # primary -> replica: clean end of stream, everything was sent
    MANIFEST_REQ = 6
    MANIFEST = 7  # one chunk of a manifest; an empty chunk ends it
    HEARTBEAT = 8
    # primary -> replica: everything before this frame makes the replica's copy identical
    # to the primary's (RESYNC_BODY: 1 after a resync, 0 from a start in MIRROR)
    RESYNC_DONE = 10
    MODULE = 11  # admin: JSON header line + a zipped module, to install on the peer
    MODULE_RESULT = 12  # admin: JSON {"ok", "message"}
    # verify client <-> replica: JSON {"block", "salt", "items": [[path, first, count]]};
    # answered by BLOCKS frames of records (hafs.blocks), an empty one ends each reply
    BLOCKS_REQ = 13
    BLOCKS = 14


ACK_BODY = struct.Struct("!Q")
FAILED_BODY = struct.Struct("!QI")
RESYNC_BODY = struct.Struct("!B")


def read_key(path: str) -> bytes:
    """Load a cluster key file written by `hafs keygen`."""
    with open(path, "rb") as f:
        data = f.read().strip()
    try:
        key = bytes.fromhex(data.decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise AuthError(f"{path}: not a hafs key (expected hex)") from e
    if len(key) < 16:
        raise AuthError(f"{path}: key too short ({len(key)} bytes, need at least 16)")
    return key


def new_key() -> bytes:
    return os.urandom(32)


def _hmac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"|".join(parts), hashlib.sha256).digest()


@dataclass(frozen=True)
class SessionKeys:
    send: bytes
    recv: bytes


def derive_keys(key: bytes, ns: bytes, nc: bytes, is_client: bool) -> SessionKeys:
    c2s = _hmac(key, b"hafs-c2s", ns, nc)
    s2c = _hmac(key, b"hafs-s2c", ns, nc)
    return SessionKeys(send=c2s, recv=s2c) if is_client else SessionKeys(send=s2c, recv=c2s)


def server_hello(ns: bytes) -> bytes:
    return HELLO.pack(MAGIC, VERSION, ns)


def parse_hello(data: bytes) -> bytes:
    magic, version, ns = HELLO.unpack(data)
    if magic != MAGIC:
        raise ProtocolError("peer is not a hafs replica server (bad magic)")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} not supported (this is {VERSION})")
    return ns


def client_auth(key: bytes, ns: bytes, nc: bytes, purpose: Purpose) -> bytes:
    p = bytes([purpose])
    return AUTH.pack(nc, purpose, _hmac(key, b"hafs-client", ns, nc, p))


def check_client_auth(key: bytes, ns: bytes, data: bytes) -> tuple[bytes, Purpose]:
    nc, purpose, proof = AUTH.unpack(data)
    if not hmac.compare_digest(proof, _hmac(key, b"hafs-client", ns, nc, bytes([purpose]))):
        raise AuthError("client failed to prove it holds the cluster key")
    try:
        return nc, Purpose(purpose)
    except ValueError as e:
        raise ProtocolError(f"unknown connection purpose {purpose}") from e


def server_proof(key: bytes, ns: bytes, nc: bytes, purpose: Purpose) -> bytes:
    return AUTH_OK.pack(_hmac(key, b"hafs-server", ns, nc, bytes([purpose])))


def check_server_proof(key: bytes, ns: bytes, nc: bytes, purpose: Purpose, data: bytes) -> None:
    expected = _hmac(key, b"hafs-server", ns, nc, bytes([purpose]))
    if not hmac.compare_digest(AUTH_OK.unpack(data)[0], expected):
        raise AuthError("server failed to prove it holds the cluster key")


def _keyed_mac(key: bytes) -> hashlib.blake2b:
    """A frame MAC state keyed once per session direction; copied per frame, a tenth of
    the cost of keying a new one (measured)."""
    return hashlib.blake2b(key=key[:64], digest_size=MAC_LEN)


class FrameWriter:
    """Seals outgoing frames of one direction of one session."""

    def __init__(self, key: bytes) -> None:
        self._keyed = _keyed_mac(key)
        self.seq = 0

    def seal(self, ftype: FrameType, *parts: bytes) -> list[bytes]:
        """Return the frame as buffers for one sendmsg (the parts are not copied)."""
        self.seq += 1
        length = sum(len(part) for part in parts)
        header = HEADER.pack(VERSION, ftype, length, self.seq)
        mac = self._keyed.copy()
        mac.update(header)
        for part in parts:
            mac.update(part)
        return [header, *parts, mac.digest()]


@dataclass(frozen=True)
class Frame:
    ftype: FrameType
    seq: int
    payload: memoryview


class FrameReader:
    """Parses and authenticates incoming frames of one direction of one session.

    Feed it bytes with `feed`; `frames()` yields every complete frame. Any defect (bad
    version, oversize, bad MAC, sequence gap, unknown type) raises ProtocolError: the
    caller must drop the connection, since nothing after a bad frame can be trusted.
    """

    def __init__(self, key: bytes) -> None:
        self._keyed = _keyed_mac(key)
        self._buf = bytearray()
        self.seq = 0
        self.scratch = bytearray(1 << 18)  # receive buffer for blocking-socket readers

    def feed(self, data: bytes | memoryview) -> None:
        self._buf += data

    def frames(self) -> list[Frame]:
        out: list[Frame] = []
        buf = self._buf
        pos = 0
        view = memoryview(buf)
        try:
            while len(buf) - pos >= HEADER.size:
                version, ftype, length, seq = HEADER.unpack_from(buf, pos)
                if version != VERSION:
                    raise ProtocolError(f"frame version {version}, expected {VERSION}")
                if length > MAX_PAYLOAD:
                    raise ProtocolError(f"frame of {length} bytes exceeds {MAX_PAYLOAD}")
                end = pos + HEADER.size + length + MAC_LEN
                if len(buf) < end:
                    break
                out.append(self._check(view, pos, ftype, length, seq))
                pos = end
            # Frames keep views into the old buffer, so start a new one rather than shift it.
            rest = bytes(view[pos:])
        finally:
            view.release()
        if pos:
            self._buf = bytearray(rest)
        return out

    def _check(self, view: memoryview, pos: int, ftype: int, length: int, seq: int) -> Frame:
        header = view[pos : pos + HEADER.size]
        body_start = pos + HEADER.size
        payload = view[body_start : body_start + length]
        mac = view[body_start + length : body_start + length + MAC_LEN]
        expected = self._keyed.copy()
        expected.update(header)
        expected.update(payload)
        if not hmac.compare_digest(bytes(mac), expected.digest()):
            raise ProtocolError(f"frame {seq}: bad MAC (not from the peer, or corrupted)")
        if seq != self.seq + 1:
            raise ProtocolError(f"frame {seq}: expected sequence {self.seq + 1}")
        try:
            kind = FrameType(ftype)
        except ValueError as e:
            raise ProtocolError(f"frame {seq}: unknown type {ftype}") from e
        self.seq = seq
        return Frame(kind, seq, memoryview(bytes(payload)))
