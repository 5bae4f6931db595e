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

import dataclasses
import errno
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

CHUNK = 1 << 20
FORMAT_VERSION = 1

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


@dataclass(frozen=True)
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


def build_partial(root: int, scope: Scope) -> Partial:
    """Manifest of the scope's paths in the tree at `root` (an fd; O_PATH allowed).

    Paths that do not exist, or lead through a symlink, a non-directory or another file
    system, are simply absent, as they would be from a whole-tree walk.
    """
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root)
    try:
        walk = _Walk(os.fstat(fd))
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


def build_manifest(root: str | int) -> dict[str, Entry]:
    """Manifest of the tree at `root`, a path or an open directory fd (O_PATH allowed)."""
    if isinstance(root, int):
        # Our own readable fd: fwalk needs one, and the caller's fd stays untouched.
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root)
    else:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _Walk(os.fstat(fd)).run(fd)
    finally:
        os.close(fd)


class _Walk:
    """State of one walk: the entries so far and the hard links seen."""

    def __init__(self, root_st: os.stat_result) -> None:
        self.dev = root_st.st_dev
        self.entries: dict[str, Entry] = {}
        # Directories are lstat'ed in their parent (to prune symlinks and mount points) and
        # recorded when visited, where fwalk hands us an fd for their xattrs.
        self.dir_stats: dict[str, os.stat_result] = {".": root_st}
        self.links: dict[int, list[str]] = {}
        self.nlinks: dict[int, int] = {}
        self.buf = bytearray(CHUNK)

    def run(self, root_fd: int, prefix: str = ".") -> dict[str, Entry]:
        walk = os.fwalk(".", dir_fd=root_fd, follow_symlinks=False, onerror=_raise_unless_gone)
        for dirpath, dirnames, filenames, dirfd in walk:
            rel = dirpath.removeprefix("./")
            if prefix != ".":
                rel = prefix if rel == "." else f"{prefix}/{rel}"
            if rel in self.entries:
                dirnames[:] = []  # already walked (a tree inside another one of the scope)
                continue
            st = self.dir_stats.pop(rel, None) or os.fstat(dirfd)
            self.entries[rel] = _entry(rel, st, xattrs=_xattrs(dirfd))
            dirnames[:] = [n for n in dirnames if self._keep_dir(dirfd, rel, n)]
            for name in filenames:
                self._leaf(dirfd, _join(rel, name), name)
        self._group_links()
        return self.entries

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
                    self.dir_stats[path] = st
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

    def _keep_dir(self, dirfd: int, rel: str, name: str) -> bool:
        """Whether to descend into `name`; fwalk lists symlinks to directories here too."""
        path = _join(rel, name)
        st = _lstat(dirfd, name)
        if st is None or st.st_dev != self.dev:
            return False
        if stat.S_ISDIR(st.st_mode):
            self.dir_stats[path] = st
            return True
        self._leaf(dirfd, path, name, st)
        return False

    def _leaf(self, dirfd: int, path: str, name: str, st: os.stat_result | None = None) -> None:
        if st is None:
            st = _lstat(dirfd, name)
        if st is None or st.st_dev != self.dev or stat.S_ISDIR(st.st_mode):
            return  # gone, another file system, or a directory created after the listing
        if path in self.entries:
            return  # named twice by a partial scope
        if stat.S_ISREG(st.st_mode):
            entry = self._file(dirfd, path, name)
        elif stat.S_ISLNK(st.st_mode):
            entry = _symlink(dirfd, path, name, st)
        else:
            # Devices and sockets cannot be opened harmlessly: reach them through the
            # directory fd's /proc link, not following `name` itself.
            entry = _entry(path, st, xattrs=_xattrs(f"/proc/self/fd/{dirfd}/{name}"))
        if entry is not None:
            self.entries[path] = entry

    def _file(self, dirfd: int, path: str, name: str) -> Entry | None:
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
            digest = _digest(fd, self.buf)
            xattrs = _xattrs(fd)
        finally:
            os.close(fd)
        if fst.st_nlink > 1:
            self.links.setdefault(fst.st_ino, []).append(path)
            self.nlinks[fst.st_ino] = fst.st_nlink
        # fstat, not the earlier lstat: it describes the inode whose content was read.
        return _entry(path, fst, digest=digest, xattrs=xattrs)

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


def _lstat(dirfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _raise_unless_gone(err: OSError) -> None:
    """fwalk's onerror: a directory that vanished is skipped, anything else is a failure."""
    if err.errno not in _GONE:
        raise err


def _open_file(dirfd: int, name: str) -> int:
    try:
        # O_NOATIME: verifying must not make every file look recently read.
        return os.open(name, _FILE_FLAGS | os.O_NOATIME, dir_fd=dirfd)
    except PermissionError as e:
        if e.errno != errno.EPERM:  # EPERM: not our file; EACCES is a real refusal
            raise
        return os.open(name, _FILE_FLAGS, dir_fd=dirfd)


def _digest(fd: int, buf: bytearray) -> str:
    h = hashlib.sha256()
    view = memoryview(buf)
    # readv into one reused buffer: os.read would allocate 1 MiB per call, per file.
    while n := os.readv(fd, [buf]):
        h.update(view[:n])
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


def to_bytes(m: dict[str, Entry], loose: set[str] | None = None, session: str = "") -> bytes:
    rows = [_row(m[p]) for p in sorted(m)]
    doc: dict[str, Any] = {"version": FORMAT_VERSION, "entries": rows}
    if loose is not None:  # a partial manifest
        doc["loose"] = sorted(loose)
    if session:
        doc["session"] = session
    # ensure_ascii: non-UTF-8 file names live in str as lone surrogates, which JSON escapes
    # survive but a UTF-8 encoding would not.
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _row(e: Entry) -> list[Any]:
    row = [getattr(e, field) for field, _ in _ROW_TYPES]
    row[9] = [list(pair) for pair in e.xattrs]
    return row


def from_bytes(b: bytes) -> dict[str, Entry]:
    """Parse `to_bytes` output; raises ManifestError on anything malformed."""
    return _entries(_document(b))


def partial_from_bytes(b: bytes) -> Partial:
    """Parse `to_bytes` output with its partial-manifest fields."""
    doc = _document(b)
    loose, session = doc.get("loose", []), doc.get("session", "")
    if not isinstance(loose, list) or not all(type(p) is str for p in loose):
        raise ManifestError("manifest 'loose' must be a list of paths")
    if type(session) is not str:
        raise ManifestError("manifest 'session' must be a string")
    return Partial(_entries(doc), set(loose), session)


def _document(b: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(b)
    except (ValueError, RecursionError) as e:
        raise ManifestError(f"manifest is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
        raise ManifestError(f"manifest is not a version {FORMAT_VERSION} manifest object")
    return doc


def _entries(doc: dict[str, Any]) -> dict[str, Entry]:
    rows = doc.get("entries")
    if not isinstance(rows, list):
        raise ManifestError("manifest has no 'entries' list")
    m: dict[str, Entry] = {}
    for i, row in enumerate(rows):
        entry = _parse_row(i, row)
        if entry.path in m:
            raise ManifestError(f"manifest entry {i}: duplicate path {entry.path!r}")
        m[entry.path] = entry
    return m


def _parse_row(i: int, row: object) -> Entry:
    if not isinstance(row, list) or len(row) != len(_ROW_TYPES):
        raise ManifestError(f"manifest entry {i}: not a list of {len(_ROW_TYPES)} fields")
    for (field, typ), value in zip(_ROW_TYPES, row, strict=True):
        if type(value) is not typ:  # `is`, so that JSON true is not taken for an int
            raise ManifestError(f"manifest entry {i}: {field} must be {typ.__name__}")
    if row[1] not in KINDS:
        raise ManifestError(f"manifest entry {i}: unknown kind {row[1]!r}")
    if not 0 <= row[2] <= 0o7777:
        raise ManifestError(f"manifest entry {i}: mode {row[2]} out of range")
    fields = dict(zip((field for field, _ in _ROW_TYPES), row, strict=True))
    fields["xattrs"] = _parse_xattrs(i, row[9])
    return Entry(**fields)


def _parse_xattrs(i: int, pairs: list[Any]) -> tuple[tuple[str, str], ...]:
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2 and all(type(s) is str for s in pair)):
            raise ManifestError(f"manifest entry {i}: xattrs must be [name, hex] pairs")
    return tuple((name, value) for name, value in pairs)
