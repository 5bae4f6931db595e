"""The operations a mount streams to its replica, and their encoding inside an OP frame.

Files are named by the primary's inode number ("ino"), never by path: the replica keeps a
map ino -> O_PATH fd of its own copy, filled by BIND and by the ops that create entries.
A directory entry is (parent ino, name) where name is one path component. That keeps
renamed directories and open-but-unlinked files exact, and confines the replica (I4): a
name can never be "..", "." or contain "/".

Payload: !B opcode, !B n_ints, n_ints * !q, !B n_blobs, n_blobs * (!I len, bytes),
!H n_times, n_times * (!Qqq ino, atime_ns, mtime_ns). The times trailer carries the times
the primary's files have after the op, so the replica's mtimes equal the primary's.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum

from hafs.protocol import ProtocolError

# An fsync of a file with at most this much written since its last sync runs on the loop
# thread: handing it to a worker thread and back cost more than the sync itself (a redo
# log's commit: a few KiB). Larger ones (a checkpoint's data file) go to a thread, so the
# loop keeps serving while the disk writes them back. HAFS_INLINE_SYNC_BYTES=-1 sends every
# sync to a thread (mount and replica), as before: the switch this was measured with.
INLINE_SYNC_BYTES = int(os.environ.get("HAFS_INLINE_SYNC_BYTES", 256 << 10))

ROOT_INO = 1


class Op(IntEnum):
    BIND = 1  # ints: ino, parent                blobs: name
    FORGET = 2  # ints: ino
    CREATE = 3  # ints: parent, ino, mode, uid, gid  blobs: name      (regular file)
    MKDIR = 4  # ints: parent, ino, mode, uid, gid  blobs: name
    MKNOD = 5  # ints: parent, ino, mode, uid, gid, rdev  blobs: name
    SYMLINK = 6  # ints: parent, ino, uid, gid       blobs: name, target
    LINK = 7  # ints: ino, newparent             blobs: newname
    UNLINK = 8  # ints: parent                     blobs: name
    RMDIR = 9  # ints: parent                      blobs: name
    RENAME = 10  # ints: parent, newparent, flags  blobs: name, newname
    WRITE = 11  # ints: ino, offset               blobs: data
    TRUNCATE = 12  # ints: ino, size
    CHMOD = 13  # ints: ino, mode
    CHOWN = 14  # ints: ino, uid, gid
    SETXATTR = 15  # ints: ino, flags             blobs: name, value
    REMOVEXATTR = 16  # ints: ino                 blobs: name
    FSYNC = 17  # ints: ino, flags (FSYNC_*)  -> SYNCED once durable on the replica
    TIMES = 18  # only the times trailer (utimens)


class Ack(StrEnum):
    """When a mutating call returns on the primary (design.md I1). The default, APPLIED,
    is DRBD's protocol C; the others trade guarantees for fewer round trips."""

    # Every call once the replica applied it; fsync once the data is durable on both nodes.
    APPLIED = "applied"
    # A write at once (streamed in order); fsync, and every other call, as APPLIED. An
    # fsynced change survives the loss of the primary; a write not yet fsynced may be lost
    # with it, as it may be by a local power cut (the replica is a prefix of the stream).
    FSYNC = "fsync"
    # A write at once; fsync once durable locally and applied by the replica, not yet on its
    # disk (DRBD protocol B, SafeKit async="second", semi-sync's default): a commit survives
    # the loss of either node, not the loss of both at once.
    RECEIPT = "receipt"


FSYNC_DATASYNC = 1  # fdatasync, not fsync
FSYNC_ACK_FIRST = 2  # ACK the op (applied) before syncing: the mount's ack="receipt"


@dataclass(frozen=True)
class FileTimes:
    ino: int
    atime_ns: int
    mtime_ns: int


@dataclass(frozen=True)
class OpFrame:
    op: Op
    ints: tuple[int, ...] = ()
    blobs: tuple[bytes, ...] = ()
    times: tuple[FileTimes, ...] = field(default=())


_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_TIMES = struct.Struct("!Qqq")
_INTS = [struct.Struct("!" + "q" * n) for n in range(8)]
_ARITY: dict[Op, tuple[int, int]] = {
    Op.BIND: (2, 1),
    Op.FORGET: (1, 0),
    Op.CREATE: (5, 1),
    Op.MKDIR: (5, 1),
    Op.MKNOD: (6, 1),
    Op.SYMLINK: (4, 2),
    Op.LINK: (2, 1),
    Op.UNLINK: (1, 1),
    Op.RMDIR: (1, 1),
    Op.RENAME: (3, 2),
    Op.WRITE: (2, 1),
    Op.TRUNCATE: (2, 0),
    Op.CHMOD: (2, 0),
    Op.CHOWN: (3, 0),
    Op.SETXATTR: (2, 2),
    Op.REMOVEXATTR: (1, 1),
    Op.FSYNC: (2, 0),
    Op.TIMES: (0, 0),
}


def encode(frame: OpFrame) -> list[bytes]:
    """Encode as a list of buffers; a WRITE's data is passed through without a copy."""
    parts = [
        _U8.pack(frame.op),
        _U8.pack(len(frame.ints)),
        _INTS[len(frame.ints)].pack(*frame.ints),
    ]
    parts.append(_U8.pack(len(frame.blobs)))
    for blob in frame.blobs:
        parts.append(_U32.pack(len(blob)))
        parts.append(blob)
    parts.append(_U16.pack(len(frame.times)))
    parts.extend(_TIMES.pack(t.ino, t.atime_ns, t.mtime_ns) for t in frame.times)
    return parts


def decode(payload: memoryview) -> OpFrame:
    """Decode one OP payload; any malformation raises ProtocolError."""
    try:
        return _decode(payload)
    except (struct.error, IndexError) as e:
        raise ProtocolError(f"malformed op frame: {e}") from e


def _decode(p: memoryview) -> OpFrame:
    (code,) = _U8.unpack_from(p, 0)
    try:
        op = Op(code)
    except ValueError as e:
        raise ProtocolError(f"unknown op {code}") from e
    (n_ints,) = _U8.unpack_from(p, 1)
    if n_ints >= len(_INTS):
        raise ProtocolError(f"op {op.name}: {n_ints} integers")
    ints = _INTS[n_ints].unpack_from(p, 2)
    pos = 2 + _INTS[n_ints].size
    (n_blobs,) = _U8.unpack_from(p, pos)
    pos += 1
    blobs = []
    for _ in range(n_blobs):
        (length,) = _U32.unpack_from(p, pos)
        pos += 4
        if pos + length > len(p):
            raise ProtocolError(f"op {op.name}: blob runs past the frame")
        blobs.append(bytes(p[pos : pos + length]))
        pos += length
    (n_times,) = _U16.unpack_from(p, pos)
    pos += 2
    times = []
    for _ in range(n_times):
        times.append(FileTimes(*_TIMES.unpack_from(p, pos)))
        pos += _TIMES.size
    if pos != len(p):
        raise ProtocolError(f"op {op.name}: {len(p) - pos} trailing bytes")
    if _ARITY[op] != (n_ints, n_blobs):
        raise ProtocolError(f"op {op.name}: wrong shape ({n_ints} ints, {n_blobs} blobs)")
    return OpFrame(op, ints, tuple(blobs), tuple(times))


def check_name(name: bytes) -> bytes:
    """A directory entry name must be one path component (I4)."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name or len(name) > 255:
        raise ProtocolError(f"refused entry name {name!r}: not a single path component")
    return name
