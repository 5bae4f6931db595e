"""The resync: make the replica's copy identical to the primary's tree, then mirror (I6).

The application goes on writing while the copy runs (docs/datapath.md). The steps:

1. decide whether the ALONE journal can be trusted (`_untrusted`): then only the paths it
   names are compared; otherwise fetch the replica's whole manifest (a VERIFY connection);
2. open a MIRROR session; the calls go on ALONE, journaled, in a new journal epoch;
3. pass 1: build the primary's manifest (whole, or partial manifests of the journaled
   paths on both sides, `_narrowed`) and `plan_resync`: what to remove, create, rewrite,
   fix; `TreeCopy` sends it with the ordinary ops, named by the primary's inode numbers as
   the mount names them, so the replica's Applier (and its confinement, I4) does the work;
4. each later pass compares only what the journal recorded since the previous pass began,
   as a live migration's pre-copy rounds do, until a pass is short;
5. the last pass runs with mutating calls paused, so the primary's tree is still: it
   copies what changed during the previous pass, binds every inode the mount's node table
   knows, sends RESYNC_DONE, switches to MIRROR and lets the calls go on. Once the replica
   made it durable, the journal is cleared.

A pass that copies while the tree changes may read a file half-way through a change or
find a name gone: every such change is journaled after the pass began (its epoch), so the
next pass compares it again; only the last pass, on a still tree, must be exact.

Any failure goes back to ALONE with the journal untouched and the calls released.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import trio

from hafs import blocks, manifest, wire
from hafs import protocol as p
from hafs.journal import Changes
from hafs.manifest import Entry
from hafs.ops import ROOT_INO, FileTimes, Op, OpFrame
from hafs.replicator import Mode, Replicator, ResyncInterrupted

if TYPE_CHECKING:
    from hafs.fs import HafsOperations, Node

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # one WRITE op: what a FUSE write is at most
ZEROS = bytes(CHUNK)
# Copy in flight before waiting for the replica's acks: enough to keep the link busy,
# little enough that the outbox (memory) stays small.
WINDOW_BYTES = 16 << 20
WINDOW_OPS = 4096
SMALL_READ = 64 << 10  # read in the event loop rather than in a thread, up to this size
# A replica reads its whole tree before it answers a manifest request.
MANIFEST_BUILD_TIMEOUT = 3600.0
# ... and every file of a batch (up to 4 GiB, hashed WORKERS at a time) before it answers
# a block request.
BLOCKS_TIMEOUT = 600.0
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_NODE_TYPES = {"fifo": stat.S_IFIFO, "socket": stat.S_IFSOCK}
_EXPECTED_FAILURES = (
    OSError,
    p.ProtocolError,
    manifest.ManifestError,
    ResyncInterrupted,
    trio.TooSlowError,
)


@dataclass
class ResyncReport:
    """The reply to `mirror`: counters, and why it failed."""

    ok: bool = False
    message: str = ""
    files_checked: int = 0  # entries of the primary's tree compared
    files_copied: int = 0  # regular files whose content was sent (once each, any pass)
    bytes_sent: int = 0  # content bytes sent
    seconds: float = 0.0
    removed: int = 0
    created: int = 0
    updated: int = 0  # entries kept whose metadata was set again
    skipped: list[str] = field(default_factory=list)  # device nodes: no replica makes them
    journal: bool = False  # only the paths the ALONE journal names were compared
    passes: int = 0  # copies made while the application wrote, then the paused last one
    paused_seconds: float = 0.0  # how long the last pass held the application's writes
    full_reason: str = ""  # why the whole trees were compared instead
    # Progress: content the plans may send, and how much of it was compared or sent.
    bytes_planned: int = 0
    bytes_done: int = 0

    _copied: set[str] = field(default_factory=set, repr=False)
    _started: float = field(default_factory=time.monotonic, repr=False)

    def reply(self) -> dict[str, object]:
        reply = asdict(self)
        del reply["_copied"], reply["_started"]
        reply["elapsed"] = round(time.monotonic() - self._started, 3)
        return reply

    def copied(self, path: str) -> None:
        """Count a file whose content was sent; a later pass sending it again does not."""
        if path not in self._copied:
            self._copied.add(path)
            self.files_copied += 1


# ---------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class ResyncPlan:
    """What to do on the replica, path by path (paths relative to the root)."""

    remove: tuple[str, ...]  # on the replica, children before their directory
    create: frozenset[str]  # missing on the replica (or removed first)
    rewrite: frozenset[str]  # regular files on both whose content differs
    refresh: frozenset[str]  # entries on both whose metadata differs
    touched_dirs: tuple[str, ...]  # directories whose times must be set last

    def updates(self) -> list[str]:
        """Paths to create, rewrite or refresh, parents before children."""
        return sorted(self.create | self.rewrite | self.refresh, key=dfs_key)


def plan_resync(
    local: dict[str, Entry],
    remote: dict[str, Entry],
    *,
    size_mtime_trusted: bool = False,
    suspects: Collection[str] = frozenset(),
) -> ResyncPlan:
    """Compare the primary's manifest (local) with the replica's.

    `rewrite` holds the files on both sides whose content may differ, which TreeCopy
    compares by block hashes: decided by the digests where both manifests have them;
    without (cheap manifests), by size and mtime if `size_mtime_trusted`
    (`cheap_compare_trusted` says when), else every file may differ. `suspects` (paths a
    journal names) may differ whatever the manifests say.
    """
    local_links, remote_links = _link_members(local), _link_members(remote)

    def replaced(path: str) -> bool:
        a, b = local[path], remote[path]
        if a.kind != b.kind or a.target != b.target:
            return True
        # Names that share an inode on one side only cannot be fixed in place: writing
        # one would change the other. Such files are made again, links and all.
        same = local_links.get(path, {path}) == remote_links.get(path, {path})
        return a.kind == "file" and not same

    doomed = (remote.keys() - local.keys()) | {
        path for path in local.keys() & remote.keys() if path != "." and replaced(path)
    }
    removed = {path for path in remote if _under(path, doomed)}
    kept = remote.keys() - removed
    both = local.keys() & kept
    rewrite = frozenset(
        path
        for path in both
        if local[path].kind == "file"
        and (path in suspects or _content_differs(local[path], remote[path], size_mtime_trusted))
    )
    refresh = frozenset(
        path for path in both - rewrite if _metadata_differs(local[path], remote[path])
    )
    create = frozenset(local.keys() - kept)
    touched = {parent_of(path) for path in removed | create}
    touched |= {path for path in create | refresh if local[path].kind == "dir"}
    touched_dirs = [path for path in touched if path in local and local[path].kind == "dir"]
    return ResyncPlan(
        remove=tuple(sorted(removed, key=dfs_key, reverse=True)),
        create=create,
        rewrite=rewrite,
        refresh=refresh,
        touched_dirs=tuple(sorted(touched_dirs, key=dfs_key)),
    )


def dfs_key(path: str) -> tuple[str, ...]:
    """Sort key putting every directory just before its own subtree (depth-first order)."""
    return () if path == "." else tuple(path.split("/"))


def parent_of(path: str) -> str:
    head, sep, _ = path.rpartition("/")
    return head if sep else "."


def _name(path: str) -> bytes:
    return os.fsencode(path.rpartition("/")[2])


def _under(path: str, roots: set[str]) -> bool:
    """Whether path or one of its ancestors is in roots."""
    while path != ".":
        if path in roots:
            return True
        path = parent_of(path)
    return False


def _link_members(m: dict[str, Entry]) -> dict[str, set[str]]:
    """For each hard-linked file, the names of its inode within the tree."""
    groups: dict[str, set[str]] = {}
    for path, entry in m.items():
        if entry.link_group:
            groups.setdefault(entry.link_group, set()).add(path)
    return {path: groups[m[path].link_group] for path in m if m[path].link_group}


def _content_differs(a: Entry, b: Entry, size_mtime_trusted: bool) -> bool:
    if a.size != b.size:
        return True
    if a.digest and b.digest:
        return a.digest != b.digest
    return a.size > 0 and (a.mtime_ns != b.mtime_ns or not size_mtime_trusted)


def cheap_compare_trusted(replica_exact: bool, journal_unclean: bool) -> bool:
    """Whether files of equal size and mtime on both sides may be taken as equal in
    content, so that a whole comparison reads none of them (I6; issue 4's "cheaply
    first"). Otherwise every file is compared by block hashes: both sides read it all,
    only differing blocks are sent.

    Kernel timestamps are coarse (a tick is ~4 ms): a write that never reached the other
    side, made in the same tick as one that did, leaves both files with the same size and
    mtime and different bytes. Such writes exist
    - on the replica's side unless its copy is exact (hafs.replica `copy_exact`): a mount
      on its directory died with writes in flight, or went ALONE and wrote what only its
      own journal knows; or the replica crashed mid-session (a new mtime on disk, the
      new data lost);
    - on our side if our journal is unclean: this mount crashed while mirroring, and
      writes in flight then reached our disk only, named by no journal.
    Writes in flight when we went ALONE are journaled: the caller passes the journaled
    paths as `suspects` to `plan_resync`. Any other difference was made at least a role
    change (seconds) after both sides last agreed, so its mtime is another tick's.
    """
    return replica_exact and not journal_unclean


def _metadata_differs(a: Entry, b: Entry) -> bool:
    return _metadata(a) != _metadata(b)


def _metadata(e: Entry) -> tuple[object, ...]:
    return (e.mode, e.uid, e.gid, e.mtime_ns, e.xattrs)


# ---------------------------------------------------------------------------- the copy


class _Binder:
    """Keeps the replica's bindings of the directories on the path being worked on.

    The replica resolves every op by inode, so a directory must be bound before an op
    names it as a parent. Entries are visited in depth-first order, so only the current
    path's directories need to be: the replica's open fds stay bounded by the depth.
    Inodes in `keep` (the mount's node table) are never forgotten.
    """

    def __init__(
        self,
        send: Callable[[OpFrame], int],
        ino_of: Callable[[str], int],
        keep: frozenset[int] = frozenset(),
    ) -> None:
        self.send = send
        self.ino_of = ino_of
        self.keep = keep
        self.chain: list[tuple[str, int]] = [(".", ROOT_INO)]

    def enter(self, path: str) -> int:
        """Bind directory `path` and its ancestors; return its inode."""
        while not _within(path, self.chain[-1][0]):
            self._pop()
        parts = dfs_key(path)
        for depth in range(len(dfs_key(self.chain[-1][0])) + 1, len(parts) + 1):
            sub = "/".join(parts[:depth])
            ino = self.ino_of(sub)
            self.send(OpFrame(Op.BIND, (ino, self.chain[-1][1]), (_name(sub),)))
            self.chain.append((sub, ino))
        return self.chain[-1][1]

    def push(self, path: str, ino: int) -> None:
        """A directory just made (so bound) under the current one."""
        self.chain.append((path, ino))

    def release(self) -> None:
        while len(self.chain) > 1:
            self._pop()

    def _pop(self) -> None:
        _, ino = self.chain.pop()
        if ino not in self.keep:
            self.send(OpFrame(Op.FORGET, (ino,)))


def _within(path: str, ancestor: str) -> bool:
    return ancestor == "." or path == ancestor or path.startswith(ancestor + "/")


class TreeCopy:
    """Sends the ops that carry out a ResyncPlan over the resync's session."""

    def __init__(
        self,
        rep: Replicator,
        root_fd: int,
        root_st_ino: int,
        local: dict[str, Entry],
        remote: dict[str, Entry],
        report: ResyncReport,
        ranges: dict[str, set[int]] | None = None,
        missed: Callable[[str], None] | None = None,
    ) -> None:
        self.rep = rep
        # Set when the application writes while this copy runs: an entry that changed
        # under the copy (gone, replaced) is handed to it and skipped; the journal names
        # the change, and the next pass compares it again.
        self.missed = missed
        self._began, self._sent_before = time.monotonic(), report.bytes_sent  # for maxrate
        # Files whose only changes are journaled chunks: only those chunks are sent.
        self.ranges = ranges or {}
        self.root_fd = root_fd
        self.root_st_ino = root_st_ino
        self.local = local
        self.remote = remote
        self.report = report
        self._last_seq = 0
        self._checkpoint = 0  # wait for this seq once a window is full
        self._window_bytes = 0
        self._window_ops = 0
        self._linked: set[int] = set()  # made in this copy; later names of it are LINKs
        self._written: set[int] = set()  # content sent (hard links share it)
        self._hashes: blocks.RemoteHashes | None = None  # the replica's, while run() runs

    def ino(self, entry: Entry) -> int:
        """The mount's name for an entry: its st_ino, but ROOT_INO for the root."""
        return ROOT_INO if entry.ino == self.root_st_ino else entry.ino

    def path_ino(self, path: str) -> int:
        """The mount's name for a path; a partial manifest may lack its ancestors."""
        entry = self.local.get(path)
        if entry is not None:
            return self.ino(entry)
        st = os.stat(path, dir_fd=self.root_fd, follow_symlinks=False)  # the tree is still
        return ROOT_INO if st.st_ino == self.root_st_ino else st.st_ino

    # -- sending, paced by the replica's acks -------------------------------------------

    def send(self, frame: OpFrame) -> int:
        self._last_seq = self.rep.send_copy(frame)
        self._window_ops += 1
        self._window_bytes += sum(len(blob) for blob in frame.blobs)
        return self._last_seq

    async def pace(self) -> None:
        """Every half window, wait for the previous half: at most a window in flight."""
        await self._throttle()
        if self._window_bytes < WINDOW_BYTES // 2 and self._window_ops < WINDOW_OPS // 2:
            return
        await self.rep.applied(self._checkpoint)
        await trio.lowlevel.checkpoint()  # reads go on while the copy runs
        if self.rep.mode is not Mode.RESYNC:
            raise ResyncInterrupted(self.rep.reason)
        self._checkpoint, self._window_bytes, self._window_ops = self._last_seq, 0, 0
        self.rep.resync_status.update(self.report.reply())  # progress, for the status

    async def _throttle(self) -> None:
        """No faster than the mount's maxrate, in live passes only: the last pass holds the
        application's writes, and what it copies is small."""
        rate = self.rep.resync_maxrate
        if rate <= 0 or self.missed is None:
            return
        ahead = (self.report.bytes_sent - self._sent_before) / rate
        ahead -= time.monotonic() - self._began
        if ahead > 0:
            await trio.sleep(ahead)

    async def settled(self) -> None:
        """Wait until the replica applied every op sent so far."""
        await self.rep.applied(self._last_seq)

    @contextlib.contextmanager
    def _entry(self, path: str) -> Iterator[None]:
        """Work on one entry; while the tree is live, one that changed under us is missed."""
        if self.missed is None:
            yield
            return
        try:
            yield
        except OSError as e:
            log.info("resync: %s changed during the copy (%s): left to the next pass", path, e)
            self.missed(path)

    # -- the three passes -----------------------------------------------------------------

    async def run(self, plan: ResyncPlan) -> None:
        client = self._hashes_from_replica(plan)
        try:
            await self._remove(plan)
            await self._update(plan)
            await self._set_dir_times(plan.touched_dirs)
        finally:
            if self._hashes is not None:
                self._hashes.close()
            client.close()  # ends a fetch under way
            self._hashes = None

    def _hashes_from_replica(self, plan: ResyncPlan) -> wire.BlockClient:
        """Ask the replica for the block hashes of the files to rewrite block by block (in
        the order `_update` visits them, each inode once), in batches fetched ahead."""
        assert self.rep.peer is not None and self.rep.key is not None
        items: list[blocks.BlockItem] = []
        inodes: set[int] = set()
        for path in plan.updates():
            entry = self.local[path]
            if path in plan.rewrite and path not in self.ranges and entry.ino not in inodes:
                inodes.add(entry.ino)
                items += blocks.split(path, entry.size)
        timeout = max(self.rep.timeout, 2.0)
        client = wire.BlockClient(self.rep.peer, self.rep.key, timeout, BLOCKS_TIMEOUT)
        self._hashes = blocks.RemoteHashes(client.hashes, items, os.urandom(blocks.SALT_LEN))
        return client

    async def _remove(self, plan: ResyncPlan) -> None:
        gone = set(plan.remove)
        temporary = itertools.count(-1, -1)  # the primary's inodes are all positive
        names: dict[str, int] = {}

        def ino_of(path: str) -> int:
            if path in gone:  # only on the replica: no inode of the primary's to use
                return names.setdefault(path, next(temporary))
            return self.path_ino(path)

        binder = _Binder(self.send, ino_of)
        for path in plan.remove:
            with self._entry(path):
                parent = binder.enter(parent_of(path))
                op = Op.RMDIR if self.remote[path].kind == "dir" else Op.UNLINK
                self.send(OpFrame(op, (parent,), (_name(path),)))
                self.report.removed += 1
            await self.pace()
        binder.release()

    async def _update(self, plan: ResyncPlan) -> None:
        binder = _Binder(self.send, self.path_ino)
        for path in plan.updates():
            with self._entry(path):
                if path in plan.create:
                    await self._create(binder, path)
                else:
                    await self._fix(binder, path, path in plan.rewrite)
            await self.pace()
        binder.release()
        for ino in self._linked:
            self.send(OpFrame(Op.FORGET, (ino,)))

    async def _set_dir_times(self, dirs: Iterable[str]) -> None:
        """Last: making and removing names changed the directories' times on the replica."""
        binder = _Binder(self.send, self.path_ino)
        for path in dirs:
            with self._entry(path):
                ino = binder.enter(path)
                self.send(OpFrame(Op.TIMES, times=(self._times(ino, path),)))
            await self.pace()
        binder.release()

    # -- one entry ------------------------------------------------------------------------

    async def _create(self, binder: _Binder, path: str) -> None:
        entry = self.local[path]
        parent, name, ino = binder.enter(parent_of(path)), _name(path), self.ino(entry)
        owner = (entry.uid, entry.gid)
        if entry.kind == "file" and ino in self._linked:  # another name of a file just made
            self.send(OpFrame(Op.LINK, (ino, parent), (name,)))
            self.report.created += 1
            self._finish(path, ino, entry)
            return
        if entry.kind == "dir":
            self.send(OpFrame(Op.MKDIR, (parent, ino, stat.S_IFDIR | entry.mode, *owner), (name,)))
            binder.push(path, ino)
        elif entry.kind == "file":
            self.send(OpFrame(Op.CREATE, (parent, ino, stat.S_IFREG | entry.mode, *owner), (name,)))
            await self._copy_content(path, ino, entry.size, truncate=False)
        elif entry.kind == "symlink":
            target = os.fsencode(entry.target)
            self.send(OpFrame(Op.SYMLINK, (parent, ino, *owner), (name, target)))
        elif entry.kind in _NODE_TYPES:
            mode = _NODE_TYPES[entry.kind] | entry.mode
            self.send(OpFrame(Op.MKNOD, (parent, ino, mode, *owner, 0), (name,)))
        else:
            log.warning("resync: %s is a %s: not replicated", path, entry.kind)
            self.report.skipped.append(path)
            return
        self.report.created += 1
        self._set_xattrs(ino, entry, ())
        self._finish(path, ino, entry)

    async def _fix(self, binder: _Binder, path: str, rewrite: bool) -> None:
        entry, old = self.local[path], self.remote[path]
        if entry.kind == "dir":
            self._set_metadata(binder.enter(path), entry, old)
            self.report.updated += 1
            return
        ino = self.ino(entry)
        bind = OpFrame(Op.BIND, (ino, binder.enter(parent_of(path))), (_name(path),))
        if rewrite and path not in self.ranges and ino not in self._written:
            if not await self._copy_delta(path, ino, entry.size, bind):
                if not _metadata_differs(entry, old):
                    return  # the same bytes and metadata after all: nothing to send
                self.send(bind)
                self.report.updated += 1
        else:
            self.send(bind)
            if rewrite and path in self.ranges:
                await self._copy_chunks(path, ino, entry.size, self.ranges[path])
            elif not rewrite:
                self.report.updated += 1
        self._set_metadata(ino, entry, old)
        self._finish(path, ino, entry)

    def _finish(self, path: str, ino: int, entry: Entry) -> None:
        """Times last (every op before changed them); then let the replica close it."""
        if entry.kind == "dir":
            return  # bound while its subtree is worked on; times in the last pass
        self.send(OpFrame(Op.TIMES, times=(self._times(ino, path),)))
        if entry.kind == "file" and entry.link_group:
            self._linked.add(ino)  # kept bound: its other names are LINKs to it
        else:
            self.send(OpFrame(Op.FORGET, (ino,)))

    async def _copy_content(self, path: str, ino: int, size: int, truncate: bool) -> None:
        """Send the file's content; runs of zeros stay holes, as they are after a truncate."""
        if truncate:
            self.send(OpFrame(Op.TRUNCATE, (ino, 0)))
        if size:
            self.send(OpFrame(Op.TRUNCATE, (ino, size)))
        fd = _open_for_copy(self.root_fd, path)
        try:
            offset = 0
            while offset < size:
                # Up to the manifest's size: what a live pass finds beyond it is journaled.
                want = min(CHUNK, size - offset)
                data = await trio.to_thread.run_sync(os.pread, fd, want, offset)
                if not data:
                    break
                self.report.bytes_done += len(data)
                if data != ZEROS[: len(data)]:
                    self.send(OpFrame(Op.WRITE, (ino, offset), (data,)))
                    self.report.bytes_sent += len(data)
                offset += len(data)
                await self.pace()
        finally:
            os.close(fd)
        self._written.add(ino)
        self.report.copied(path)
        log.debug("resync: %s: sent whole, %d bytes", path, size)

    async def _copy_delta(self, path: str, ino: int, size: int, bind: OpFrame) -> bool:
        """Send only the blocks whose hashes differ from the replica's (hafs.blocks), after
        a truncate to our size if the sizes differ; the replica's blocks past its old end
        are zeros then, so runs of zeros stay holes. `bind` (the file's BIND) goes first,
        if anything is sent at all: returns whether it was."""
        assert self._hashes is not None
        hasher = blocks.Hasher(blocks.BLOCK, self._hashes.salt)
        before = self.report.bytes_sent
        sent = whole = False

        def send(frame: OpFrame) -> None:
            nonlocal sent
            if not sent:
                self.send(bind)
                sent = True
            self.send(frame)

        fd = _open_for_copy(self.root_fd, path)
        try:
            for item in blocks.split(path, size):
                arrived, theirs = self._hashes.ready(item)
                if not arrived:
                    get = functools.partial(self._hashes.get, item)
                    theirs = await trio.to_thread.run_sync(get, abandon_on_cancel=True)
                if theirs is None:  # no such file there any more: send ours whole
                    whole = True
                    break
                if item.first == 0 and theirs.size != size:
                    send(OpFrame(Op.TRUNCATE, (ino, size)))
                await self._send_differing(send, fd, ino, item, size, hasher, theirs)
        finally:
            os.close(fd)
        if whole:
            if not sent:
                self.send(bind)
            await self._copy_content(path, ino, size, truncate=True)
            return True
        self._written.add(ino)
        if sent:
            self.report.copied(path)
        log.debug("resync: %s: %d bytes of %d differ", path, self.report.bytes_sent - before, size)
        return sent

    async def _send_differing(
        self,
        send: Callable[[OpFrame], None],
        fd: int,
        ino: int,
        item: blocks.BlockItem,
        size: int,
        hasher: blocks.Hasher,
        theirs: blocks.FileBlocks,
    ) -> None:
        offset = item.first * hasher.block
        end = min(size, offset + item.count * hasher.block)
        while offset < end:
            read = functools.partial(_differing, fd, offset, end, hasher, theirs)
            # A small file is read and hashed at once: cheaper than a thread hop (~0.1 ms).
            small = end - offset <= SMALL_READ
            length, runs = read() if small else await trio.to_thread.run_sync(read)
            if not length:
                return  # shorter than the manifest said: changed under a live pass
            self.report.bytes_done += length
            for at, data in runs:
                send(OpFrame(Op.WRITE, (ino, at), (data,)))
                self.report.bytes_sent += len(data)
            offset += length
            await self.pace()

    async def _copy_chunks(self, path: str, ino: int, size: int, chunks: set[int]) -> None:
        """Send only these 1 MiB chunks: the rest of the replica's file is already ours."""
        self.send(OpFrame(Op.TRUNCATE, (ino, size)))
        fd = _open_for_copy(self.root_fd, path)
        try:
            for chunk in sorted(c for c in chunks if c * CHUNK < size):
                data = await trio.to_thread.run_sync(os.pread, fd, CHUNK, chunk * CHUNK)
                self.report.bytes_done += len(data)
                self.send(OpFrame(Op.WRITE, (ino, chunk * CHUNK), (data,)))  # zeros too
                self.report.bytes_sent += len(data)
                await self.pace()
        finally:
            os.close(fd)
        self._written.add(ino)
        self.report.copied(path)

    def _set_metadata(self, ino: int, entry: Entry, old: Entry) -> None:
        owner_changed = (entry.uid, entry.gid) != (old.uid, old.gid)
        if owner_changed:
            self.send(OpFrame(Op.CHOWN, (ino, entry.uid, entry.gid)))
        # After a chown, which may have cleared the set-id bits.
        if entry.kind != "symlink" and (owner_changed or entry.mode != old.mode):
            self.send(OpFrame(Op.CHMOD, (ino, entry.mode)))
        self._set_xattrs(ino, entry, old.xattrs)

    def _set_xattrs(self, ino: int, entry: Entry, old: tuple[tuple[str, str], ...]) -> None:
        before, after = dict(old), dict(entry.xattrs)
        for name, value in after.items():
            if before.get(name) != value:
                blobs = (os.fsencode(name), bytes.fromhex(value))
                self.send(OpFrame(Op.SETXATTR, (ino, 0), blobs))
        for name in before.keys() - after.keys():
            self.send(OpFrame(Op.REMOVEXATTR, (ino,), (os.fsencode(name),)))

    def _times(self, ino: int, path: str) -> FileTimes:
        """The entry's mtime as the manifest read it, before its content: a live pass must
        never give the replica a newer mtime than the bytes it sent (a later comparison by
        size and mtime would take them for equal)."""
        st = os.stat(path, dir_fd=self.root_fd, follow_symlinks=False)
        entry = self.local.get(path)
        return FileTimes(ino, st.st_atime_ns, st.st_mtime_ns if entry is None else entry.mtime_ns)

    # -- the mount's inodes ---------------------------------------------------------------

    def bind_known(
        self, nodes: dict[int, Node], path_of: Callable[[int], str] | None = None
    ) -> None:
        """Bind every inode the mount's node table knows, so later ops resolve on the replica.

        No await: called in the same step as the switch to MIRROR, so the table cannot
        change in between (lookups made before are in it, later ones send their BIND).
        With a partial manifest, `path_of` (the node table's own names) names the rest.
        """
        where: dict[int, str] = {}  # any of an inode's names will do: all exist now
        for path, entry in self.local.items():
            where.setdefault(self.ino(entry), path)
        known = frozenset(nodes) - {ROOT_INO}
        if path_of is not None:
            for ino in known - where.keys():
                path = path_of(ino)
                if not path.startswith("<") and self._names(path, ino):
                    where[ino] = path
        binder = _Binder(self.send, self.path_ino, keep=known)
        for path in sorted((where[ino] for ino in known if ino in where), key=dfs_key):
            if self._is_dir(path):
                binder.enter(path)
            else:
                parent = binder.enter(parent_of(path))
                self.send(OpFrame(Op.BIND, (self.path_ino(path), parent), (_name(path),)))
        binder.release()
        unnamed = [(ino, nodes[ino]) for ino in known if ino not in where]
        for ino, node in unnamed:
            self._stand_in(ino, node)
        if unnamed:  # making and removing stand-ins changed the root's times
            self.send(OpFrame(Op.TIMES, times=(self._times(ROOT_INO, "."),)))

    def _names(self, path: str, ino: int) -> bool:
        try:
            return self.path_ino(path) == ino
        except OSError:
            return False

    def _is_dir(self, path: str) -> bool:
        entry = self.local.get(path)
        if entry is not None:
            return entry.kind == "dir"
        st = os.stat(path, dir_fd=self.root_fd, follow_symlinks=False)
        return stat.S_ISDIR(st.st_mode)

    def _stand_in(self, ino: int, node: Node) -> None:
        """An inode the tree no longer names (unlinked, still open): make one on the replica
        and unlink it, so that later ops on it apply there as they do here."""
        st = os.fstat(node.fd)
        if st.st_nlink > 0:
            log.warning("resync: inode %d is outside the tree: not bound on the replica", ino)
            return
        name = f".hafs-unlinked-{ino}-{secrets.token_hex(4)}".encode()
        kind, owner = stat.S_IFMT(st.st_mode), (st.st_uid, st.st_gid)
        if kind == stat.S_IFDIR:
            self.send(OpFrame(Op.MKDIR, (ROOT_INO, ino, st.st_mode, *owner), (name,)))
            self.send(OpFrame(Op.RMDIR, (ROOT_INO,), (name,)))
            return
        if kind == stat.S_IFLNK:
            target = os.readlink(b"", dir_fd=node.fd)
            self.send(OpFrame(Op.SYMLINK, (ROOT_INO, ino, *owner), (name, target)))
        elif kind == stat.S_IFREG:
            # Its size but not its content: nothing can read it on the replica.
            self.send(OpFrame(Op.CREATE, (ROOT_INO, ino, st.st_mode, *owner), (name,)))
            self.send(OpFrame(Op.TRUNCATE, (ino, st.st_size)))
        else:
            self.send(OpFrame(Op.MKNOD, (ROOT_INO, ino, st.st_mode, *owner, 0), (name,)))
        self.send(OpFrame(Op.UNLINK, (ROOT_INO,), (name,)))


def _differing(
    fd: int, offset: int, end: int, hasher: blocks.Hasher, theirs: blocks.FileBlocks
) -> tuple[int, list[tuple[int, bytes]]]:
    """Read up to a CHUNK of ours from offset: (bytes read, runs that differ)."""
    data = hasher.read(fd, offset, end)
    return len(data), blocks.differing_runs(data, offset, hasher, theirs)


def _open_for_copy(root_fd: int, path: str) -> int:
    try:
        # O_NOATIME: a resync must not make every file look recently read.
        return os.open(path, _FILE_FLAGS | os.O_NOATIME, dir_fd=root_fd)
    except PermissionError:
        return os.open(path, _FILE_FLAGS, dir_fd=root_fd)


# ---------------------------------------------------------------------------- rejoin


async def rejoin(rep: Replicator, mount: HafsOperations, full: bool = False) -> ResyncReport:
    """Bring the peer back: ALONE -> RESYNC -> MIRROR, or back to ALONE on failure.

    `full`: compare the whole trees even if the journal could narrow the comparison."""
    report = ResyncReport()
    if rep.mode is not Mode.ALONE:
        report.ok, report.message = _not_alone(rep.mode)
        return report
    started = trio.current_time()
    rep.start_resync()
    failure = ""
    try:
        # Cancelled by degrade(): the peer failed, or the mount was told to go ALONE.
        with trio.CancelScope() as rep.resync_scope:
            await _rejoin(rep, mount, report, full)
    except _EXPECTED_FAILURES as e:
        failure = str(e) or type(e).__name__
    except Exception as e:  # a bug must not leave the calls paused or the mode RESYNC
        log.exception("resync failed")
        failure = f"internal error: {e!r}"
    finally:
        rep.resync_scope = None
        if rep.mode is Mode.RESYNC:
            rep.abort_resync(failure or "interrupted")
        rep.resume_changes()
    if failure and rep.mode is Mode.MIRROR:  # failed after the switch, confirming it
        rep.lose(f"resync failed: {failure}")
    _conclude(rep, report, trio.current_time() - started)
    return report


# A live pass shorter than this leaves little for the paused pass: pause now.
SHORT_PASS = 1.0


async def _rejoin(rep: Replicator, mount: HafsOperations, report: ResyncReport, full: bool) -> None:
    """The steps of the module docstring."""
    _progress(rep, report, "checking the journal")
    report.full_reason = "a full comparison was asked for" if full else await _untrusted(rep)
    since = 0  # pass 1 compares all the journal names (when it can be trusted)
    whole = bool(report.full_reason)
    # Asked before pass 1 records "unclean": whether the journal was clean before it.
    assert rep.peer is not None and rep.key is not None
    exact = await trio.to_thread.run_sync(
        wire.fetch_exact, rep.peer, rep.key, max(rep.timeout, 2.0), abandon_on_cancel=True
    )
    cheap = cheap_compare_trusted(exact, rep.journal.unclean)
    _progress(rep, report, "connecting")
    await rep.open_session()
    await _barrier(rep, mount.nodes[ROOT_INO].fd)
    last = retried = False
    while True:
        report.passes += 1
        last = (last or report.passes > rep.live_passes) and (not whole or rep.live_passes == 0)
        started = trio.current_time()
        if last:
            rep.pause_changes()
        mark = rep.journal.new_epoch()  # what changes from here, the next pass compares
        changes = rep.journal.changes(since=since)
        # The paused pass may compare whole trees only if a live one already failed to
        # narrow: reading both whole trees must not hold the application's writes.
        may_go_whole = not last or retried or rep.live_passes == 0
        copy = await _pass(rep, mount, report, changes, whole, not last, cheap, may_go_whole)
        if copy is None:  # the journal could not narrow the paused pass: a live whole one
            rep.resume_changes()
            last, retried, whole = False, True, True
            continue
        if last:
            report.paused_seconds = round(trio.current_time() - started, 3)
            break
        await copy.settled()  # the next pass compares the replica's tree with this pass in
        since, whole = mark, False
        last = trio.current_time() - started < SHORT_PASS
    marker = rep.finish_resync()
    _progress(rep, report, "waiting for the replica")
    await rep.confirm_mirror(marker)


async def _pass(
    rep: Replicator,
    mount: HafsOperations,
    report: ResyncReport,
    changes: Changes,
    whole: bool,
    live: bool,
    cheap: bool,
    may_go_whole: bool = True,
) -> TreeCopy | None:
    """Compare (the whole trees if `whole`, else what `changes` names) and copy what
    differs. With `live`, the tree may change meanwhile (module docstring).

    Whole trees are compared by size and mtime where `cheap` (`cheap_compare_trusted`),
    except the paths `changes` names; else every file by block hashes. None: the journal
    could not narrow the comparison and `may_go_whole` is false; nothing was sent."""
    root_fd = mount.nodes[ROOT_INO].fd
    narrowed: Narrowed | None = None
    if not whole:
        _progress(rep, report, f"pass {report.passes}: comparing the journaled paths")
        found = await _narrowed(rep, root_fd, changes.scope())
        if isinstance(found, str):  # the journal cannot say it all: compare everything
            report.full_reason = found
            if not may_go_whole:
                log.info("resync: %s: a live pass compares the whole trees first", found)
                return None
            whole = True
        else:
            narrowed, local, remote = found, found.local, found.remote
    if whole:
        local, remote = await _whole_manifests(rep, report, root_fd)
    if report.passes == 1:
        report.journal = narrowed is not None
    report.files_checked += len(local)
    # Size and mtime say nothing of what the journal names, nor, after pass 1, of files
    # this resync copied while they changed: those are compared by block hashes.
    scope = changes.scope() if narrowed is None else narrowed.scope
    compare = functools.partial(
        plan_resync,
        local,
        remote,
        size_mtime_trusted=cheap and report.passes == 1,
        suspects=_suspects(local, scope),
    )
    plan = await trio.to_thread.run_sync(compare)  # reads go on
    # From here the peer's copy is neither its old self nor ours until RESYNC_DONE is
    # answered (which clears the journal): if this resync fails, only a whole comparison
    # can tell what it holds.
    rep.journal.record("unclean", "", 0)
    ranges = narrowed.ranges(changes, plan) if narrowed else None
    report.bytes_planned += _content_bytes(plan, local, ranges or {})
    missed = functools.partial(_missed, rep) if live else None
    copy = TreeCopy(rep, root_fd, mount.root_st_ino, local, remote, report, ranges, missed)
    _progress(rep, report, f"pass {report.passes}: copying")
    await copy.run(plan)
    if not live:
        copy.bind_known(mount.nodes, mount.path_of if narrowed else None)
    return copy


async def _barrier(rep: Replicator, root_fd: int) -> None:
    """A TIMES of the root (its own times) on the new session, acknowledged: the replica
    runs this session now, so a dead one no longer applies ops under pass 1's reads."""
    st = os.fstat(root_fd)
    times = FileTimes(ROOT_INO, st.st_atime_ns, st.st_mtime_ns)
    await rep.applied(rep.send_copy(OpFrame(Op.TIMES, times=(times,))))


def _suspects(local: dict[str, Entry], scope: manifest.Scope) -> frozenset[str]:
    """The entries whose content the journal says may have changed: its paths, and
    everything under a moved entry (another file may have been renamed onto a name)."""
    trees = set(scope.trees)
    return frozenset(p for p in local if p in scope.paths or _under(p, trees))


def _content_bytes(plan: ResyncPlan, local: dict[str, Entry], ranges: dict[str, set[int]]) -> int:
    """At most how much file content the plan sends: what progress is measured against."""
    total = 0
    for path in plan.create | plan.rewrite:
        entry = local[path]
        if entry.kind == "file":
            chunks = ranges.get(path)
            total += entry.size if chunks is None else min(len(chunks) * CHUNK, entry.size)
    return total


def _missed(rep: Replicator, path: str) -> None:
    """An entry changed under a live pass: the next pass compares its whole subtree."""
    rep.journal.record("moved", path, 0)


async def _whole_manifests(
    rep: Replicator, report: ResyncReport, root_fd: int
) -> tuple[dict[str, Entry], dict[str, Entry]]:
    """Both sides' whole cheap manifests (hafs.manifest, no digests), read at once."""
    log.info("resync: comparing the whole trees: %s", report.full_reason)
    _progress(rep, report, f"pass {report.passes}: reading both trees")
    trees: dict[str, dict[str, Entry]] = {}

    async def local() -> None:
        build = functools.partial(
            manifest.build_manifest, root_fd, digests=False, workers=rep.resync_workers
        )
        trees["local"] = await trio.to_thread.run_sync(build, abandon_on_cancel=True)

    async def remote() -> None:
        trees["remote"] = await _fetch_whole(rep)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(local)
            nursery.start_soon(remote)
    except BaseExceptionGroup as group:  # one side failed (the other was cancelled): say why
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
            raise group.exceptions[0] from None
        raise
    return trees["local"], trees["remote"]


async def _fetch_whole(rep: Replicator) -> dict[str, Entry]:
    assert rep.peer is not None and rep.key is not None
    fetch = functools.partial(
        wire.fetch_manifest,
        rep.peer,
        rep.key,
        max(rep.timeout, 2.0),
        MANIFEST_BUILD_TIMEOUT,
        digests=False,
    )
    return await trio.to_thread.run_sync(fetch, abandon_on_cancel=True)


async def _fetch_partial(
    rep: Replicator, scope: manifest.Scope, digests: bool = True
) -> manifest.Partial:
    assert rep.peer is not None and rep.key is not None
    fetch = functools.partial(
        wire.fetch_partial, rep.peer, rep.key, max(rep.timeout, 2.0), scope, digests
    )
    return await trio.to_thread.run_sync(fetch, abandon_on_cancel=True)


# ---------------------------------------------------------------------------- the journal


async def _untrusted(rep: Replicator) -> str:
    """Why the ALONE journal cannot say what differs on the replica ("" if it can).

    It can when it names every change since the replica's copy was last identical to
    ours: no crash or interrupted resync since (no "unclean" record), and the replica's
    copy is still the one our last completed session left (the session token it
    persisted with RESYNC_DONE, which it reports only while its copy is that session's:
    not after another session, a mount on it, a refused op, or if its directory was
    replaced). Asked before our session opens, since opening one voids the token.
    """
    if rep.journal.unclean:
        return "the journal is unclean (a crash, or a resync interrupted mid-copy)"
    ours = rep.state.current.session
    if not ours:
        return "no completed session with the replica to start the journal from"
    theirs = (await _fetch_partial(rep, manifest.Scope())).session
    if theirs != ours:
        return "the replica's copy is not the one the journal starts from"
    return ""


@dataclass
class Narrowed:
    """Partial manifests of both sides over what the journal names."""

    scope: manifest.Scope
    local: dict[str, Entry]
    remote: dict[str, Entry]

    def ranges(self, changes: Changes, plan: ResyncPlan) -> dict[str, set[int]]:
        """Files to rewrite chunk by chunk: those whose only changes are journaled chunks.

        Not when the name may have been bound to another inode (its directory's entries
        changed, or an ancestor moved), nor for hard links (written under any name).
        """
        out: dict[str, set[int]] = {}
        for path in plan.rewrite:
            if not self._in_place(path):
                continue
            chunks, cut = changes.chunks(path)
            if cut >= 0:  # a truncate: everything from its chunk to the end may differ
                chunks |= set(range(cut, -(-self.local[path].size // CHUNK)))
            if chunks:  # else the content differs for no journaled reason: send it all
                out[path] = chunks
        return out

    def _in_place(self, path: str) -> bool:
        return (
            path in self.scope.paths
            and parent_of(path) not in self.scope.dirs
            and not _under(path, set(self.scope.trees))
            and not self.local[path].link_group
            and not self.remote[path].link_group
        )


MAX_ROUNDS = 4


async def _narrowed(rep: Replicator, root_fd: int, scope: manifest.Scope) -> Narrowed | str:
    """Partial manifests of what the journal names, or why they cannot be trusted.

    Subtrees of directories to make or remove are added to the scope, and both sides
    read again, until the plan needs nothing more.
    """
    for _ in range(MAX_ROUNDS):
        remote = await _fetch_partial(rep, scope, digests=False)
        build = functools.partial(manifest.build_partial, root_fd, scope, digests=False)
        local = await trio.to_thread.run_sync(build, abandon_on_cancel=True)
        loose = local.loose | remote.loose
        if loose:
            return f"hard-linked {min(loose)} has names outside the journaled paths"
        mine, theirs = narrow(local.entries, remote.entries, scope)
        grown = _grow(scope, mine, theirs)
        if grown == scope:
            return Narrowed(scope, mine, theirs)
        scope = grown
    return "the journaled changes keep reaching further subtrees"


def narrow(
    local: dict[str, Entry], remote: dict[str, Entry], scope: manifest.Scope
) -> tuple[dict[str, Entry], dict[str, Entry]]:
    """Keep what is on both sides, and what is on one side only where the journal says
    names changed: under a child of a journaled directory present on both sides, or
    under a moved entry. Anything else on one side only (a stale name in the journal)
    is left alone: the partial plan never removes or makes what the journal does not
    cover."""
    dirs = {d for d in scope.dirs if _is_dir(local.get(d)) and _is_dir(remote.get(d))}
    moved = set(scope.trees)

    def covered(path: str) -> bool:
        while path != ".":
            if parent_of(path) in dirs or path in moved:
                return True
            path = parent_of(path)
        return False

    both = local.keys() & remote.keys()
    return (
        {p: e for p, e in local.items() if p in both or covered(p)},
        {p: e for p, e in remote.items() if p in both or covered(p)},
    )


def _is_dir(entry: Entry | None) -> bool:
    return entry is not None and entry.kind == "dir"


def _grow(
    scope: manifest.Scope, local: dict[str, Entry], remote: dict[str, Entry]
) -> manifest.Scope:
    """The scope plus the subtrees of directories the plan would make or remove."""
    plan = plan_resync(local, remote)
    whole = [p for p in plan.remove if _is_dir(remote.get(p))]
    whole += [p for p in plan.create if _is_dir(local.get(p))]
    trees = set(scope.trees)
    more = {p for p in whole if not _under(p, trees)}
    if not more:
        return scope
    return manifest.Scope(scope.paths, scope.dirs, frozenset(trees | more))


def _conclude(rep: Replicator, report: ResyncReport, seconds: float) -> None:
    report.ok = rep.mode is Mode.MIRROR
    report.seconds = round(seconds, 3)
    if report.ok:
        how = "from the journal" if report.journal else f"whole trees: {report.full_reason}"
        report.message = (
            f"mirroring: {report.files_copied} files copied of {report.files_checked} "
            f"entries checked ({how}), {report.removed} removed"
        )
    else:
        report.message = rep.reason or "resync failed"
    rep.resync_status = {"phase": "done" if report.ok else "failed", **report.reply()}


def _progress(rep: Replicator, report: ResyncReport, phase: str) -> None:
    log.info("resync: %s", phase)
    rep.resync_status = {"phase": phase, **report.reply()}


def _not_alone(mode: Mode) -> tuple[bool, str]:
    if mode is Mode.MIRROR:
        return True, "already mirroring"
    if mode is Mode.STANDALONE:
        return False, "a standalone mount has no peer to mirror to"
    if mode is Mode.RESYNC:
        return False, "a resync is already running"
    return False, f"cannot resync while {mode.value}"
