"""Manifest of a directory tree, and the comparison of two manifests (`hafs fs verify`).

A manifest maps each relative path to an `Entry` recording everything replication must
preserve: type, permission bits, owner, size, mtime, content checksum, symlink target,
extended attributes and hard-link structure. Two nodes build manifests of their trees, one
sends its manifest over the wire (`to_bytes` / `from_bytes`) and `compare` lists the
differences.

A partial manifest (`build_partial`, for a resync driven by the ALONE journal) covers only
the paths of a `Scope`, each resolved under the root without following symlinks, and says
which of its files have hard links it does not list (`Partial.loose`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import hashlib
import json
import os
import queue
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

CHUNK = 1 << 20
# Threads of a whole-tree walk for a resync (both sides): disk requests kept in flight.
WORKERS = 4
FORMAT_VERSION = 2

_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
}
KINDS = frozenset(_KINDS.values())

# O_NONBLOCK: if a regular file is swapped for a fifo between lstat and open, opening it
# must not hang; it has no effect on reads of regular files.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# Errors meaning "this entry vanished or changed type under us": the tree is live, so such
# entries are skipped rather than failing the whole walk.
_GONE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENXIO, errno.EINVAL})
_NO_XATTRS = frozenset({errno.ENOTSUP, errno.ENOENT})
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class ManifestError(ValueError):
    """A serialised manifest is malformed."""


# slots: a million entries take half the memory they would with a __dict__ each.
@dataclass(frozen=True, slots=True)
class Entry:
    path: str
    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    digest: str = ""
    target: str = ""
    xattrs: tuple[tuple[str, str], ...] = ()
    link_group: str = ""
    # This node's inode number, for the resync to name entries the way the mount does.
    # Never serialised nor compared: it means nothing on the other node.
    ino: int = dataclasses.field(default=0, compare=False, repr=False)


# ---------------------------------------------------------------------------- building


@dataclass(frozen=True)
class Scope:
    """What a partial manifest covers (paths relative to the root, "." for the root)."""

    paths: frozenset[str] = frozenset()  # the entries themselves
    dirs: frozenset[str] = frozenset()  # the directories and their children
    trees: frozenset[str] = frozenset()  # the entries and everything under them

    def to_json(self) -> dict[str, list[str]]:
        return {"paths": sorted(self.paths), "dirs": sorted(self.dirs), "trees": sorted(self.trees)}

    @classmethod
    def from_json(cls, doc: object) -> Scope:
        """Parse `to_json` output; raises ManifestError on anything malformed."""
        if not isinstance(doc, dict):
            raise ManifestError("scope is not an object")
        if doc.keys() - {"paths", "dirs", "trees"}:
            # Not taken for an empty scope: a request of another kind must fail loudly.
            raise ManifestError(f"scope has unknown keys {sorted(doc.keys())}")
        lists = [doc.get(k, []) for k in ("paths", "dirs", "trees")]
        for items in lists:
            if not isinstance(items, list) or not all(type(i) is str for i in items):
                raise ManifestError("scope must hold lists of paths")
            for path in items:
                check_path(path)
        return cls(*(frozenset(items) for items in lists))


@dataclass
class Partial:
    entries: dict[str, Entry]
    loose: set[str]  # hard-linked files with names outside the entries
    session: str = ""  # the replica's completed session (see hafs.state), if any


def check_path(path: str) -> None:
    """A relative path of plain components: no way out of the root, nothing to normalise."""
    if path == ".":
        return
    parts = path.split("/")
    if not path or path.startswith("/") or any(c in ("", ".", "..") for c in parts):
        raise ManifestError(f"bad path {path!r}")


def build_partial(root: int, scope: Scope, *, digests: bool = True) -> Partial:
    """Manifest of the scope's paths in the tree at `root` (an fd; O_PATH allowed).

    Paths that do not exist, or lead through a symlink, a non-directory or another file
    system, are simply absent, as they would be from a whole-tree walk. digests=False:
    no content read (a resync compares such files by block hashes instead).
    """
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root)
    try:
        walk = _Walk(os.fstat(fd), digests=digests)
        for path in sorted(scope.trees):
            walk.subtree(fd, path)
        for path in sorted(scope.dirs):
            walk.children(fd, path)
        for path in sorted(scope.paths):
            walk.single(fd, path)
        walk._group_links()
        return Partial(walk.entries, walk.loose())
    finally:
        os.close(fd)


def build_manifest(root: str | int, *, digests: bool = True, workers: int = 1) -> dict[str, Entry]:
    """Manifest of the tree at `root`, a path or an open directory fd (O_PATH allowed).

    digests=False reads no content (every digest is ""): the cheap comparison by size and
    mtime, which costs one lstat and one listxattr per file. workers > 1 walks with that
    many threads: the system calls release the GIL, so a tree whose metadata is not cached
    is read with that many disk requests in flight.
    """
    if isinstance(root, int):
        # Our own readable fd: listing needs one, and the caller's fd stays untouched.
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root)
    else:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _Walk(os.fstat(fd), digests=digests, workers=workers).run(fd)
    finally:
        os.close(fd)


# A directory's names are read in slices of this many: slices of one big directory go to
# different workers, and a slice's entries are merged in one step.
SLICE = 512


@dataclass(frozen=True)
class _Visit:
    """One unit of a walk: a directory to list (names None), or a slice of its names."""

    rel: str  # relative to the walk's base directory
    names: tuple[str, ...] | None = None


@dataclass
class _Found:
    """What one visit found: entries, link counts of hard-linked files, visits to make."""

    entries: list[Entry] = dataclasses.field(default_factory=list)
    nlinks: dict[str, int] = dataclasses.field(default_factory=dict)
    visits: list[_Visit] = dataclasses.field(default_factory=list)


class _Walk:
    """State of one walk: the entries so far and the hard links seen.

    Visits (`_visit`) only read the tree and return what they found; the walk's own thread
    merges it (`_merge`), so the shared state needs no lock however many workers visit.
    """

    def __init__(self, root_st: os.stat_result, *, digests: bool = True, workers: int = 1) -> None:
        self.dev = root_st.st_dev
        self.digests = digests
        self.workers = max(1, workers)
        self.entries: dict[str, Entry] = {}
        self.links: dict[int, list[str]] = {}
        self.nlinks: dict[int, int] = {}
        self._local = threading.local()  # a read buffer per worker thread

    def run(self, base_fd: int, prefix: str = ".") -> dict[str, Entry]:
        """Walk the directory at base_fd, named `prefix` in the manifest, and its subtree."""
        if self.workers == 1:
            todo = [_Visit(".")]
            while todo:
                todo += self._merge(prefix, self._visit(base_fd, prefix, todo.pop()))
        else:
            self._run_parallel(base_fd, prefix)
        self._group_links()
        return self.entries

    def _run_parallel(self, base_fd: int, prefix: str) -> None:
        done: queue.SimpleQueue[Future[_Found]] = queue.SimpleQueue()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="manifest") as pool:

            def submit(visit: _Visit) -> None:
                pool.submit(self._visit, base_fd, prefix, visit).add_done_callback(done.put)

            submit(_Visit("."))
            outstanding = 1
            try:
                while outstanding:
                    found = done.get().result()
                    outstanding -= 1
                    for visit in self._merge(prefix, found):
                        submit(visit)
                        outstanding += 1
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise

    def _merge(self, prefix: str, found: _Found) -> list[_Visit]:
        for entry in found.entries:
            if entry.path in self.entries:
                continue  # named twice by a partial scope
            self.entries[entry.path] = entry
            nlink = found.nlinks.get(entry.path)
            if nlink:
                self.links.setdefault(entry.ino, []).append(entry.path)
                self.nlinks[entry.ino] = nlink
        # A directory already walked: a tree inside another one of the scope.
        return [v for v in found.visits if v.names or _named(prefix, v.rel) not in self.entries]

    def _visit(self, base_fd: int, prefix: str, visit: _Visit) -> _Found:
        found = _Found()
        fd = self._open_dir(base_fd, visit.rel)
        if fd is None:
            return found  # gone, or no longer a directory of this file system
        try:
            path = _named(prefix, visit.rel)
            names = visit.names
            if names is None:
                try:
                    names = tuple(os.listdir(fd))
                except OSError as e:
                    if e.errno in _GONE:  # removed since it was opened
                        return found
                    raise
                found.entries.append(_entry(path, os.fstat(fd), xattrs=_xattrs(fd)))
                found.visits += [
                    _Visit(visit.rel, names[i : i + SLICE]) for i in range(SLICE, len(names), SLICE)
                ]
                names = names[:SLICE]
            self._visit_children(fd, visit.rel, path, names, found)
        finally:
            os.close(fd)
        return found

    def _visit_children(
        self, dirfd: int, rel: str, path: str, names: tuple[str, ...], found: _Found
    ) -> None:
        # The loop of a million files: regular files without digests are made here, with
        # no call that is not needed (this is most of a cheap manifest's CPU time).
        cheap, dev = not self.digests, self.dev
        entries, nlinks = found.entries, found.nlinks
        by_name = f"/proc/self/fd/{dirfd}/"
        prefix = "" if path == "." else f"{path}/"
        for name in names:
            st = _lstat(dirfd, name)
            if st is None or st.st_dev != dev:
                continue  # gone, or a mount point
            fmt = stat.S_IFMT(st.st_mode)
            if fmt == stat.S_IFDIR:
                found.visits.append(_Visit(_join(rel, name)))
            elif fmt == stat.S_IFREG and cheap:
                # By name, not fd: one system call instead of open, listxattr, close.
                xattrs = _xattrs(by_name + name)
                child = prefix + name
                mode, size, mtime = stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns
                entry = Entry(child, "file", mode, st.st_uid, st.st_gid, size, mtime, "", "",
                              xattrs, "", st.st_ino)  # fmt: skip
                entries.append(entry)
                if st.st_nlink > 1:
                    nlinks[child] = st.st_nlink
            else:
                self._leaf_into(dirfd, prefix + name, name, st, found)

    # -- partial walks: each path resolved from the root, component by component --------

    def subtree(self, root_fd: int, path: str) -> None:
        if path == ".":
            self.run(root_fd)
            return
        parent = self._open_dir(root_fd, parent_path(path))
        if parent is None:
            return
        try:
            name = path.rpartition("/")[2]
            st = _lstat(parent, name)
            if st is not None and stat.S_ISDIR(st.st_mode):
                sub = self._open_dir(parent, name)
                if sub is not None:
                    try:
                        self.run(sub, path)
                    finally:
                        os.close(sub)
            else:
                self._leaf(parent, path, name, st)
        finally:
            os.close(parent)

    def children(self, root_fd: int, path: str) -> None:
        fd = self._open_dir(root_fd, path)
        if fd is None:
            return
        try:
            self._dir_entry(fd, path)
            for name in os.listdir(fd):
                self._child(fd, _join(path, name), name)
        finally:
            os.close(fd)

    def single(self, root_fd: int, path: str) -> None:
        if path == ".":
            self._dir_entry(root_fd, ".")
            return
        parent = self._open_dir(root_fd, parent_path(path))
        if parent is not None:
            try:
                self._child(parent, path, path.rpartition("/")[2])
            finally:
                os.close(parent)

    def _child(self, dirfd: int, path: str, name: str) -> None:
        if path in self.entries:
            return
        st = _lstat(dirfd, name)
        if st is None or st.st_dev != self.dev or not stat.S_ISDIR(st.st_mode):
            self._leaf(dirfd, path, name, st)
            return
        fd = self._open_dir(dirfd, name)
        if fd is not None:
            try:
                self._dir_entry(fd, path)
            finally:
                os.close(fd)

    def _dir_entry(self, fd: int, path: str) -> None:
        if path not in self.entries:
            self.entries[path] = _entry(path, os.fstat(fd), xattrs=_xattrs(fd))

    def _open_dir(self, dirfd: int, path: str) -> int | None:
        """Open a directory below dirfd, following no symlink and crossing no mount."""
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dirfd)
        for name in [] if path == "." else path.split("/"):
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno not in _GONE:
                    os.close(fd)
                    raise
                sub = -1
            os.close(fd)
            if sub < 0:
                return None
            fd = sub
            if os.fstat(fd).st_dev != self.dev:
                os.close(fd)
                return None
        return fd

    def loose(self) -> set[str]:
        """Files whose inode has more names than this walk saw."""
        return {
            path
            for ino, paths in self.links.items()
            if len(paths) < self.nlinks[ino]
            for path in paths
        }

    def _leaf(self, dirfd: int, path: str, name: str, st: os.stat_result | None = None) -> None:
        if st is None:
            st = _lstat(dirfd, name)
        if st is None or st.st_dev != self.dev or stat.S_ISDIR(st.st_mode):
            return  # gone, another file system, or a directory created after the listing
        if path not in self.entries:  # else named twice by a partial scope
            found = _Found()
            self._leaf_into(dirfd, path, name, st, found)
            self._merge(".", found)

    def _leaf_into(
        self, dirfd: int, path: str, name: str, st: os.stat_result, found: _Found
    ) -> None:
        """The entry of a non-directory, into `found`; nothing if it vanished meanwhile."""
        if stat.S_ISREG(st.st_mode) and self.digests:
            entry = self._file(dirfd, path, name, found)
        elif stat.S_ISREG(st.st_mode):
            entry = _entry(path, st, xattrs=_xattrs(f"/proc/self/fd/{dirfd}/{name}"))
            if st.st_nlink > 1:
                found.nlinks[path] = st.st_nlink
        elif stat.S_ISLNK(st.st_mode):
            entry = _symlink(dirfd, path, name, st)
        else:
            # Devices and sockets cannot be opened harmlessly: reach them through the
            # directory fd's /proc link, not following `name` itself.
            entry = _entry(path, st, xattrs=_xattrs(f"/proc/self/fd/{dirfd}/{name}"))
        if entry is not None:
            found.entries.append(entry)

    def _file(self, dirfd: int, path: str, name: str, found: _Found) -> Entry | None:
        try:
            fd = _open_file(dirfd, name)
        except OSError as e:
            if e.errno in _GONE:
                return None
            raise
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode):
                return None  # replaced by a fifo or device between lstat and open
            digest = _digest(fd, self._buffer(), fst.st_size)
            xattrs = _xattrs(fd)
        finally:
            os.close(fd)
        if fst.st_nlink > 1:
            found.nlinks[path] = fst.st_nlink
        # fstat, not the earlier lstat: it describes the inode whose content was read.
        return _entry(path, fst, digest=digest, xattrs=xattrs)

    def _buffer(self) -> bytearray:
        buf: bytearray | None = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = bytearray(CHUNK)
        return buf

    def _group_links(self) -> None:
        for paths in self.links.values():
            first = min(paths)
            for p in paths:
                self.entries[p] = dataclasses.replace(self.entries[p], link_group=first)


def _entry(
    path: str,
    st: os.stat_result,
    *,
    digest: str = "",
    target: str = "",
    xattrs: tuple[tuple[str, str], ...] = (),
) -> Entry:
    kind = _KINDS[stat.S_IFMT(st.st_mode)]
    return Entry(
        path=path,
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=0 if kind == "dir" else st.st_size,
        mtime_ns=st.st_mtime_ns,
        digest=digest,
        target=target,
        xattrs=xattrs,
        ino=st.st_ino,
    )


def _symlink(dirfd: int, path: str, name: str, st: os.stat_result) -> Entry | None:
    try:
        target = os.readlink(name, dir_fd=dirfd)
    except OSError as e:
        if e.errno in _GONE:
            return None
        raise
    # No xattrs: user.* is not allowed on symlinks, and the peer may not preserve others.
    return _entry(path, st, target=target)


def parent_path(path: str) -> str:
    head, sep, _ = path.rpartition("/")
    return head if sep else "."


def _join(rel: str, name: str) -> str:
    return name if rel == "." else f"{rel}/{name}"


def _named(prefix: str, rel: str) -> str:
    """The manifest's name of `rel`, a path relative to a directory named `prefix`."""
    if rel == ".":
        return prefix
    return rel if prefix == "." else f"{prefix}/{rel}"


def _lstat(dirfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _open_file(dirfd: int, name: str) -> int:
    try:
        # O_NOATIME: verifying must not make every file look recently read.
        return os.open(name, _FILE_FLAGS | os.O_NOATIME, dir_fd=dirfd)
    except PermissionError as e:
        if e.errno != errno.EPERM:  # EPERM: not our file; EACCES is a real refusal
            raise
        return os.open(name, _FILE_FLAGS, dir_fd=dirfd)


def _digest(fd: int, buf: bytearray, size: int) -> str:
    h = hashlib.sha256()
    view = memoryview(buf)
    # readv into one reused buffer: os.read would allocate 1 MiB per call, per file.
    while n := os.readv(fd, [buf]):
        h.update(view[:n])
        if n == size < len(buf):
            break  # all fstat said there was: a small file needs no read to see its end
        size -= n
    return h.hexdigest()


def _xattrs(target: int | str) -> tuple[tuple[str, str], ...]:
    """Sorted (name, hex value) pairs of an fd, or of a path without following it."""
    # An fd must be passed with the default follow_symlinks=True (False is a ValueError);
    # a path must not be followed.
    follow = isinstance(target, int)
    try:
        names = os.listxattr(target, follow_symlinks=follow)
    except OSError as e:
        if e.errno in _NO_XATTRS:
            return ()
        raise
    pairs = []
    for name in names:
        try:
            pairs.append((name, os.getxattr(target, name, follow_symlinks=follow).hex()))
        except OSError as e:
            if e.errno != errno.ENODATA:  # ENODATA: removed since listxattr
                raise
    return tuple(sorted(pairs))


# ---------------------------------------------------------------------------- comparing


def compare(local: dict[str, Entry], remote: dict[str, Entry]) -> list[str]:
    """Human-readable differences, sorted; empty when the manifests are identical."""
    lines = [f"only on local: {p}" for p in local.keys() - remote.keys()]
    lines += [f"only on peer: {p}" for p in remote.keys() - local.keys()]
    for p in local.keys() & remote.keys():
        lines += [f"differs: {p}: {d}" for d in _entry_diffs(local[p], remote[p])]
    return sorted(lines)


def _entry_diffs(a: Entry, b: Entry) -> Iterator[str]:
    if a.kind != b.kind:
        yield f"kind {a.kind} != {b.kind}"
    if a.mode != b.mode:
        yield f"mode {a.mode:#o} != {b.mode:#o}"
    if (a.uid, a.gid) != (b.uid, b.gid):
        yield f"owner {a.uid}:{a.gid} != {b.uid}:{b.gid}"
    if a.mtime_ns != b.mtime_ns:
        yield f"mtime_ns {a.mtime_ns} != {b.mtime_ns}"
    yield from _xattr_diffs(dict(a.xattrs), dict(b.xattrs))
    if a.kind != b.kind:
        return  # size, content, target and links of different kinds say nothing more
    if a.size != b.size:
        yield f"size {a.size} != {b.size}"
    if a.digest != b.digest:
        yield f"content sha256 {a.digest[:8]}.. != {b.digest[:8]}.."
    if a.target != b.target:
        yield f"symlink target {a.target!r} != {b.target!r}"
    if a.link_group != b.link_group:
        yield f"hard link group {_or_none(a.link_group)} != {_or_none(b.link_group)}"


def _xattr_diffs(a: dict[str, str], b: dict[str, str]) -> Iterator[str]:
    for name in sorted(a.keys() | b.keys()):
        if a.get(name) != b.get(name):
            yield f"xattr {name} {_short(a.get(name))} != {_short(b.get(name))}"


def _short(value: str | None) -> str:
    if value is None:
        return "(none)"
    return value if len(value) <= 32 else f"{value[:32]}.."


def _or_none(group: str) -> str:
    return repr(group) if group else "(none)"


# ---------------------------------------------------------------------------- wire format

# Version 1: one JSON object, {"version": 1, "entries": [row, ...], ...}. Version 2: the
# same object with "entries" the number of rows, then the rows in pages, each page a JSON
# array of at most PAGE rows, with nothing in between. Version 2 is written and parsed a
# page at a time: parsed as one document, a million rows held about 400 MB of lists at
# once; parsed a row at a time, the parser's calls cost more than the rows. Version 1 is
# still read.
_VERSIONS = (1, FORMAT_VERSION)
# Positional rows keep the manifest compact; the types are checked on the way in.
_ROW_TYPES: tuple[tuple[str, type], ...] = (
    ("path", str),
    ("kind", str),
    ("mode", int),
    ("uid", int),
    ("gid", int),
    ("size", int),
    ("mtime_ns", int),
    ("digest", str),
    ("target", str),
    ("xattrs", list),
    ("link_group", str),
)
_TYPES = tuple(typ for _, typ in _ROW_TYPES)
_KIND_NAMES = {kind: kind for kind in KINDS}  # a parsed kind becomes the one shared str
PAGE = 4096
_DECODER = json.JSONDecoder()
# A JSON string literal with everything outside ASCII escaped, as json.dumps(ensure_ascii)
# writes it: non-UTF-8 file names live in str as lone surrogates, which JSON escapes
# survive but a UTF-8 encoding would not.
_quote = json.encoder.encode_basestring_ascii


def to_bytes(m: dict[str, Entry], loose: set[str] | None = None, session: str = "") -> bytes:
    head: dict[str, Any] = {"version": FORMAT_VERSION, "entries": len(m)}
    if loose is not None:  # a partial manifest
        head["loose"] = sorted(loose)
    if session:
        head["session"] = session
    parts = [json.dumps(head, separators=(",", ":"), ensure_ascii=True).encode("ascii")]
    paths = sorted(m)
    for start in range(0, len(paths), PAGE):
        rows = ",".join([_row_text(m[p]) for p in paths[start : start + PAGE]])
        parts.append(f"[{rows}]".encode("ascii"))
    return b"".join(parts)


def _row_text(e: Entry) -> str:
    xattrs = "[]"
    if e.xattrs:
        xattrs = json.dumps([list(pair) for pair in e.xattrs], separators=(",", ":"))
    # :d refuses anything but an int, so a bad Entry fails here, not on the peer.
    return (
        f"[{_quote(e.path)},{_quote(e.kind)},{e.mode:d},{e.uid:d},{e.gid:d},{e.size:d},"
        f"{e.mtime_ns:d},{_quote(e.digest)},{_quote(e.target)},{xattrs},{_quote(e.link_group)}]"
    )


def from_bytes(b: bytes) -> dict[str, Entry]:
    """Parse `to_bytes` output; raises ManifestError on anything malformed."""
    return _entries(_document(b)[1])


def partial_from_bytes(b: bytes) -> Partial:
    """Parse `to_bytes` output with its partial-manifest fields."""
    head, rows = _document(b)
    loose, session = head.get("loose", []), head.get("session", "")
    if not isinstance(loose, list) or not all(type(p) is str for p in loose):
        raise ManifestError("manifest 'loose' must be a list of paths")
    if type(session) is not str:
        raise ManifestError("manifest 'session' must be a string")
    return Partial(_entries(rows), set(loose), session)


def _document(b: bytes) -> tuple[dict[str, Any], Iterator[object]]:
    """The head object and its rows, parsed as they are iterated."""
    try:
        text = b.decode("ascii")
        head, end = _DECODER.raw_decode(text)
    except (ValueError, RecursionError) as e:
        raise ManifestError(f"manifest is not valid JSON: {e}") from None
    if not isinstance(head, dict) or head.get("version") not in _VERSIONS:
        raise ManifestError(f"manifest is not a version {_VERSIONS} manifest object")
    rows = head.get("entries")
    if head["version"] == 1:
        if not isinstance(rows, list):
            raise ManifestError("manifest has no 'entries' list")
        if end != len(text):
            raise ManifestError("manifest has data after its object")
        return head, iter(rows)
    if type(rows) is not int or rows < 0:
        raise ManifestError("manifest has no 'entries' count")
    return head, _rows(text, end, rows)


def _rows(text: str, pos: int, count: int) -> Iterator[object]:
    left = count
    while left:
        try:
            page, pos = _DECODER.raw_decode(text, pos)
        except (ValueError, RecursionError) as e:
            raise ManifestError(f"manifest page at entry {count - left}: {e}") from None
        if type(page) is not list or not 0 < len(page) <= min(left, PAGE):
            raise ManifestError(f"manifest page at entry {count - left} is not a list of rows")
        left -= len(page)
        yield from page
    if pos != len(text):
        raise ManifestError(f"manifest has data after its {count} entries")


def _entries(rows: Iterator[object]) -> dict[str, Entry]:
    m: dict[str, Entry] = {}
    with _gc_paused():
        for i, row in enumerate(rows):
            entry = _parse_row(i, row)
            if entry.path in m:
                raise ManifestError(f"manifest entry {i}: duplicate path {entry.path!r}")
            m[entry.path] = entry
    return m


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection meanwhile: the parse makes only acyclic objects, and a
    page of rows alive at once made the collector scan the growing manifest over and over
    (a third of the parse's time, measured). Not re-enabled if someone else disabled it."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _parse_row(i: int, row: object) -> Entry:
    # One comparison of the field types, `is` (so that JSON true is not taken for an int);
    # the message naming the field is worked out only for a bad row.
    if type(row) is not list or len(row) != len(_TYPES) or tuple(map(type, row)) != _TYPES:
        raise ManifestError(_row_error(i, row))
    path, kind, mode, uid, gid, size, mtime_ns, digest, target, xattrs, link_group = row
    shared = _KIND_NAMES.get(kind)
    if shared is None:
        raise ManifestError(f"manifest entry {i}: unknown kind {kind!r}")
    if not 0 <= mode <= 0o7777:
        raise ManifestError(f"manifest entry {i}: mode {mode} out of range")
    pairs = _parse_xattrs(i, xattrs) if xattrs else ()
    return Entry(path, shared, mode, uid, gid, size, mtime_ns, digest, target, pairs, link_group)


def _row_error(i: int, row: object) -> str:
    if not isinstance(row, list) or len(row) != len(_ROW_TYPES):
        return f"manifest entry {i}: not a list of {len(_ROW_TYPES)} fields"
    for (field, typ), value in zip(_ROW_TYPES, row, strict=True):
        if type(value) is not typ:
            return f"manifest entry {i}: {field} must be {typ.__name__}"
    return f"manifest entry {i}: malformed"


def _parse_xattrs(i: int, pairs: list[Any]) -> tuple[tuple[str, str], ...]:
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2 and all(type(s) is str for s in pair)):
            raise ManifestError(f"manifest entry {i}: xattrs must be [name, hex] pairs")
    return tuple((name, value) for name, value in pairs)
