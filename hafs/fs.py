"""The pyfuse3 passthrough: translates FUSE calls into local calls on the backing tree and
ops for the replicator. Policy (ordering, acks, ALONE journal) lives in hafs.replicator.

Every node keeps an O_PATH|O_NOFOLLOW fd of its backing file, reached from the backing
root fd one name at a time, so the mount works when it covers its own backing directory.
The FUSE inode number is the backing st_ino (the root is ROOT_INODE): it is stable while
we hold the O_PATH fd, and the replica keys its map by it.

Each mutating handler follows one pattern: begin_change (wait while a resync copies the
tree; ALONE: durable note first), the local change, `send` without awaiting in between (so
stream order = change order), then wait for the replica. A handler raises only FUSEError:
anything else would end pyfuse3.main and leave the application with ENOTCONN.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3
import trio

from hafs import _libc
from hafs.ops import INLINE_SYNC_BYTES, FileTimes, Op, OpFrame
from hafs.replicator import Replicator

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
O_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
# Never forwarded to the backing fd: O_DIRECT needs aligned buffers we do not have, the
# kernel already sends FSYNC after each write on an O_DSYNC/O_SYNC handle, and the kernel
# sends O_APPEND writes at EOF itself (mmap writeback through such a handle at the page's
# offset), so the offset we get is the one the backing file and the replica must use.
STRIPPED_FLAGS = (
    os.O_DIRECT
    | os.O_DSYNC
    | os.O_SYNC
    | os.O_APPEND
    | os.O_CREAT
    | os.O_EXCL
    | os.O_NOFOLLOW
    | os.O_NOCTTY
    | os.O_DIRECTORY
)  # we open via /proc links
CACHE_TIMEOUT = 1.0  # we are the only writer of the backing tree

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def fuse_errors(handler: F) -> F:
    """Map every exception of a handler to FUSEError, and count the requests."""
    name = handler.__name__

    @functools.wraps(handler)
    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        args[0].requests[name] += 1
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception:
            log.exception("%s failed", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapped  # type: ignore[return-value]


@dataclass
class Node:
    fd: int  # O_PATH fd of the backing file
    parent: int  # 0 once the name we knew was removed
    name: bytes
    kind: int  # S_IFMT bits
    lookups: int = 0


@dataclass
class Handle:
    fd: int
    ino: int


class HafsOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False  # measured: 2.4x slower for MariaDB (python-fuse.md)

    def __init__(self, root_fd: int, replicator: Replicator, xattrs: bool = True) -> None:
        super().__init__()
        # Without xattrs we answer ENOSYS, so the kernel stops asking: it otherwise sends a
        # getxattr(security.capability) before every buffered write (a third of MariaDB's
        # requests, measured).
        self.xattrs = xattrs
        self.rep = replicator
        self.root_st_ino = os.fstat(root_fd).st_ino
        self.nodes: dict[int, Node] = {ROOT: Node(root_fd, ROOT, b"", stat.S_IFDIR, 1)}
        self.handles: dict[int, Handle] = {}
        self.dirs: dict[int, tuple[int, int, list[bytes]]] = {}  # fh -> (fd, ino, names)
        self._next_fh = 1
        self.sync_limiter = trio.CapacityLimiter(4)
        self._unsynced: dict[int, int] = {}  # ino -> bytes written since its last sync began
        self.requests: Counter[str] = Counter()  # per FUSE request type, for the status

    # -- node table ----------------------------------------------------------------------

    def _ino(self, st_ino: int) -> int:
        return ROOT if st_ino == self.root_st_ino else st_ino

    def _node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def path_of(self, ino: int) -> str:
        """The node's path relative to the root, as far as we know it (for the journal)."""
        parts: list[bytes] = []
        for _ in range(4096):
            if ino == ROOT:
                return os.fsdecode(b"/".join(reversed(parts))) or "."
            node = self.nodes.get(ino)
            if node is None or node.parent == 0:
                return f"<unlinked inode {ino}>"
            parts.append(node.name)
            ino = node.parent
        return f"<inode {ino}>"

    def _proc(self, ino: int) -> str:
        return f"/proc/self/fd/{self._node(ino).fd}"

    def _remember(self, parent: int, name: bytes, fd: int) -> tuple[int, os.stat_result]:
        """Add (or find) the node for an entry whose O_PATH fd we just opened."""
        st = os.fstat(fd)
        ino = self._ino(st.st_ino)
        node = self.nodes.get(ino)
        if node is None:
            self.nodes[ino] = Node(fd, parent, name, stat.S_IFMT(st.st_mode), 1)
            return ino, st
        os.close(fd)
        node.lookups += 1
        if node.parent == 0:
            node.parent, node.name = parent, name
        return ino, st

    def _lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        fd = os.open(name, O_PATH_FLAGS, dir_fd=self._node(parent).fd)
        known = self._ino(os.fstat(fd).st_ino) in self.nodes
        ino, st = self._remember(parent, name, fd)
        if not known:
            self.rep.send(OpFrame(Op.BIND, (ino, parent), (name,)))
        return self._attr(ino, st)

    def _created(self, parent: int, name: bytes) -> tuple[int, os.stat_result]:
        fd = os.open(name, O_PATH_FLAGS, dir_fd=self._node(parent).fd)
        return self._remember(parent, name, fd)

    def _attr(self, ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = CACHE_TIMEOUT
        a.attr_timeout = CACHE_TIMEOUT
        a.st_mode = st.st_mode
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def _times(self, ino: int, st: os.stat_result | None = None) -> FileTimes:
        st = st or os.fstat(self._node(ino).fd)
        return FileTimes(ino, st.st_atime_ns, st.st_mtime_ns)

    def _owner_for(self, parent: int, ctx: pyfuse3.RequestContext) -> tuple[int, int]:
        pst = os.fstat(self._node(parent).fd)
        gid = pst.st_gid if pst.st_mode & stat.S_ISGID else ctx.gid
        return ctx.uid, gid

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # -- lookups and attributes ----------------------------------------------------------

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._lookup(parent_inode, name)

    @fuse_errors
    async def forget(self, inode_list: Any) -> None:
        for ino, count in inode_list:
            node = self.nodes.get(ino)
            if node is None or ino == ROOT:
                continue
            node.lookups -= count
            if node.lookups <= 0:
                del self.nodes[ino]
                self._unsynced.pop(ino, None)
                os.close(node.fd)
                self.rep.send(OpFrame(Op.FORGET, (ino,)))

    @fuse_errors
    async def getattr(self, inode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._attr(inode, os.fstat(self._node(inode).fd))

    @fuse_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return os.readlink(b"", dir_fd=self._node(inode).fd)

    @fuse_errors
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        return True  # default_permissions: the kernel checks against our attributes

    @fuse_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self._proc(ROOT))
        data = pyfuse3.StatvfsData()
        for attr in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_namemax",
        ):
            setattr(data, attr, getattr(sv, attr))
        return data

    @fuse_errors
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: Any, fh: int | None, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        kind = "truncate" if fields.update_size else "meta"
        size = attr.st_size if fields.update_size else 0
        await self.rep.begin_change(kind, inode, size)
        frames = self._apply_setattr(inode, node, attr, fields, fh)
        st = os.fstat(node.fd)
        frames.append(OpFrame(Op.TIMES, times=(self._times(inode, st),)))
        seq = 0
        for frame in frames:
            seq = self.rep.send(frame, kind, inode, size)
        await self.rep.applied(seq)
        return self._attr(inode, st)

    def _apply_setattr(
        self, ino: int, node: Node, attr: Any, fields: Any, fh: int | None
    ) -> list[OpFrame]:
        frames = []
        if fields.update_size:
            fd = self.handles[fh].fd if fh is not None and fh in self.handles else None
            if fd is not None:
                os.ftruncate(fd, attr.st_size)
            else:
                os.truncate(self._proc(ino), attr.st_size)
            frames.append(OpFrame(Op.TRUNCATE, (ino, attr.st_size)))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            _libc.fchown_fd(node.fd, uid, gid)
            st = os.fstat(node.fd)
            frames.append(OpFrame(Op.CHOWN, (ino, st.st_uid, st.st_gid)))
            if node.kind != stat.S_IFLNK:  # chown may clear set-id bits: replicate the result
                frames.append(OpFrame(Op.CHMOD, (ino, st.st_mode)))
        if fields.update_mode and node.kind != stat.S_IFLNK:
            os.chmod(self._proc(ino), stat.S_IMODE(attr.st_mode))
            frames.append(OpFrame(Op.CHMOD, (ino, attr.st_mode)))
        if fields.update_atime or fields.update_mtime:
            self._utime(ino, node, attr, fields)
        return frames

    def _utime(self, ino: int, node: Node, attr: Any, fields: Any) -> None:
        st = os.fstat(node.fd)
        times = (
            attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
            attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns,
        )
        # By fd, not by name: a symlink's name may be gone while a hard link to it remains.
        _libc.utimens_fd(node.fd, *times)

    # -- directory entries ---------------------------------------------------------------

    async def _entry_op(
        self,
        parent: int,
        name: bytes,
        frame_of: Callable[[int, os.stat_result], OpFrame],
        make: Callable[[int], None],
    ) -> pyfuse3.EntryAttributes:
        """Shared shape of mkdir, mknod and symlink: make, remember, send, wait."""
        await self.rep.begin_change("entry", parent)
        make(self._node(parent).fd)
        ino, st = self._created(parent, name)
        frame = frame_of(ino, st)
        frame = OpFrame(
            frame.op, frame.ints, frame.blobs, (self._times(parent), self._times(ino, st))
        )
        await self.rep.applied(self.rep.send(frame, "entry", parent))
        return self._attr(ino, st)

    def _chown_new(self, parent: int, name: bytes, ctx: Any) -> None:
        uid, gid = self._owner_for(parent, ctx)
        os.chown(name, uid, gid, dir_fd=self._node(parent).fd, follow_symlinks=False)

    @fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        def make(dir_fd: int) -> None:
            os.mkdir(name, stat.S_IMODE(mode) & ~ctx.umask, dir_fd=dir_fd)
            self._chown_new(parent_inode, name, ctx)

        return await self._entry_op(
            parent_inode,
            name,
            lambda ino, st: OpFrame(
                Op.MKDIR, (parent_inode, ino, st.st_mode, st.st_uid, st.st_gid), (name,)
            ),
            make,
        )

    @fuse_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        if not (stat.S_ISFIFO(mode) or stat.S_ISREG(mode) or stat.S_ISSOCK(mode)):
            raise pyfuse3.FUSEError(errno.EPERM)  # no device nodes in replicated data

        def make(dir_fd: int) -> None:
            os.mknod(name, mode & ~ctx.umask, rdev, dir_fd=dir_fd)
            self._chown_new(parent_inode, name, ctx)

        return await self._entry_op(
            parent_inode,
            name,
            lambda ino, st: OpFrame(
                Op.MKNOD, (parent_inode, ino, st.st_mode, st.st_uid, st.st_gid, 0), (name,)
            ),
            make,
        )

    @fuse_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        def make(dir_fd: int) -> None:
            os.symlink(target, name, dir_fd=dir_fd)
            self._chown_new(parent_inode, name, ctx)

        return await self._entry_op(
            parent_inode,
            name,
            lambda ino, st: OpFrame(
                Op.SYMLINK, (parent_inode, ino, st.st_uid, st.st_gid), (name, target)
            ),
            make,
        )

    @fuse_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        await self.rep.begin_change("entry", new_parent_inode)
        os.link(
            self._proc(inode),
            new_name,
            dst_dir_fd=self._node(new_parent_inode).fd,
            follow_symlinks=True,
        )
        node = self._node(inode)
        node.lookups += 1
        st = os.fstat(node.fd)
        frame = OpFrame(
            Op.LINK,
            (inode, new_parent_inode),
            (new_name,),
            (self._times(new_parent_inode), self._times(inode, st)),
        )
        await self.rep.applied(self.rep.send(frame, "entry", new_parent_inode))
        return self._attr(inode, st)

    async def _remove(self, op: Op, parent: int, name: bytes) -> None:
        dir_fd = self._node(parent).fd
        await self.rep.begin_change("entry", parent)
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if op is Op.RMDIR:
            os.rmdir(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)
        node = self.nodes.get(self._ino(st.st_ino))
        if node is not None and node.parent == parent and node.name == name:
            node.parent = 0
        frame = OpFrame(op, (parent,), (name,), (self._times(parent),))
        await self.rep.applied(self.rep.send(frame, "entry", parent))

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self._remove(Op.UNLINK, parent_inode, name)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self._remove(Op.RMDIR, parent_inode, name)

    @fuse_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        old_fd, new_fd = self._node(parent_inode_old).fd, self._node(parent_inode_new).fd
        await self.rep.begin_change("entry", parent_inode_old)
        self.rep.journal_if_alone("entry", parent_inode_new)  # no await: still past the gate
        moved = self._ino(os.stat(name_old, dir_fd=old_fd, follow_symlinks=False).st_ino)
        try:
            other: int | None = self._ino(
                os.stat(name_new, dir_fd=new_fd, follow_symlinks=False).st_ino
            )
        except FileNotFoundError:
            other = None
        _libc.renameat2(old_fd, name_old, new_fd, name_new, flags)
        self._renamed(
            moved, other, (parent_inode_old, name_old), (parent_inode_new, name_new), flags
        )
        times = {
            parent_inode_old: self._times(parent_inode_old),
            parent_inode_new: self._times(parent_inode_new),
        }
        frame = OpFrame(
            Op.RENAME,
            (parent_inode_old, parent_inode_new, flags),
            (name_old, name_new),
            tuple(times.values()),
        )
        seq = self.rep.send(frame, "entry", parent_inode_old, also=(parent_inode_new,))
        await self.rep.applied(seq)

    def _renamed(
        self,
        moved: int,
        other: int | None,
        old: tuple[int, bytes],
        new: tuple[int, bytes],
        flags: int,
    ) -> None:
        if other is not None and other in self.nodes and other != moved:
            target = self.nodes[other]
            if flags & _libc.RENAME_EXCHANGE:
                target.parent, target.name = old
            elif (target.parent, target.name) == new:
                target.parent = 0
        if moved in self.nodes:
            self.nodes[moved].parent, self.nodes[moved].name = new

    # -- files ---------------------------------------------------------------------------

    def _open_handle(self, ino: int, flags: int) -> int:
        backing = (flags & ~(STRIPPED_FLAGS | os.O_ACCMODE | os.O_TRUNC)) | os.O_RDWR
        fd = os.open(self._proc(ino), backing | os.O_CLOEXEC)
        fh = self._new_fh()
        self.handles[fh] = Handle(fd, ino)
        return fh

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if self._node(inode).kind != stat.S_IFREG:
            raise pyfuse3.FUSEError(errno.EINVAL)
        fh = self._open_handle(inode, flags)
        if flags & os.O_TRUNC:
            await self.rep.begin_change("truncate", inode, 0)
            os.ftruncate(self.handles[fh].fd, 0)
            frame = OpFrame(Op.TRUNCATE, (inode, 0), times=(self._times(inode),))
            await self.rep.applied(self.rep.send(frame, "truncate", inode, 0))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        dir_fd = self._node(parent_inode).fd
        await self.rep.begin_change("entry", parent_inode)
        fd = os.open(
            name,
            os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC,
            stat.S_IMODE(mode) & ~ctx.umask,
            dir_fd=dir_fd,
        )
        os.close(fd)
        self._chown_new(parent_inode, name, ctx)
        ino, st = self._created(parent_inode, name)
        fh = self._open_handle(ino, flags)
        frame = OpFrame(
            Op.CREATE,
            (parent_inode, ino, st.st_mode, st.st_uid, st.st_gid),
            (name,),
            (self._times(parent_inode), self._times(ino, st)),
        )
        await self.rep.applied(self.rep.send(frame, "entry", parent_inode))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._attr(ino, st)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.handles[fh].fd, size, off)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.handles[fh]
        await self.rep.begin_change("data", h.ino, off, len(buf))
        try:
            written = os.pwrite(h.fd, buf, off)
        except OSError:
            # The kernel stamps mtime before it finds the disk full: the error is the
            # application's, but the replica must get the new times.
            await self.rep.applied(self.rep.send(OpFrame(Op.TIMES, times=(self._times(h.ino),))))
            raise
        self._unsynced[h.ino] = self._unsynced.get(h.ino, 0) + written
        if self.rep.mirroring:
            data = buf if written == len(buf) else buf[:written]
            frame = OpFrame(Op.WRITE, (h.ino, off), (data,), (self._times(h.ino),))
            await self.rep.written(self.rep.send(frame, "data", h.ino, off, written))
        return written

    @fuse_errors
    async def flush(self, fh: int) -> None:
        return None

    @fuse_errors
    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if handle is not None:
            os.close(handle.fd)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self.handles[fh]
        await self._sync(h.fd, h.ino, datasync)

    async def _sync(self, fd: int, ino: int, datasync: bool) -> None:
        # The replica starts its fsync as soon as the op arrives, so local and remote
        # syncs overlap; the call returns when both are durable (I1).
        seq = self.rep.send_fsync(ino, datasync)
        sync = os.fdatasync if datasync else os.fsync
        if self._unsynced.pop(ino, 0) <= INLINE_SYNC_BYTES:
            sync(fd)
        else:
            await trio.to_thread.run_sync(sync, fd, limiter=self.sync_limiter)
        await self.rep.durable(seq)

    # -- directories and xattrs ----------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        fd = os.open(self._proc(inode), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        names = sorted(os.fsencode(e) for e in os.listdir(fd))
        fh = self._new_fh()
        self.dirs[fh] = (fd, inode, names)
        return fh

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        _, ino, names = self.dirs[fh]
        for index in range(start_id, len(names)):
            try:
                attr = self._lookup(ino, names[index])
            except OSError:
                continue  # removed since opendir
            if not pyfuse3.readdir_reply(token, names[index], attr, index + 1):
                await self.forget([(attr.st_ino, 1)])
                return

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        entry = self.dirs.pop(fh, None)
        if entry is not None:
            os.close(entry[0])

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        fd, ino, _ = self.dirs[fh]
        await self._sync(fd, ino, datasync)

    def _check_xattrs(self) -> None:
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        self._check_xattrs()
        await self.rep.begin_change("meta", inode)
        os.setxattr(self._proc(inode), name, value)
        frame = OpFrame(Op.SETXATTR, (inode, 0), (name, value), (self._times(inode),))
        await self.rep.applied(self.rep.send(frame, "meta", inode))

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        self._check_xattrs()
        await self.rep.begin_change("meta", inode)
        os.removexattr(self._proc(inode), name)
        frame = OpFrame(Op.REMOVEXATTR, (inode,), (name,), (self._times(inode),))
        await self.rep.applied(self.rep.send(frame, "meta", inode))

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        self._check_xattrs()
        return os.getxattr(self._proc(inode), name)

    @fuse_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        self._check_xattrs()
        return [os.fsencode(n) for n in os.listxattr(self._proc(inode))]
