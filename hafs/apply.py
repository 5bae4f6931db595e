"""The replica side of the stream: applies ops to the replicated root, confined to it (I4).

Every file is reached from the root fd one component at a time with O_PATH|O_NOFOLLOW,
names are checked to be single components, and parents must be directories, so no frame can
make the replica touch anything outside its root: not with "..", not with an absolute
path, not through a symlink planted inside the tree.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass

from hafs import _libc
from hafs.ops import ROOT_INO, FileTimes, Op, OpFrame, check_name
from hafs.protocol import ProtocolError

log = logging.getLogger(__name__)

O_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Node:
    fd: int  # O_PATH fd of this replica's copy of the primary's inode
    mode: int
    rw_fd: int = -1  # opened on the first write


class Applier:
    """Applies decoded ops in order. Not thread-safe: one stream, one thread."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self.nodes: dict[int, Node] = {ROOT_INO: Node(os.dup(root_fd), stat.S_IFDIR)}

    def close(self) -> None:
        for node in self.nodes.values():
            self._close_node(node)
        self.nodes.clear()

    # -- lookups -----------------------------------------------------------------------

    def node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise ProtocolError(f"inode {ino} is not bound on the replica") from None

    def _dir(self, ino: int) -> int:
        node = self.node(ino)
        if not stat.S_ISDIR(node.mode):
            raise ProtocolError(f"inode {ino} is not a directory: refused as a parent")
        return node.fd

    def _bind(self, ino: int, parent: int, name: bytes) -> Node:
        dir_fd = self._dir(parent)
        fd = os.open(check_name(name), O_PATH_FLAGS, dir_fd=dir_fd)
        mode = os.fstat(fd).st_mode
        old = self.nodes.get(ino)
        if old is not None:
            self._close_node(old)
        node = Node(fd, mode)
        self.nodes[ino] = node
        return node

    def rw_fd(self, ino: int) -> int:
        node = self.node(ino)
        if node.rw_fd < 0:
            if not stat.S_ISREG(node.mode):
                raise ProtocolError(f"inode {ino} is not a regular file: refused write")
            node.rw_fd = os.open(f"/proc/self/fd/{node.fd}", os.O_RDWR | os.O_CLOEXEC)
        return node.rw_fd

    def _close_node(self, node: Node) -> None:
        for fd in (node.rw_fd, node.fd):
            if fd >= 0:
                os.close(fd)
        node.rw_fd = node.fd = -1

    def _proc(self, ino: int) -> str:
        node = self.node(ino)
        if stat.S_ISLNK(node.mode):
            raise ProtocolError(f"inode {ino} is a symlink: refused")
        return f"/proc/self/fd/{node.fd}"

    # -- apply -------------------------------------------------------------------------

    def apply(self, f: OpFrame) -> None:
        """Apply one op; OSError means it could not be applied, ProtocolError refused."""
        handler = _HANDLERS[f.op]
        try:
            handler(self, f)
            for t in f.times:
                self._set_times(t)
        except (OverflowError, ValueError) as e:
            # An integer the system call cannot take (negative mode, uid >= 2**32 ...) or a
            # NUL in a symlink target or xattr name: malformed, not a failure of this disk.
            raise ProtocolError(f"{f.op.name}: {e}") from e

    def _set_times(self, t: FileTimes) -> None:
        # By fd, not by name: a symlink's name may be gone while a hard link to it remains.
        _libc.utimens_fd(self.node(t.ino).fd, t.atime_ns, t.mtime_ns)

    def fsync_target(self, ino: int) -> int:
        """A new fd the FSYNC op's thread may sync and close on its own."""
        node = self.node(ino)
        if stat.S_ISREG(node.mode):
            return os.dup(self.rw_fd(ino))
        if not stat.S_ISDIR(node.mode):
            # Opening a FIFO blocks until a writer comes; opening a device acts on it.
            raise ProtocolError(f"inode {ino} is not a file or directory: fsync refused")
        return os.open(self._proc(ino), os.O_RDONLY | os.O_CLOEXEC)

    def _bind_op(self, f: OpFrame) -> None:
        ino, parent = f.ints
        self._bind(ino, parent, f.blobs[0])

    def _forget(self, f: OpFrame) -> None:
        if f.ints[0] == ROOT_INO:
            return
        node = self.nodes.pop(f.ints[0], None)
        if node is not None:
            self._close_node(node)

    def _create(self, f: OpFrame) -> None:
        parent, ino, mode, uid, gid = f.ints
        dir_fd = self._dir(parent)
        name = check_name(f.blobs[0])
        fd = os.open(
            name,
            os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dir_fd,
        )
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, stat.S_IMODE(mode))
        except BaseException:
            os.close(fd)
            raise
        node = self._bind(ino, parent, name)
        node.rw_fd = fd

    def _mkdir(self, f: OpFrame) -> None:
        parent, ino, mode, uid, gid = f.ints
        name = check_name(f.blobs[0])
        os.mkdir(name, 0o700, dir_fd=self._dir(parent))
        node = self._bind(ino, parent, name)
        _libc.fchown_fd(node.fd, uid, gid)
        os.chmod(self._proc(ino), stat.S_IMODE(mode))

    def _mknod(self, f: OpFrame) -> None:
        parent, ino, mode, uid, gid, rdev = f.ints
        if not (stat.S_ISFIFO(mode) or stat.S_ISREG(mode) or stat.S_ISSOCK(mode)):
            raise ProtocolError(f"mknod of mode {mode:o} refused: only FIFOs, sockets, files")
        name = check_name(f.blobs[0])
        os.mknod(name, (mode & ~0o7777) | 0o600, rdev, dir_fd=self._dir(parent))
        node = self._bind(ino, parent, name)
        _libc.fchown_fd(node.fd, uid, gid)
        os.chmod(self._proc(ino), stat.S_IMODE(mode))

    def _symlink(self, f: OpFrame) -> None:
        parent, ino, uid, gid = f.ints
        name, target = check_name(f.blobs[0]), f.blobs[1]
        # The target is stored as data, never resolved by the replica.
        os.symlink(target, name, dir_fd=self._dir(parent))
        node = self._bind(ino, parent, name)
        _libc.fchown_fd(node.fd, uid, gid)

    def _link(self, f: OpFrame) -> None:
        ino, newparent = f.ints
        src = self.node(ino)
        if stat.S_ISDIR(src.mode):
            raise ProtocolError("hard link to a directory refused")
        name = check_name(f.blobs[0])
        os.link(
            f"/proc/self/fd/{src.fd}", name, dst_dir_fd=self._dir(newparent), follow_symlinks=True
        )

    def _unlink(self, f: OpFrame) -> None:
        parent, name = f.ints[0], check_name(f.blobs[0])
        os.unlink(name, dir_fd=self._dir(parent))

    def _rmdir(self, f: OpFrame) -> None:
        os.rmdir(check_name(f.blobs[0]), dir_fd=self._dir(f.ints[0]))

    def _rename(self, f: OpFrame) -> None:
        parent, newparent, flags = f.ints
        name, newname = check_name(f.blobs[0]), check_name(f.blobs[1])
        if flags & ~(_libc.RENAME_NOREPLACE | _libc.RENAME_EXCHANGE):
            raise ProtocolError(f"rename flags {flags:#x} refused")
        _libc.renameat2(self._dir(parent), name, self._dir(newparent), newname, flags)

    def _write(self, f: OpFrame) -> None:
        ino, offset = f.ints
        data = f.blobs[0]
        fd = self.rw_fd(ino)
        written = os.pwrite(fd, data, offset)
        if written != len(data):  # a short write means the disk filled up
            raise OSError(errno.ENOSPC, "short write on the replica")

    def _truncate(self, f: OpFrame) -> None:
        ino, size = f.ints
        os.ftruncate(self.rw_fd(ino), size)

    def _chmod(self, f: OpFrame) -> None:
        ino, mode = f.ints
        os.chmod(self._proc(ino), stat.S_IMODE(mode))

    def _chown(self, f: OpFrame) -> None:
        ino, uid, gid = f.ints
        _libc.fchown_fd(self.node(ino).fd, uid, gid)

    def _setxattr(self, f: OpFrame) -> None:
        ino, flags = f.ints
        os.setxattr(self._proc(ino), f.blobs[0], f.blobs[1], flags)

    def _removexattr(self, f: OpFrame) -> None:
        os.removexattr(self._proc(f.ints[0]), f.blobs[0])

    def _no_op(self, f: OpFrame) -> None:
        """TIMES carries only its trailer; FSYNC is handled by the server's sync threads."""


_HANDLERS = {
    Op.BIND: Applier._bind_op,
    Op.FORGET: Applier._forget,
    Op.CREATE: Applier._create,
    Op.MKDIR: Applier._mkdir,
    Op.MKNOD: Applier._mknod,
    Op.SYMLINK: Applier._symlink,
    Op.LINK: Applier._link,
    Op.UNLINK: Applier._unlink,
    Op.RMDIR: Applier._rmdir,
    Op.RENAME: Applier._rename,
    Op.WRITE: Applier._write,
    Op.TRUNCATE: Applier._truncate,
    Op.CHMOD: Applier._chmod,
    Op.CHOWN: Applier._chown,
    Op.SETXATTR: Applier._setxattr,
    Op.REMOVEXATTR: Applier._removexattr,
    Op.FSYNC: Applier._no_op,
    Op.TIMES: Applier._no_op,
}
