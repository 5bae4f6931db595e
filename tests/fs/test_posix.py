"""POSIX behaviour through a replicating mount, one capability per test.

Each test does its operation through the mount (mirror.mountpoint), checks that the
application sees correct POSIX results, then checks that the replica holds exactly what the
primary holds (manifests of the mount, the backing directory and the replica agree).
"""

from __future__ import annotations

import errno
import mmap
import os
import pwd
import re
import socket
import stat
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from hafs import manifest
from hafs._libc import AT_FDCWD, RENAME_EXCHANGE, RENAME_NOREPLACE
from hafs._libc import renameat2 as _renameat2


def renameat2(old: Path, new: Path, flags: int) -> None:
    _renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)


def assert_replicated(m: Any) -> dict[str, manifest.Entry]:
    """The mount is still mirroring and mount, backing dir and replica are identical."""
    status = m.mount.status()
    assert status["mode"] == "MIRROR", f"mount left MIRROR: {status}\n{m.mount.log_tail()}"
    seen = manifest.build_manifest(str(m.mountpoint))
    backing = manifest.build_manifest(str(m.primary_dir))
    replica = manifest.build_manifest(str(m.replica_dir))
    diffs = manifest.compare(seen, replica)
    assert not diffs, "replica differs from the mount:\n" + "\n".join(diffs)
    diffs = manifest.compare(backing, seen)
    assert not diffs, "mount differs from its backing dir:\n" + "\n".join(diffs)
    return replica


def hafs_verify(m: Any, hafs_bin: Path) -> None:
    result = subprocess.run(
        [str(hafs_bin), "fs", "verify", str(m.mountpoint), "--peer", m.peer, "--key", str(m.key)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"hafs fs verify: {result.stdout}{result.stderr}"


def read(path: Path) -> bytes:
    return path.read_bytes()


def same_mtime(m: Any, rel: str) -> None:
    a = os.stat(m.mountpoint / rel, follow_symlinks=False).st_mtime_ns
    b = os.stat(m.replica_dir / rel, follow_symlinks=False).st_mtime_ns
    assert a == b, f"mtime of {rel!r}: mount {a} != replica {b}"


def run_as(user: str, fn: Callable[[], str]) -> str:
    """Run fn in a forked child with the uid/gid of USER; returns its result string."""
    pw = pwd.getpwnam(user)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
            os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
            os.write(w, fn().encode())
            code = 0
        except BaseException as e:
            os.write(w, f"child raised {e!r}".encode())
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    out = b"".join(chunks).decode()
    assert os.waitstatus_to_exitcode(status) == 0, out
    return out


# ------------------------------------------------------------------------------- files


def test_create_write_read(mirror: Any, hafs_bin: Path) -> None:
    path = mirror.mountpoint / "data.bin"
    payload = os.urandom(300_000)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o640)
    try:
        assert os.write(fd, payload) == len(payload)
    finally:
        os.close(fd)
    assert read(path) == payload
    st = os.stat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_size == len(payload)
    assert read(mirror.replica_dir / "data.bin") == payload
    assert_replicated(mirror)
    hafs_verify(mirror, hafs_bin)


def test_pwrite_offsets_and_sparse_file(mirror: Any) -> None:
    path = mirror.mountpoint / "sparse"
    far = 64 << 20
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        assert os.pwrite(fd, b"head", 0) == 4
        assert os.pwrite(fd, b"middle", 1 << 20) == 6
        assert os.pwrite(fd, b"tail", far) == 4
        assert os.pwrite(fd, b"HE", 1) == 2  # overwrite inside written data
        assert os.pread(fd, 8, 0) == b"hHEd\0\0\0\0"
        assert os.pread(fd, 4096, 8192) == bytes(4096)  # a hole reads zeros
        assert os.pread(fd, 6, 1 << 20) == b"middle"
        assert os.pread(fd, 100, far) == b"tail"
    finally:
        os.close(fd)
    for where in (mirror.mountpoint, mirror.replica_dir):
        st = os.stat(where / "sparse")
        assert st.st_size == far + 4
        assert st.st_blocks * 512 < 1 << 20, f"{where}: holes were filled in"
    with open(mirror.replica_dir / "sparse", "rb") as f:
        f.seek(far - 4096)
        assert f.read() == bytes(4096) + b"tail"
    assert_replicated(mirror)


def test_pwrite_past_4_gib(mirror: Any) -> None:
    """Offsets and sizes beyond 32 bits (checked directly: a manifest would read 5 GiB)."""
    path = mirror.mountpoint / "big"
    far = (5 << 30) + 12345
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        assert os.pwrite(fd, b"far", far) == 3
        assert os.pread(fd, 10, far - 2) == b"\0\0far"
        os.ftruncate(fd, far + 2)
    finally:
        os.close(fd)
    for where in (mirror.mountpoint, mirror.replica_dir):
        assert os.stat(where / "big").st_size == far + 2, where
        with open(where / "big", "rb") as f:
            f.seek(far - 2)
            assert f.read() == b"\0\0fa", where
            f.seek(far & 0xFFFFFFFF)  # where a 32-bit offset would have written
            assert f.read(3) == b"\0\0\0", where
    os.truncate(path, 4096)  # keep the manifests cheap
    assert_replicated(mirror)


def test_truncate_and_ftruncate(mirror: Any) -> None:
    path = mirror.mountpoint / "t"
    path.write_bytes(b"0123456789")
    os.truncate(path, 5000)  # grow by path
    assert read(path) == b"0123456789" + bytes(4990)
    assert_replicated(mirror)
    os.truncate(path, 3)  # shrink by path
    assert read(path) == b"012"
    assert_replicated(mirror)
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, 100_000)  # grow by fd
        assert os.fstat(fd).st_size == 100_000
        assert os.pread(fd, 10, 50_000) == bytes(10)
        assert_replicated(mirror)
        os.ftruncate(fd, 1)  # shrink by fd, then extend by writing past the end
        os.pwrite(fd, b"Z", 9)
        assert os.pread(fd, 100, 0) == b"0" + bytes(8) + b"Z"
    finally:
        os.close(fd)
    assert read(mirror.replica_dir / "t") == b"0" + bytes(8) + b"Z"
    assert_replicated(mirror)


def test_o_append_from_two_fds(mirror: Any) -> None:
    path = mirror.mountpoint / "log"
    path.write_bytes(b"start;")
    a = os.open(path, os.O_WRONLY | os.O_APPEND)
    b = os.open(path, os.O_WRONLY | os.O_APPEND)
    expected = b"start;"
    try:
        for i in range(20):
            fd, tag = (a, b"A") if i % 3 else (b, b"B")
            chunk = tag + str(i).encode() * (i + 1) + b";"
            os.lseek(fd, 0, os.SEEK_SET)  # O_APPEND ignores the file offset
            assert os.write(fd, chunk) == len(chunk)
            expected += chunk
    finally:
        os.close(a)
        os.close(b)
    assert read(path) == expected
    assert read(mirror.replica_dir / "log") == expected
    assert_replicated(mirror)


def test_o_append_from_concurrent_threads(mirror: Any) -> None:
    path = mirror.mountpoint / "log"
    path.write_bytes(b"")

    def appender(tag: int) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            for i in range(100):
                record = b"<%d:%d:" % (tag, i) + bytes([65 + tag]) * (i % 37) + b">"
                assert os.write(fd, record) == len(record)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(appender, range(4)))
    data = read(path)
    records = re.findall(rb"<(\d):(\d+):([A-D]*)>", data)
    assert sum(len(r[0]) + len(r[1]) + len(r[2]) + 4 for r in records) == len(data)
    assert sorted((int(t), int(i)) for t, i, _ in records) == [
        (t, i) for t in range(4) for i in range(100)
    ]
    for tag, i, body in records:
        assert body == bytes([65 + int(tag)]) * (int(i) % 37)
    assert read(mirror.replica_dir / "log") == data
    assert_replicated(mirror)


def test_mmap_writeback_through_an_append_handle(mirror: Any) -> None:
    """Pages written through a mapping go to their own offset, even when the mapping's fd
    was opened O_APPEND (the kernel writes them back through that handle)."""
    path = mirror.mountpoint / "f"
    path.write_bytes(bytes(8192))
    fd = os.open(path, os.O_RDWR | os.O_APPEND)
    try:
        with mmap.mmap(fd, 8192) as mm:
            mm[0:5] = b"hello"
            mm[4096:4100] = b"page"
            mm.flush()
        assert os.write(fd, b"tail") == 4
    finally:
        os.close(fd)
    expected = b"hello" + bytes(4091) + b"page" + bytes(4092) + b"tail"
    assert read(path) == expected
    assert read(mirror.replica_dir / "f") == expected
    assert_replicated(mirror)


def test_o_trunc_on_open_of_existing_file(mirror: Any) -> None:
    path = mirror.mountpoint / "f"
    path.write_bytes(b"x" * 10_000)
    assert_replicated(mirror)
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.write(fd, b"new")
    finally:
        os.close(fd)
    assert read(path) == b"new"
    assert read(mirror.replica_dir / "f") == b"new"
    assert_replicated(mirror)


def test_o_excl_on_existing_file_fails_with_eexist(mirror: Any) -> None:
    path = mirror.mountpoint / "f"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_TRUNC, 0o600)
    os.mkdir(mirror.mountpoint / "d")
    with pytest.raises(FileExistsError):
        os.open(mirror.mountpoint / "d", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    assert read(path) == b"keep me"
    assert_replicated(mirror)


def test_chmod_chown_utime(mirror: Any) -> None:
    f, d = mirror.mountpoint / "f", mirror.mountpoint / "d"
    f.write_bytes(b"data")
    d.mkdir()
    os.chmod(f, 0o4751)
    os.chmod(d, 0o2705)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o4751
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o2705
    assert_replicated(mirror)
    os.chown(f, 1234, 1234)
    os.chown(d, 4321, 4321)
    os.chown(d, 1234, -1)  # owner only
    os.chown(d, -1, 1234)  # group only
    for where in (mirror.mountpoint, mirror.replica_dir):
        st = os.stat(where / "f")
        assert (st.st_uid, st.st_gid) == (1234, 1234)
        assert not st.st_mode & stat.S_ISUID, "chown of a file must clear set-user-ID"
        assert (os.stat(where / "d").st_uid, os.stat(where / "d").st_gid) == (1234, 1234)
    assert_replicated(mirror)
    atime, mtime = 1_000_000_123_456_789, 1_100_000_987_654_321
    os.utime(f, ns=(atime, mtime))
    os.utime(d, ns=(atime + 1, mtime + 1))
    os.symlink("f", mirror.mountpoint / "ln")
    os.utime(mirror.mountpoint / "ln", ns=(atime + 2, mtime + 2), follow_symlinks=False)
    for where in (mirror.mountpoint, mirror.replica_dir):
        st = os.stat(where / "f")
        assert (st.st_atime_ns, st.st_mtime_ns) == (atime, mtime), where
        assert os.stat(where / "d").st_mtime_ns == mtime + 1, where
        assert os.lstat(where / "ln").st_mtime_ns == mtime + 2, where
        assert os.stat(where / "f").st_mtime_ns == mtime, "utime on a link followed it"
    assert_replicated(mirror)


def test_metadata_of_the_mount_root(mirror: Any) -> None:
    root = mirror.mountpoint
    (root / "f").write_bytes(b"x")
    os.chmod(root, 0o751)
    os.chown(root, 1234, 1234)
    os.setxattr(root, "user.root", b"r")
    os.utime(root, ns=(10, 20))
    os.utime(root / "f", ns=(-1_500_000_000, -1))  # before 1970
    for where in (root, mirror.replica_dir):
        st = os.stat(where)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime_ns) == (0o751, 1234, 20), where
        assert os.getxattr(where, "user.root") == b"r", where
        assert os.stat(where / "f").st_mtime_ns == -1, where
    assert_replicated(mirror)


def test_mkdir_rmdir_nested(mirror: Any) -> None:
    root = mirror.mountpoint
    os.makedirs(root / "a" / "b" / "c" / "d")
    (root / "a" / "b" / "file").write_bytes(b"x")
    assert sorted(os.listdir(root / "a" / "b")) == ["c", "file"]
    assert_replicated(mirror)
    with pytest.raises(OSError) as e:
        os.rmdir(root / "a" / "b")
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(FileExistsError):
        os.mkdir(root / "a" / "b")
    os.rmdir(root / "a" / "b" / "c" / "d")
    os.rmdir(root / "a" / "b" / "c")
    assert os.listdir(root / "a" / "b") == ["file"]
    assert_replicated(mirror)
    os.unlink(root / "a" / "b" / "file")
    os.removedirs(root / "a" / "b")
    assert os.listdir(root) == []
    assert os.listdir(mirror.replica_dir) == []
    assert_replicated(mirror)


def test_unlink(mirror: Any) -> None:
    path = mirror.mountpoint / "gone"
    path.write_bytes(b"x")
    (mirror.mountpoint / "stays").write_bytes(b"y")
    assert_replicated(mirror)
    os.unlink(path)
    assert not path.exists()
    with pytest.raises(FileNotFoundError):
        os.unlink(path)
    os.mkdir(mirror.mountpoint / "dir")
    with pytest.raises(IsADirectoryError):
        os.unlink(mirror.mountpoint / "dir")
    assert sorted(os.listdir(mirror.replica_dir)) == ["dir", "stays"]
    assert_replicated(mirror)


# ------------------------------------------------------------------------------- renames


def test_rename_over_existing_file(mirror: Any) -> None:
    src, dst = mirror.mountpoint / "new", mirror.mountpoint / "current"
    dst.write_bytes(b"old contents")
    src.write_bytes(b"new contents")
    fd = os.open(dst, os.O_RDONLY)  # an fd on the replaced file keeps its data
    try:
        os.rename(src, dst)
        assert os.pread(fd, 100, 0) == b"old contents"
    finally:
        os.close(fd)
    assert read(dst) == b"new contents"
    assert not src.exists()
    assert os.listdir(mirror.replica_dir) == ["current"]
    assert read(mirror.replica_dir / "current") == b"new contents"
    assert_replicated(mirror)


def test_rename_directory_then_write_through_fd_opened_before(mirror: Any) -> None:
    root = mirror.mountpoint
    os.makedirs(root / "db" / "sub")
    (root / "db" / "sub" / "t.ibd").write_bytes(b"0" * 100)
    (root / "db" / "other").write_bytes(b"o")
    fd = os.open(root / "db" / "sub" / "t.ibd", os.O_RDWR)
    try:
        os.mkdir(root / "archive")
        os.rename(root / "db", root / "archive" / "db2")
        os.pwrite(fd, b"written after rename", 10)
        os.fsync(fd)
        (root / "archive" / "db2" / "sub" / "more").write_bytes(b"m")
    finally:
        os.close(fd)
    expected = b"0" * 10 + b"written after rename" + b"0" * 70
    assert read(root / "archive" / "db2" / "sub" / "t.ibd") == expected
    assert not (root / "db").exists()
    assert read(mirror.replica_dir / "archive" / "db2" / "sub" / "t.ibd") == expected
    assert_replicated(mirror)


def test_renameat2_noreplace(mirror: Any) -> None:
    a, b, c = (mirror.mountpoint / n for n in ("a", "b", "c"))
    a.write_bytes(b"A")
    b.write_bytes(b"B")
    with pytest.raises(OSError) as e:
        renameat2(a, b, RENAME_NOREPLACE)
    assert e.value.errno == errno.EEXIST
    assert (read(a), read(b)) == (b"A", b"B")
    assert_replicated(mirror)
    renameat2(a, c, RENAME_NOREPLACE)
    assert not a.exists() and read(c) == b"A"
    assert sorted(os.listdir(mirror.replica_dir)) == ["b", "c"]
    assert_replicated(mirror)


def test_renameat2_exchange_two_files(mirror: Any) -> None:
    a, b = mirror.mountpoint / "a", mirror.mountpoint / "b"
    a.write_bytes(b"A")
    b.write_bytes(b"BB")
    os.chmod(a, 0o600)
    renameat2(a, b, RENAME_EXCHANGE)
    assert (read(a), read(b)) == (b"BB", b"A")
    assert stat.S_IMODE(os.stat(b).st_mode) == 0o600
    assert read(mirror.replica_dir / "a") == b"BB"
    assert read(mirror.replica_dir / "b") == b"A"
    assert_replicated(mirror)
    with pytest.raises(FileNotFoundError):
        renameat2(a, mirror.mountpoint / "missing", RENAME_EXCHANGE)
    assert_replicated(mirror)


def test_renameat2_exchange_file_and_directory(mirror: Any) -> None:
    root = mirror.mountpoint
    (root / "f").write_bytes(b"file")
    (root / "d").mkdir()
    (root / "d" / "child").write_bytes(b"child")
    (root / "sub").mkdir()
    renameat2(root / "f", root / "d", RENAME_EXCHANGE)
    assert read(root / "d") == b"file"
    assert read(root / "f" / "child") == b"child"
    assert_replicated(mirror)
    renameat2(root / "d", root / "sub" / "x", RENAME_NOREPLACE)
    renameat2(root / "sub" / "x", root / "f", RENAME_EXCHANGE)  # across directories
    assert read(root / "f") == b"file"
    assert read(root / "sub" / "x" / "child") == b"child"
    (root / "sub" / "x" / "child").write_bytes(b"rewritten")
    assert read(mirror.replica_dir / "sub" / "x" / "child") == b"rewritten"
    assert_replicated(mirror)


# ------------------------------------------------------------------------- links, specials


def test_hard_links(mirror: Any) -> None:
    root = mirror.mountpoint
    (root / "d").mkdir()
    (root / "one").write_bytes(b"first")
    os.link(root / "one", root / "d" / "two")
    assert os.stat(root / "one").st_nlink == 2
    assert os.stat(root / "one").st_ino == os.stat(root / "d" / "two").st_ino
    with open(root / "d" / "two", "r+b") as f:
        f.write(b"FIRST, via two")
    assert read(root / "one") == b"FIRST, via two"
    rep = mirror.replica_dir
    assert os.stat(rep / "one").st_ino == os.stat(rep / "d" / "two").st_ino
    replica = assert_replicated(mirror)
    assert replica["one"].link_group == replica["d/two"].link_group == "d/two"
    os.unlink(root / "one")
    assert os.stat(root / "d" / "two").st_nlink == 1
    assert read(root / "d" / "two") == b"FIRST, via two"
    assert os.stat(rep / "d" / "two").st_nlink == 1
    replica = assert_replicated(mirror)
    assert "one" not in replica and replica["d/two"].link_group == ""


def test_symlinks_are_stored_not_followed(mirror: Any, tmp_path: Path) -> None:
    root = mirror.mountpoint
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "target").write_bytes(b"t")
    os.symlink("target", root / "rel")
    os.symlink("no/such/file", root / "dangling")
    os.symlink(str(outside), root / "abs")
    os.symlink("/etc/passwd", root / "etc")
    assert os.readlink(root / "rel") == "target"
    assert read(root / "rel") == b"t"
    assert os.readlink(root / "dangling") == "no/such/file"
    assert not (root / "dangling").exists()
    assert os.readlink(root / "abs") == str(outside)
    for where in (root, mirror.replica_dir):
        assert os.path.islink(where / "abs")
        assert os.readlink(where / "abs") == str(outside)
        assert os.readlink(where / "etc") == "/etc/passwd"
        assert os.readlink(where / "dangling") == "no/such/file"
    assert os.listdir(outside) == []
    assert_replicated(mirror)
    # A hard link to a symlink outlives the name the symlink was created under.
    os.link(root / "rel", root / "rel2", follow_symlinks=False)
    os.unlink(root / "rel")
    os.utime(root / "rel2", ns=(7, 7_000_000_001), follow_symlinks=False)
    os.lchown(root / "rel2", 1234, 1234)
    for where in (root, mirror.replica_dir):
        st = os.lstat(where / "rel2")
        assert stat.S_ISLNK(st.st_mode) and st.st_mtime_ns == 7_000_000_001, where
        assert (st.st_uid, st.st_gid) == (1234, 1234), where
    assert_replicated(mirror)
    os.unlink(root / "abs")
    assert not os.path.lexists(mirror.replica_dir / "abs")
    assert outside.is_dir()
    assert_replicated(mirror)


def test_mkfifo(mirror: Any) -> None:
    os.mkfifo(mirror.mountpoint / "pipe", 0o620)
    os.mkfifo(mirror.mountpoint / "masked", 0o666)
    os.chmod(mirror.mountpoint / "pipe", 0o620)
    umask = os.umask(0)
    os.umask(umask)
    for where in (mirror.mountpoint, mirror.replica_dir):
        st = os.lstat(where / "pipe")
        assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o620, where
        st = os.lstat(where / "masked")
        assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o666 & ~umask, where
    assert_replicated(mirror)


def test_xattrs(mirror: Any) -> None:
    f, d = mirror.mountpoint / "f", mirror.mountpoint / "d"
    f.write_bytes(b"x")
    d.mkdir()
    os.setxattr(f, "user.one", b"1")
    os.setxattr(f, "user.bin", bytes(range(256)))
    os.setxattr(d, "user.dir", b"dir value")
    assert os.getxattr(f, "user.bin") == bytes(range(256))
    assert sorted(os.listxattr(f)) == ["user.bin", "user.one"]
    with pytest.raises(FileExistsError):
        os.setxattr(f, "user.one", b"2", os.XATTR_CREATE)
    with pytest.raises(OSError) as e:
        os.setxattr(f, "user.none", b"2", os.XATTR_REPLACE)
    assert e.value.errno == errno.ENODATA
    os.setxattr(f, "user.one", b"replaced", os.XATTR_REPLACE)
    assert os.getxattr(mirror.replica_dir / "f", "user.one") == b"replaced"
    assert os.getxattr(mirror.replica_dir / "d", "user.dir") == b"dir value"
    assert_replicated(mirror)
    os.removexattr(f, "user.bin")
    assert os.listxattr(f) == ["user.one"]
    with pytest.raises(OSError) as e:
        os.getxattr(f, "user.bin")
    assert e.value.errno == errno.ENODATA
    assert os.listxattr(mirror.replica_dir / "f") == ["user.one"]
    assert_replicated(mirror)


def test_unix_socket_bound_in_the_mount(mirror: Any) -> None:
    path = mirror.mountpoint / "mysqld.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))
            conn, _ = server.accept()
            with conn:
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"
        for where in (mirror.mountpoint, mirror.replica_dir):
            assert stat.S_ISSOCK(os.lstat(where / "mysqld.sock").st_mode), where
        assert_replicated(mirror)
    os.unlink(path)
    assert os.listdir(mirror.replica_dir) == []
    assert_replicated(mirror)


def test_statfs(mirror: Any) -> None:
    sv = os.statvfs(mirror.mountpoint)
    backing = os.statvfs(mirror.primary_dir)
    assert sv.f_bsize > 0 and sv.f_blocks > 0 and sv.f_namemax >= 255
    assert sv.f_blocks == backing.f_blocks and sv.f_frsize == backing.f_frsize
    assert sv.f_files == backing.f_files


# ------------------------------------------------------------------------ durability calls


def test_fsync_fdatasync_and_directory_fsync(mirror: Any) -> None:
    root = mirror.mountpoint
    (root / "d").mkdir()
    fd = os.open(root / "d" / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"a" * 5000)
        os.fsync(fd)
        os.pwrite(fd, b"b" * 5000, 5000)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    for d in (root / "d", root):
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    assert read(mirror.replica_dir / "d" / "f") == b"a" * 5000 + b"b" * 5000
    assert_replicated(mirror)


def test_fsync_after_large_and_small_writes(mirror: Any) -> None:
    """A sync after much writing runs on a worker thread, one after little on the event
    loop (and on the replica's stream thread): both leave the data on both nodes."""
    path = mirror.mountpoint / "big"
    big = os.urandom(1 << 20)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, big)
        os.fdatasync(fd)
        os.pwrite(fd, b"small", 10)
        os.fdatasync(fd)
        os.pwrite(fd, b"full", 20)
        os.fsync(fd)
    finally:
        os.close(fd)
    expected = big[:10] + b"small" + big[15:20] + b"full" + big[24:]
    assert read(path) == expected
    assert read(mirror.replica_dir / "big") == expected
    assert_replicated(mirror)


def test_file_kept_open_after_unlink(mirror: Any) -> None:
    root = mirror.mountpoint
    path = root / "tmpfile"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"before")
        os.unlink(path)
        assert not path.exists()
        assert os.fstat(fd).st_nlink == 0
        os.pwrite(fd, b"after unlink", 6)
        os.fsync(fd)
        os.ftruncate(fd, 10)
        assert os.pread(fd, 100, 0) == b"beforeafte"
        assert os.listdir(mirror.replica_dir) == []
        assert_replicated(mirror)
    finally:
        os.close(fd)
    (root / "next").write_bytes(b"n")  # the stream still works after the close
    assert os.listdir(mirror.replica_dir) == ["next"]
    assert_replicated(mirror)


def test_o_direct_aligned_write_and_read(mirror: Any) -> None:
    path = mirror.mountpoint / "direct"
    wbuf = mmap.mmap(-1, 4096)
    payload = bytes(range(256)) * 16
    wbuf.write(payload)
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
    try:
        assert os.pwrite(fd, wbuf, 0) == 4096
        assert os.pwrite(fd, wbuf, 8192) == 4096
        rbuf = mmap.mmap(-1, 4096)
        assert os.preadv(fd, [rbuf], 8192) == 4096
        assert bytes(rbuf) == payload
        assert os.preadv(fd, [rbuf], 4096) == 4096
        assert bytes(rbuf) == bytes(4096)
    finally:
        os.close(fd)
    expected = payload + bytes(4096) + payload
    assert read(path) == expected
    assert read(mirror.replica_dir / "direct") == expected
    assert_replicated(mirror)


def test_o_dsync_write(mirror: Any) -> None:
    path = mirror.mountpoint / "redo"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_DSYNC, 0o660)
    before = mirror.mount.status()
    try:
        for i in range(10):
            assert os.write(fd, bytes([i]) * 512) == 512
    finally:
        os.close(fd)
    after = mirror.mount.status()
    # Each O_DSYNC write must reach our fsync handler (which syncs both nodes): the
    # backing fd is opened without O_DSYNC, so this is the only durability there is.
    fsyncs = after["requests"].get("fsync", 0) - before["requests"].get("fsync", 0)
    assert fsyncs >= 10
    expected = b"".join(bytes([i]) * 512 for i in range(10))
    assert read(path) == expected
    assert read(mirror.replica_dir / "redo") == expected
    assert_replicated(mirror)


def test_mmap_shared_write(mirror: Any) -> None:
    path = mirror.mountpoint / "mapped"
    path.write_bytes(bytes(3 * 4096))
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 3 * 4096) as mm:
        mm[100:105] = b"hello"
        mm[8192:8195] = b"end"
        mm.flush()
    expected = bytearray(3 * 4096)
    expected[100:105] = b"hello"
    expected[8192:8195] = b"end"
    assert read(path) == expected
    assert read(mirror.replica_dir / "mapped") == expected
    assert_replicated(mirror)


def test_posix_fallocate_extends_with_zeros(mirror: Any) -> None:
    path = mirror.mountpoint / "ibdata1"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o660)
    try:
        os.write(fd, b"header")
        os.posix_fallocate(fd, 0, 1 << 20)
        assert os.fstat(fd).st_size == 1 << 20
        assert os.pread(fd, 10, 0) == b"header\0\0\0\0"
        assert os.pread(fd, 4096, (1 << 20) - 4096) == bytes(4096)
    finally:
        os.close(fd)
    assert os.stat(mirror.replica_dir / "ibdata1").st_size == 1 << 20
    assert_replicated(mirror)


# ----------------------------------------------------------------------- metadata, access


def test_setgid_directory_inheritance(mirror: Any) -> None:
    root = mirror.mountpoint
    shared = root / "shared"
    shared.mkdir()
    os.chown(shared, 0, 1234)
    os.chmod(shared, 0o2775)
    (shared / "f").write_bytes(b"x")
    (shared / "sub").mkdir(mode=0o755)
    for where in (root, mirror.replica_dir):
        assert os.stat(where / "shared" / "f").st_gid == 1234, where
        st = os.stat(where / "shared" / "sub")
        assert st.st_gid == 1234 and st.st_mode & stat.S_ISGID, where
    assert_replicated(mirror)


def test_forgotten_inodes_are_found_again(mirror: Any) -> None:
    """After the kernel forgets inodes (memory pressure), ops on them still replicate."""
    root = mirror.mountpoint
    (root / "d" / "e").mkdir(parents=True)
    for i in range(50):
        (root / "d" / "e" / f"f{i}").write_bytes(b"%d" % i)
    os.link(root / "d" / "e" / "f0", root / "d" / "hard")
    os.symlink("e/f1", root / "d" / "sym")
    held = os.open(root / "d" / "e" / "f2", os.O_RDWR)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("2\n")
        os.pwrite(held, b"still", 0)
        for i in range(3, 50, 7):
            (root / "d" / "e" / f"f{i}").write_bytes(b"rewritten")
        os.utime(root / "d" / "sym", ns=(5, 5), follow_symlinks=False)
        os.rename(root / "d" / "e", root / "d" / "e2")
        os.unlink(root / "d" / "e2" / "f0")
        with open(root / "d" / "hard", "ab") as f:
            f.write(b"+hard")
        os.setxattr(root / "d" / "e2" / "f4", "user.k", b"v")
        Path("/proc/sys/vm/drop_caches").write_text("2\n")
        os.chmod(root / "d" / "e2" / "f5", 0o600)
        os.truncate(root / "d" / "e2" / "f6", 1)
    finally:
        os.close(held)
    assert read(root / "d" / "hard") == b"0+hard"
    assert read(mirror.replica_dir / "d" / "e2" / "f2") == b"still"
    assert_replicated(mirror)


def test_parent_directory_mtimes_follow_creates_and_unlinks(mirror: Any) -> None:
    root = mirror.mountpoint
    os.makedirs(root / "a" / "b")
    old = 1_500_000_000_000_000_000
    for rel in ("a/b", "a", "."):
        os.utime(root / rel, ns=(old, old))
    (root / "a" / "b" / "f").write_bytes(b"x")
    assert os.stat(root / "a" / "b").st_mtime_ns != old
    assert os.stat(root / "a").st_mtime_ns == old
    for rel in ("a/b", "a", ".", "a/b/f"):
        same_mtime(mirror, rel)
    assert_replicated(mirror)
    os.utime(root / "a" / "b", ns=(old, old))
    os.unlink(root / "a" / "b" / "f")
    os.symlink("x", root / "a" / "s")
    os.mkfifo(root / "a" / "p")
    os.link(root / "a" / "p", root / "a" / "b" / "p2")
    assert os.stat(root / "a" / "b").st_mtime_ns != old
    for rel in ("a/b", "a", "."):
        same_mtime(mirror, rel)
    assert_replicated(mirror)
    for rel in ("a/b", "a", "."):
        os.utime(root / rel, ns=(old, old))
    os.rename(root / "a" / "s", root / "a" / "b" / "s")
    os.mkdir(root / "a" / "b" / "new")
    os.rmdir(root / "a" / "b" / "new")
    os.mkdir(root / "n")
    for rel in ("a/b", "a", "."):
        assert os.stat(root / rel).st_mtime_ns != old, rel
        same_mtime(mirror, rel)
    assert_replicated(mirror)


def test_mysql_owned_file_access(mirror: Any) -> None:
    root = mirror.mountpoint
    mysql = pwd.getpwnam("mysql")
    datadir = root / "datadir"
    datadir.mkdir(mode=0o750)
    os.chown(datadir, mysql.pw_uid, mysql.pw_gid)
    (datadir / "ibdata1").write_bytes(b"root wrote this")
    os.chown(datadir / "ibdata1", mysql.pw_uid, mysql.pw_gid)
    os.chmod(datadir / "ibdata1", 0o600)
    os.chmod(datadir, 0o700)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:

        def as_mysql() -> str:
            fd = os.open("datadir/ibdata1", os.O_RDWR, dir_fd=root_fd)
            os.pwrite(fd, b"MYSQL", 0)
            data = os.pread(fd, 100, 0)
            os.close(fd)
            os.umask(0o027)
            new = os.open("datadir/new.frm", os.O_CREAT | os.O_WRONLY, 0o660, dir_fd=root_fd)
            os.write(new, b"frm")
            os.close(new)
            return data.decode()

        def as_nobody() -> str:
            results = []
            for path in ("datadir/ibdata1", "datadir"):
                try:
                    os.close(os.open(path, os.O_RDONLY, dir_fd=root_fd))
                    results.append("opened")
                except PermissionError as e:
                    results.append(errno.errorcode[e.errno])
            return ",".join(results)

        assert run_as("mysql", as_mysql) == "MYSQLwrote this"
        assert run_as("nobody", as_nobody) == "EACCES,EACCES"
    finally:
        os.close(root_fd)
    for where in (root, mirror.replica_dir):
        st = os.stat(where / "datadir" / "new.frm")
        assert (st.st_uid, st.st_gid) == (mysql.pw_uid, mysql.pw_gid), where
        assert stat.S_IMODE(st.st_mode) == 0o640, where
    assert read(mirror.replica_dir / "datadir" / "ibdata1") == b"MYSQLwrote this"
    replica = assert_replicated(mirror)
    assert replica["datadir/ibdata1"].uid == mysql.pw_uid
    assert replica["datadir/ibdata1"].mode == 0o600


def test_unprivileged_write_clears_set_id_bits_and_chown_is_refused(mirror: Any) -> None:
    root = mirror.mountpoint
    mysql = pwd.getpwnam("mysql")
    for name, mode in (("f", 0o6775), ("g", 0o4755)):
        (root / name).write_bytes(b"x")
        os.chown(root / name, mysql.pw_uid, mysql.pw_gid)
        os.chmod(root / name, mode)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:

        def as_mysql() -> str:
            fd = os.open("f", os.O_WRONLY, dir_fd=root_fd)
            os.write(fd, b"y")
            os.close(fd)
            fd = os.open("g", os.O_WRONLY, dir_fd=root_fd)
            os.ftruncate(fd, 0)
            os.close(fd)
            try:
                os.chown("g", 0, 0, dir_fd=root_fd)
            except PermissionError as e:
                return errno.errorcode[e.errno]
            return "chowned"

        assert run_as("mysql", as_mysql) == "EPERM"
    finally:
        os.close(root_fd)
    for where in (root, mirror.replica_dir):
        assert stat.S_IMODE(os.stat(where / "f").st_mode) == 0o775, where
        assert stat.S_IMODE(os.stat(where / "g").st_mode) == 0o755, where
        assert os.stat(where / "g").st_uid == mysql.pw_uid, where
    assert_replicated(mirror)


def test_directory_listing_is_complete(mirror: Any, hafs_bin: Path) -> None:
    big = mirror.mountpoint / "big"
    big.mkdir()
    names = {f"file-{i:05d}-{'x' * (i % 50)}" for i in range(2000)}
    for name in names:
        os.close(os.open(big / name, os.O_CREAT | os.O_WRONLY, 0o644))
    listed = os.listdir(big)
    assert len(listed) == len(names) and set(listed) == names
    with os.scandir(big) as it:
        assert {e.name for e in it if e.is_file(follow_symlinks=False)} == names
    assert set(os.listdir(mirror.replica_dir / "big")) == names
    small = mirror.mountpoint / "small"
    small.mkdir()
    assert os.listdir(small) == []
    for name in ("a", "b", "c"):
        (small / name).mkdir()
    os.rmdir(small / "b")
    assert sorted(os.listdir(small)) == ["a", "c"]
    assert_replicated(mirror)
    hafs_verify(mirror, hafs_bin)
