"""A seeded random workload through a replicating mount, checked against a model and the replica.

Every operation is done through the mount and its result (success or the POSIX error) is
checked against an in-memory model of the tree. At the end the tree seen through the mount
must equal the model, and the replica, the backing directory and the mount must have
identical manifests (`hafs fs verify` agrees). A failure names the seed and the last ops.
"""

from __future__ import annotations

import errno
import os
import random
import stat
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hafs import manifest
from hafs._libc import AT_FDCWD, RENAME_EXCHANGE, RENAME_NOREPLACE
from hafs._libc import renameat2 as _renameat2

SEEDS = [1, 2, 3, 20240607]
OPS = 1500
MAX_SIZE = 3 << 20
NAMES = ["a", "b", "c", "d", "ib_log", "t1.ibd", "x" * 40, "name with space", "é"]
FILE_MODES = [0o644, 0o600, 0o640, 0o755, 0o000, 0o4755, 0o2750, 0o1644]
DIR_MODES = [0o755, 0o700, 0o750, 0o2775, 0o1777, 0o000]
OWNERS = [(0, 0), (1234, 1234), (65534, 65534), (102, 105)]
XATTR_NAMES = ["user.a", "user.checksum", "user.mysql.x"]
SYMLINK_TARGETS = ["a", "../b", "no/such/file", "/etc/passwd", "/var/lib/mysql/outside", "."]


def renameat2(old: str, new: str, flags: int) -> None:
    _renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)


@dataclass(eq=False)
class Node:
    """One inode of the model; hard links share the object."""

    kind: str  # file, dir, symlink, fifo
    data: bytearray = field(default_factory=bytearray)
    target: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)


def join(parent: str, name: str) -> str:
    return name if parent == "." else f"{parent}/{name}"


def related(a: str, b: str) -> bool:
    """a and b are the same path or one is inside the other."""
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        assert n > 0, "pwrite wrote nothing"
        view, offset = view[n:], offset + n


def model_write(node: Node, offset: int, data: bytes) -> None:
    if offset > len(node.data):
        node.data.extend(bytes(offset - len(node.data)))
    node.data[offset : offset + len(data)] = data


def model_truncate(node: Node, size: int) -> None:
    if size < len(node.data):
        del node.data[size:]
    else:
        node.data.extend(bytes(size - len(node.data)))


class Workload:
    def __init__(self, root: Path, seed: int) -> None:
        self.root = str(root)
        self.rng = random.Random(seed)
        self.model: dict[str, Node] = {}
        self.held: list[tuple[int, Node]] = []  # fds of files whose names were unlinked
        self.log: list[str] = []
        self.counts: dict[str, int] = {}
        self.ops: list[tuple[Callable[[], None], int]] = [
            (self.op_create, 10),
            (self.op_write, 14),
            (self.op_truncate, 5),
            (self.op_append, 5),
            (self.op_open_trunc, 2),
            (self.op_rename, 10),
            (self.op_link, 4),
            (self.op_unlink, 6),
            (self.op_symlink, 3),
            (self.op_mkfifo, 1),
            (self.op_mkdir, 5),
            (self.op_rmdir, 3),
            (self.op_chmod, 3),
            (self.op_chown, 2),
            (self.op_utime, 3),
            (self.op_setxattr, 3),
            (self.op_removexattr, 2),
            (self.op_fsync, 3),
            (self.op_open_unlinked, 2),
            (self.op_held, 3),
            (self.op_read, 4),
        ]

    # -- helpers -------------------------------------------------------------------------

    def p(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def note(self, text: str) -> None:
        self.log.append(text)

    def paths(self, *kinds: str) -> list[str]:
        return sorted(k for k, v in self.model.items() if not kinds or v.kind in kinds)

    def pick(self, *kinds: str) -> str | None:
        candidates = self.paths(*kinds)
        return self.rng.choice(candidates) if candidates else None

    def new_path(self) -> str:
        return join(self.rng.choice([".", *self.paths("dir")]), self.rng.choice(NAMES))

    def children(self, path: str) -> list[str]:
        return [k for k in self.model if k.startswith(path + "/")]

    def expect_error(self, err: int, fn: Callable[..., Any], *args: Any, **kw: Any) -> None:
        try:
            fn(*args, **kw)
        except OSError as e:
            assert e.errno == err, f"expected {errno.errorcode[err]}, got {e!r}"
            return
        raise AssertionError(f"expected {errno.errorcode[err]}, but the call succeeded")

    def randbytes(self, n: int) -> bytes:
        # Compressible and random parts, so that content mix-ups show.
        return self.rng.randbytes(n) if self.rng.random() < 0.5 else bytes([n % 251]) * n

    def subtree(self, path: str) -> dict[str, Node]:
        return {k: v for k, v in self.model.items() if k == path or k.startswith(path + "/")}

    def remove_tree(self, path: str) -> dict[str, Node]:
        tree = self.subtree(path)
        for k in tree:
            del self.model[k]
        return tree

    def insert_tree(self, old: str, new: str, tree: dict[str, Node]) -> None:
        for k, v in tree.items():
            self.model[new + k[len(old) :]] = v

    def run(self, n: int, checkpoint: Callable[[], None]) -> None:
        funcs = [f for f, _ in self.ops]
        weights = [w for _, w in self.ops]
        for i in range(n):
            op = self.rng.choices(funcs, weights)[0]
            self.note(f"#{i} {op.__name__}")
            op()
            self.counts[op.__name__] = self.counts.get(op.__name__, 0) + 1
            if i == n // 2:
                checkpoint()
        for fd, _ in self.held:
            os.close(fd)
        self.held.clear()

    # -- operations ----------------------------------------------------------------------

    def op_create(self) -> None:
        path, mode = self.new_path(), self.rng.choice(FILE_MODES)
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
        self.note(f"create {path!r} {mode:o}")
        if path in self.model:
            self.expect_error(errno.EEXIST, os.open, self.p(path), flags, mode)
            return
        data = self.randbytes(self.rng.choice([0, 1, 100, 4096, self.rng.randrange(1, 200_000)]))
        fd = os.open(self.p(path), flags, mode)
        try:
            write_all(fd, data, 0)
        finally:
            os.close(fd)
        self.model[path] = Node("file", bytearray(data))

    def op_write(self) -> None:
        path = self.pick("file")
        if path is None:
            return
        node = self.model[path]
        size = len(node.data)
        n = self.rng.choice([1, 7, 512, 4096, 16384, self.rng.randrange(1, 300_000)])
        if self.rng.random() < 0.2:
            offset = size + self.rng.randrange(1, 1 << 20)  # leaves a hole
        else:
            offset = self.rng.randrange(0, size + 1)
        offset = max(0, min(offset, MAX_SIZE - n))
        data = self.randbytes(n)
        self.note(f"write {path!r} at {offset} len {n}")
        fd = os.open(self.p(path), os.O_WRONLY)
        try:
            write_all(fd, data, offset)
            if self.rng.random() < 0.1:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        model_write(node, offset, data)

    def op_truncate(self) -> None:
        path = self.pick("file")
        if path is None:
            return
        node = self.model[path]
        size = len(node.data)
        new = self.rng.choice(
            [0, self.rng.randrange(0, size + 1), size + self.rng.randrange(1, 1 << 20)]
        )
        new = min(new, MAX_SIZE)
        by_fd = self.rng.random() < 0.5
        self.note(f"truncate {path!r} to {new} ({'fd' if by_fd else 'path'})")
        if by_fd:
            fd = os.open(self.p(path), os.O_RDWR)
            try:
                os.ftruncate(fd, new)
            finally:
                os.close(fd)
        else:
            os.truncate(self.p(path), new)
        model_truncate(node, new)

    def op_append(self) -> None:
        path = self.pick("file")
        if path is None:
            return
        node = self.model[path]
        fds = [os.open(self.p(path), os.O_WRONLY | os.O_APPEND) for _ in range(2)]
        self.note(f"append {path!r}")
        try:
            for _ in range(self.rng.randrange(1, 6)):
                if len(node.data) > MAX_SIZE:
                    break
                fd = self.rng.choice(fds)
                data = self.randbytes(self.rng.randrange(1, 20_000))
                os.lseek(fd, 0, os.SEEK_SET)  # must not matter with O_APPEND
                assert os.write(fd, data) == len(data)
                node.data.extend(data)
        finally:
            for fd in fds:
                os.close(fd)

    def op_open_trunc(self) -> None:
        path = self.pick("file")
        if path is None:
            return
        data = self.randbytes(self.rng.randrange(0, 10_000))
        self.note(f"open O_TRUNC {path!r} write {len(data)}")
        fd = os.open(self.p(path), os.O_WRONLY | os.O_TRUNC)
        try:
            write_all(fd, data, 0)
        finally:
            os.close(fd)
        self.model[path].data[:] = data

    def op_rename(self) -> None:
        src = self.pick()
        if src is None:
            return
        dst = self.pick() if self.rng.random() < 0.5 else self.new_path()
        if dst is None or related(src, dst):
            return  # moving into itself or onto an ancestor: not this workload's subject
        flags = self.rng.choice([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE])
        s, d = self.model[src], self.model.get(dst)
        self.note(f"rename {src!r} -> {dst!r} flags {flags}")
        call = (self.p(src), self.p(dst), flags)
        if flags == RENAME_NOREPLACE and d is not None:
            self.expect_error(errno.EEXIST, renameat2, *call)
        elif flags == RENAME_EXCHANGE:
            if d is None:
                self.expect_error(errno.ENOENT, renameat2, *call)
                return
            renameat2(*call)
            a, b = self.remove_tree(src), self.remove_tree(dst)
            self.insert_tree(src, dst, a)
            self.insert_tree(dst, src, b)
        elif d is None:
            renameat2(*call)
            self.insert_tree(src, dst, self.remove_tree(src))
        elif s.kind != "dir" and d.kind == "dir":
            self.expect_error(errno.EISDIR, renameat2, *call)
        elif s.kind == "dir" and d.kind != "dir":
            self.expect_error(errno.ENOTDIR, renameat2, *call)
        elif s.kind == "dir" and self.children(dst):
            self.expect_error(errno.ENOTEMPTY, renameat2, *call)
        elif s is d:
            renameat2(*call)  # two names of one inode: rename does nothing
        else:
            renameat2(*call)
            del self.model[dst]
            self.insert_tree(src, dst, self.remove_tree(src))

    def op_link(self) -> None:
        src, dst = self.pick("file", "fifo", "symlink"), self.new_path()
        if src is None or related(src, dst):
            return
        self.note(f"link {src!r} -> {dst!r}")
        if dst in self.model:
            self.expect_error(
                errno.EEXIST, os.link, self.p(src), self.p(dst), follow_symlinks=False
            )
            return
        os.link(self.p(src), self.p(dst), follow_symlinks=False)
        self.model[dst] = self.model[src]

    def op_unlink(self) -> None:
        r = self.rng.random()
        if r < 0.05:
            path = self.new_path()
            if path not in self.model:
                self.note(f"unlink missing {path!r}")
                self.expect_error(errno.ENOENT, os.unlink, self.p(path))
            return
        if r < 0.1:
            path = self.pick("dir")
            if path is not None:
                self.note(f"unlink dir {path!r}")
                self.expect_error(errno.EISDIR, os.unlink, self.p(path))
            return
        path = self.pick("file", "symlink", "fifo")
        if path is None:
            return
        self.note(f"unlink {path!r}")
        os.unlink(self.p(path))
        del self.model[path]

    def op_symlink(self) -> None:
        path, target = self.new_path(), self.rng.choice(SYMLINK_TARGETS)
        self.note(f"symlink {path!r} -> {target!r}")
        if path in self.model:
            self.expect_error(errno.EEXIST, os.symlink, target, self.p(path))
            return
        os.symlink(target, self.p(path))
        self.model[path] = Node("symlink", target=target)

    def op_mkfifo(self) -> None:
        path = self.new_path()
        self.note(f"mkfifo {path!r}")
        if path in self.model:
            self.expect_error(errno.EEXIST, os.mkfifo, self.p(path), 0o640)
            return
        os.mkfifo(self.p(path), 0o640)
        self.model[path] = Node("fifo")

    def op_mkdir(self) -> None:
        path, mode = self.new_path(), self.rng.choice(DIR_MODES)
        self.note(f"mkdir {path!r} {mode:o}")
        if path in self.model:
            self.expect_error(errno.EEXIST, os.mkdir, self.p(path), mode)
            return
        os.mkdir(self.p(path), mode)
        self.model[path] = Node("dir")

    def op_rmdir(self) -> None:
        if self.rng.random() < 0.1:
            path = self.pick("file")
            if path is not None:
                self.note(f"rmdir file {path!r}")
                self.expect_error(errno.ENOTDIR, os.rmdir, self.p(path))
            return
        path = self.pick("dir")
        if path is None:
            return
        self.note(f"rmdir {path!r}")
        if self.children(path):
            self.expect_error(errno.ENOTEMPTY, os.rmdir, self.p(path))
            return
        os.rmdir(self.p(path))
        del self.model[path]

    def op_chmod(self) -> None:
        path = self.pick("file", "dir", "fifo")
        if path is None:
            return
        modes = DIR_MODES if self.model[path].kind == "dir" else FILE_MODES
        mode = self.rng.choice(modes)
        self.note(f"chmod {path!r} {mode:o}")
        os.chmod(self.p(path), mode)
        assert stat.S_IMODE(os.lstat(self.p(path)).st_mode) == mode

    def op_chown(self) -> None:
        path = self.pick()
        if path is None:
            return
        uid, gid = self.rng.choice(OWNERS)
        self.note(f"chown {path!r} {uid}:{gid}")
        os.chown(self.p(path), uid, gid, follow_symlinks=False)
        st = os.lstat(self.p(path))
        assert (st.st_uid, st.st_gid) == (uid, gid)

    def op_utime(self) -> None:
        path = self.pick()
        if path is None:
            return
        if self.rng.random() < 0.3:
            self.note(f"utime {path!r} now")
            os.utime(self.p(path), follow_symlinks=False)
            return
        atime = self.rng.randrange(0, 2_000_000_000) * 1_000_000_000 + self.rng.randrange(10**9)
        mtime = self.rng.randrange(0, 2_000_000_000) * 1_000_000_000 + self.rng.randrange(10**9)
        self.note(f"utime {path!r} {atime} {mtime}")
        os.utime(self.p(path), ns=(atime, mtime), follow_symlinks=False)
        assert os.lstat(self.p(path)).st_mtime_ns == mtime

    def op_setxattr(self) -> None:
        path = self.pick("file", "dir")
        if path is None:
            return
        node = self.model[path]
        name = self.rng.choice(XATTR_NAMES)
        value = self.rng.randbytes(self.rng.randrange(0, 300))
        flags = self.rng.choice([0, 0, os.XATTR_CREATE, os.XATTR_REPLACE])
        self.note(f"setxattr {path!r} {name} len {len(value)} flags {flags}")
        if flags == os.XATTR_CREATE and name in node.xattrs:
            self.expect_error(errno.EEXIST, os.setxattr, self.p(path), name, value, flags)
        elif flags == os.XATTR_REPLACE and name not in node.xattrs:
            self.expect_error(errno.ENODATA, os.setxattr, self.p(path), name, value, flags)
        else:
            os.setxattr(self.p(path), name, value, flags)
            node.xattrs[name] = value

    def op_removexattr(self) -> None:
        path = self.pick("file", "dir")
        if path is None:
            return
        node = self.model[path]
        name = self.rng.choice(XATTR_NAMES)
        self.note(f"removexattr {path!r} {name}")
        if name not in node.xattrs:
            self.expect_error(errno.ENODATA, os.removexattr, self.p(path), name)
            return
        os.removexattr(self.p(path), name)
        del node.xattrs[name]

    def op_fsync(self) -> None:
        if self.rng.random() < 0.3:
            path = self.rng.choice([".", *self.paths("dir")])
            self.note(f"fsync dir {path!r}")
            fd = os.open(self.p(path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        path = self.pick("file")
        if path is None:
            return
        datasync = self.rng.random() < 0.5
        self.note(f"{'fdatasync' if datasync else 'fsync'} {path!r}")
        fd = os.open(self.p(path), os.O_RDWR | (os.O_DSYNC if self.rng.random() < 0.3 else 0))
        try:
            data = self.randbytes(self.rng.randrange(1, 5000))
            offset = self.rng.randrange(0, len(self.model[path].data) + 1)
            write_all(fd, data, offset)
            model_write(self.model[path], offset, data)
            (os.fdatasync if datasync else os.fsync)(fd)
        finally:
            os.close(fd)

    def op_open_unlinked(self) -> None:
        path = self.pick("file")
        if path is None:
            return
        node = self.model[path]
        self.note(f"open, unlink {path!r}, write")
        fd = os.open(self.p(path), os.O_RDWR)
        os.unlink(self.p(path))
        del self.model[path]
        self.held.append((fd, node))
        self.held_io(fd, node)
        if len(self.held) > 4 or self.rng.random() < 0.4:
            self.close_held(0)

    def op_held(self) -> None:
        if not self.held:
            return
        index = self.rng.randrange(len(self.held))
        fd, node = self.held[index]
        if self.rng.random() < 0.3:
            self.note(f"close held fd {fd}")
            self.close_held(index)
        else:
            self.note(f"write held fd {fd}")
            self.held_io(fd, node)

    def held_io(self, fd: int, node: Node) -> None:
        if self.rng.random() < 0.2:
            size = self.rng.randrange(0, len(node.data) + 5000)
            os.ftruncate(fd, size)
            model_truncate(node, size)
        data = self.randbytes(self.rng.randrange(1, 20_000))
        offset = self.rng.randrange(0, len(node.data) + 10_000)
        write_all(fd, data, offset)
        model_write(node, offset, data)
        if self.rng.random() < 0.3:
            os.fsync(fd)
        assert os.pread(fd, len(node.data) + 10, 0) == bytes(node.data)

    def close_held(self, index: int) -> None:
        fd, _ = self.held.pop(index)
        os.close(fd)

    def op_read(self) -> None:
        path = self.pick("file")
        if path is None:
            return
        self.note(f"read {path!r}")
        with open(self.p(path), "rb") as f:
            assert f.read() == bytes(self.model[path].data), f"content of {path!r}"

    # -- final check ---------------------------------------------------------------------

    def check_tree(self) -> list[str]:
        """Differences between the model and the tree seen through the mount."""
        problems: list[str] = []
        seen: dict[str, os.stat_result] = {}
        for dirpath, dirnames, filenames, _ in os.fwalk(self.root):
            rel_dir = os.path.relpath(dirpath, self.root)
            for name in dirnames + filenames:
                rel = join(rel_dir, name)
                seen[rel] = os.lstat(self.p(rel))
        for rel in sorted(seen.keys() - self.model.keys()):
            problems.append(f"unexpected entry {rel!r}")
        for rel in sorted(self.model.keys() - seen.keys()):
            problems.append(f"missing entry {rel!r}")
        inodes: dict[int, set[int]] = {}
        for rel in sorted(seen.keys() & self.model.keys()):
            node, st = self.model[rel], seen[rel]
            kind = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}.get(
                stat.S_IFMT(st.st_mode), "fifo" if stat.S_ISFIFO(st.st_mode) else "other"
            )
            if kind != node.kind:
                problems.append(f"{rel!r}: kind {kind} != model {node.kind}")
                continue
            inodes.setdefault(id(node), set()).add(st.st_ino)
            if kind == "file":
                with open(self.p(rel), "rb") as f:
                    if f.read() != bytes(node.data):
                        problems.append(f"{rel!r}: content differs from the model")
            if kind == "symlink" and os.readlink(self.p(rel)) != node.target:
                problems.append(f"{rel!r}: symlink target differs from the model")
            if kind in ("file", "dir"):
                xattrs = {n: os.getxattr(self.p(rel), n) for n in os.listxattr(self.p(rel))}
                if xattrs != node.xattrs:
                    problems.append(f"{rel!r}: xattrs {xattrs} != model {node.xattrs}")
        for key, inos in inodes.items():
            if len(inos) != 1:
                problems.append(f"names of one model inode {key} have st_ino {inos}")
        return problems


def compare_manifests(m: Any) -> list[str]:
    seen = manifest.build_manifest(str(m.mountpoint))
    replica = manifest.build_manifest(str(m.replica_dir))
    backing = manifest.build_manifest(str(m.primary_dir))
    diffs = [f"replica vs mount: {d}" for d in manifest.compare(seen, replica)]
    diffs += [f"backing vs mount: {d}" for d in manifest.compare(backing, seen)]
    return diffs


def hafs_verify(m: Any, hafs_bin: Path, seed: int) -> None:
    result = subprocess.run(
        [str(hafs_bin), "fs", "verify", str(m.mountpoint), "--peer", m.peer, "--key", str(m.key)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"seed {seed}: hafs fs verify:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("seed", SEEDS)
def test_random_workload_is_replicated(mirror: Any, hafs_bin: Path, seed: int) -> None:
    work = Workload(mirror.mountpoint, seed)
    checkpoints: list[list[str]] = []

    def checkpoint() -> None:
        checkpoints.append(compare_manifests(mirror))

    started = time.monotonic()
    try:
        work.run(OPS, checkpoint)
    except (AssertionError, OSError) as e:
        last = "\n".join(work.log[-30:])
        pytest.fail(
            f"seed {seed}: {work.log[-1] if work.log else 'start'} failed: {e!r}\n"
            f"last ops:\n{last}\nmount log:\n{mirror.mount.log_tail()}"
        )
    elapsed = time.monotonic() - started
    status = mirror.mount.status()
    assert status["mode"] == "MIRROR", (
        f"seed {seed}: mount left MIRROR: {status}\n{mirror.mount.log_tail()}"
    )
    assert checkpoints and not checkpoints[0], (
        f"seed {seed}: halfway through, the trees differed:\n" + "\n".join(checkpoints[0])
    )
    problems = work.check_tree()
    assert not problems, f"seed {seed}: mount differs from the model:\n" + "\n".join(problems)
    diffs = compare_manifests(mirror)
    assert not diffs, f"seed {seed}: manifests differ:\n" + "\n".join(diffs)
    hafs_verify(mirror, hafs_bin, seed)
    # The workload must have exercised what it claims to (a weak seed would prove little).
    assert len(work.model) > 5 and len(work.counts) == len(work.ops), work.counts
    print(f"seed {seed}: {OPS} ops in {elapsed:.1f}s, {len(work.model)} entries, {work.counts}")


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_concurrent_workloads_are_replicated(mirror: Any, hafs_bin: Path, seed: int) -> None:
    """Threads working at once (each in its own subtree) keep the stream in change order."""
    works = []
    for t in range(4):
        (mirror.mountpoint / f"t{t}").mkdir()
        works.append(Workload(mirror.mountpoint / f"t{t}", seed * 100 + t))
    with ThreadPoolExecutor(len(works)) as pool:
        futures = [pool.submit(w.run, OPS // 3, lambda: None) for w in works]
    for t, (work, future) in enumerate(zip(works, futures, strict=True)):
        error = future.exception()
        if error is not None:
            last = "\n".join(work.log[-30:])
            pytest.fail(f"seed {seed} thread {t}: {error!r}\nlast ops:\n{last}")
    assert mirror.mount.status()["mode"] == "MIRROR", mirror.mount.log_tail()
    for t, work in enumerate(works):
        problems = work.check_tree()
        assert not problems, f"seed {seed} thread {t}: mount differs from the model:\n" + (
            "\n".join(problems)
        )
    diffs = compare_manifests(mirror)
    assert not diffs, f"seed {seed}: manifests differ:\n" + "\n".join(diffs)
    hafs_verify(mirror, hafs_bin, seed)
