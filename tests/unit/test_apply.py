"""Unit tests of hafs.apply: ops applied to a real directory, and confinement to it (I4)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hafs import _libc
from hafs.apply import Applier
from hafs.ops import ROOT_INO, FileTimes, Op, OpFrame, decode, encode
from hafs.protocol import ProtocolError

REG = stat.S_IFREG
DIR = stat.S_IFDIR


def _wire(frame: OpFrame) -> OpFrame:
    """What the replica really applies: the frame after encoding and decoding."""
    return decode(memoryview(b"".join(encode(frame))))


class Replica:
    """An Applier over ROOT plus short helpers to send it ops."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.applier = Applier(self.root_fd)

    def close(self) -> None:
        self.applier.close()
        os.close(self.root_fd)

    def op(
        self,
        op: Op,
        *ints: int,
        blobs: tuple[bytes, ...] = (),
        times: tuple[FileTimes, ...] = (),
    ) -> None:
        self.applier.apply(_wire(OpFrame(op, ints, blobs, times)))

    def create(self, parent: int, ino: int, name: bytes, mode: int = 0o644) -> None:
        self.op(Op.CREATE, parent, ino, REG | mode, 0, 0, blobs=(name,))

    def mkdir(self, parent: int, ino: int, name: bytes, mode: int = 0o755) -> None:
        self.op(Op.MKDIR, parent, ino, DIR | mode, 0, 0, blobs=(name,))

    def write(self, ino: int, offset: int, data: bytes) -> None:
        self.op(Op.WRITE, ino, offset, blobs=(data,))

    def bind(self, ino: int, parent: int, name: bytes) -> None:
        self.op(Op.BIND, ino, parent, blobs=(name,))


def snapshot(path: Path) -> dict[str, tuple[int, int, int, int, bytes]]:
    """Everything observable about a tree (symlinks not followed)."""
    out: dict[str, tuple[int, int, int, int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames, "."]:
            p = Path(dirpath) / name
            st_ = p.lstat()
            if stat.S_ISREG(st_.st_mode):
                content = p.read_bytes()
            elif stat.S_ISLNK(st_.st_mode):
                content = os.readlink(p).encode()
            else:
                content = b""
            key = str(p.relative_to(path))
            out[key] = (st_.st_mode, st_.st_uid, st_.st_nlink, st_.st_mtime_ns, content)
    return out


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the root that no op may touch."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret").write_bytes(b"secret")
    (path / "sub").mkdir()
    return path


@pytest.fixture
def rep(root: Path) -> Iterator[Replica]:
    r = Replica(root)
    yield r
    r.close()


# -- applying ops correctly ---------------------------------------------------------------


def test_create_write_truncate(rep: Replica, root: Path) -> None:
    rep.op(Op.CREATE, ROOT_INO, 2, REG | 0o640, 1234, 5678, blobs=(b"f",))
    st_ = (root / "f").stat()
    assert stat.S_ISREG(st_.st_mode) and stat.S_IMODE(st_.st_mode) == 0o640
    assert (st_.st_uid, st_.st_gid) == (1234, 5678)
    rep.write(2, 0, b"hello world")
    rep.write(2, 6, b"WORLD")
    assert (root / "f").read_bytes() == b"hello WORLD"
    rep.write(2, 20, b"!")
    assert (root / "f").read_bytes() == b"hello WORLD" + bytes(9) + b"!"
    rep.op(Op.TRUNCATE, 2, 5)
    assert (root / "f").read_bytes() == b"hello"
    rep.op(Op.TRUNCATE, 2, 0)
    assert (root / "f").read_bytes() == b""


def test_create_existing_name_fails(rep: Replica, root: Path) -> None:
    (root / "f").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        rep.create(ROOT_INO, 2, b"f")
    assert (root / "f").read_bytes() == b"keep"


def test_mkdir_and_nested_entries(rep: Replica, root: Path) -> None:
    rep.op(Op.MKDIR, ROOT_INO, 2, DIR | 0o751, 42, 43, blobs=(b"d",))
    st_ = (root / "d").stat()
    assert stat.S_ISDIR(st_.st_mode) and stat.S_IMODE(st_.st_mode) == 0o751
    assert (st_.st_uid, st_.st_gid) == (42, 43)
    rep.mkdir(2, 3, b"e")
    rep.create(3, 4, b"f")
    rep.write(4, 0, b"deep")
    assert (root / "d" / "e" / "f").read_bytes() == b"deep"


def test_bind_existing_and_forget(rep: Replica, root: Path) -> None:
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(b"old")
    rep.bind(2, ROOT_INO, b"d")
    rep.bind(3, 2, b"f")
    rep.write(3, 0, b"new")
    assert (root / "d" / "f").read_bytes() == b"new"
    rep.op(Op.FORGET, 3)
    with pytest.raises(ProtocolError, match="not bound"):
        rep.write(3, 0, b"x")
    with pytest.raises(FileNotFoundError):
        rep.bind(4, ROOT_INO, b"missing")
    rep.op(Op.FORGET, ROOT_INO)  # ignored: the root stays bound
    rep.create(ROOT_INO, 5, b"still")
    assert (root / "still").exists()


def test_rebind_same_ino(rep: Replica, root: Path) -> None:
    (root / "a").write_bytes(b"a")
    (root / "b").write_bytes(b"b")
    rep.bind(2, ROOT_INO, b"a")
    rep.bind(2, ROOT_INO, b"b")
    rep.write(2, 0, b"B")
    assert (root / "a").read_bytes() == b"a"
    assert (root / "b").read_bytes() == b"B"


def test_unbound_inode_refused(rep: Replica, root: Path) -> None:
    with pytest.raises(ProtocolError):
        rep.create(99, 2, b"f")
    with pytest.raises(ProtocolError):
        rep.write(99, 0, b"x")
    assert list(root.iterdir()) == []


def test_rename_plain_noreplace_exchange(rep: Replica, root: Path) -> None:
    rep.mkdir(ROOT_INO, 2, b"d")
    rep.create(ROOT_INO, 3, b"a")
    rep.write(3, 0, b"A")
    rep.create(ROOT_INO, 4, b"b")
    rep.write(4, 0, b"B")
    rep.op(Op.RENAME, ROOT_INO, 2, 0, blobs=(b"a", b"moved"))
    assert not (root / "a").exists()
    assert (root / "d" / "moved").read_bytes() == b"A"
    rep.write(3, 1, b"!")  # the moved file stays bound under its inode
    assert (root / "d" / "moved").read_bytes() == b"A!"
    rep.op(Op.RENAME, 2, ROOT_INO, _libc.RENAME_EXCHANGE, blobs=(b"moved", b"b"))
    assert (root / "b").read_bytes() == b"A!"
    assert (root / "d" / "moved").read_bytes() == b"B"
    with pytest.raises(FileExistsError):
        rep.op(Op.RENAME, ROOT_INO, 2, _libc.RENAME_NOREPLACE, blobs=(b"b", b"moved"))
    rep.op(Op.RENAME, ROOT_INO, 2, 0, blobs=(b"b", b"moved"))  # replaces
    assert (root / "d" / "moved").read_bytes() == b"A!"
    assert sorted(p.name for p in root.iterdir()) == ["d"]


def test_rename_symlink_keeps_times_working(rep: Replica, root: Path) -> None:
    rep.op(Op.SYMLINK, ROOT_INO, 2, 0, 0, blobs=(b"l", b"target"))
    rep.mkdir(ROOT_INO, 3, b"d")
    rep.op(Op.RENAME, ROOT_INO, 3, 0, blobs=(b"l", b"l2"))
    rep.op(Op.TIMES, times=(FileTimes(2, 10**18, 2 * 10**18),))
    assert (root / "d" / "l2").lstat().st_mtime_ns == 2 * 10**18


@pytest.mark.parametrize("flags", [4, 8, 1 << 31, 1 << 40, -1, 7])
def test_rename_unknown_flags_refused(rep: Replica, root: Path, flags: int) -> None:
    rep.create(ROOT_INO, 2, b"a")
    with pytest.raises(ProtocolError, match="flags"):
        rep.op(Op.RENAME, ROOT_INO, ROOT_INO, flags, blobs=(b"a", b"b"))
    assert sorted(p.name for p in root.iterdir()) == ["a"]


def test_link(rep: Replica, root: Path) -> None:
    rep.create(ROOT_INO, 2, b"f")
    rep.write(2, 0, b"data")
    rep.mkdir(ROOT_INO, 3, b"d")
    rep.op(Op.LINK, 2, 3, blobs=(b"hard",))
    assert (root / "d" / "hard").stat().st_ino == (root / "f").stat().st_ino
    assert (root / "f").stat().st_nlink == 2
    with pytest.raises(ProtocolError, match="directory"):
        rep.op(Op.LINK, 3, ROOT_INO, blobs=(b"dirlink",))
    assert not (root / "dirlink").exists()


def test_symlink_target_stored_not_resolved(rep: Replica, root: Path, outside: Path) -> None:
    target = str(outside / "secret").encode()
    rep.op(Op.SYMLINK, ROOT_INO, 2, 77, 88, blobs=(b"abs", target))
    rep.op(Op.SYMLINK, ROOT_INO, 3, 0, 0, blobs=(b"rel", b"../outside/nothing"))
    assert os.readlink(root / "abs") == str(outside / "secret")
    assert os.readlink(root / "rel") == "../outside/nothing"
    st_ = (root / "abs").lstat()
    assert (st_.st_uid, st_.st_gid) == (77, 88)
    assert (outside / "secret").stat().st_uid == 0  # the target's owner untouched
    assert not (outside / "nothing").exists()


def test_unlink_and_rmdir(rep: Replica, root: Path) -> None:
    rep.create(ROOT_INO, 2, b"f")
    rep.mkdir(ROOT_INO, 3, b"d")
    rep.op(Op.SYMLINK, ROOT_INO, 4, 0, 0, blobs=(b"l", b"f"))
    rep.op(Op.UNLINK, ROOT_INO, blobs=(b"f",))
    rep.op(Op.UNLINK, ROOT_INO, blobs=(b"l",))
    with pytest.raises(IsADirectoryError):
        rep.op(Op.UNLINK, ROOT_INO, blobs=(b"d",))
    rep.op(Op.RMDIR, ROOT_INO, blobs=(b"d",))
    assert list(root.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        rep.op(Op.UNLINK, ROOT_INO, blobs=(b"f",))


def test_open_unlinked_file_still_written(rep: Replica, root: Path) -> None:
    rep.create(ROOT_INO, 2, b"f")
    rep.op(Op.LINK, 2, ROOT_INO, blobs=(b"g",))
    rep.op(Op.UNLINK, ROOT_INO, blobs=(b"f",))
    rep.write(2, 0, b"via ino")
    assert (root / "g").read_bytes() == b"via ino"


def test_chmod_chown(rep: Replica, root: Path) -> None:
    rep.create(ROOT_INO, 2, b"f")
    rep.mkdir(ROOT_INO, 3, b"d")
    # chown before chmod: as on any Linux file system, chown clears the setuid bit.
    rep.op(Op.CHOWN, 2, 1000, 1001)
    rep.op(Op.CHOWN, 3, 2000, 2001)
    rep.op(Op.CHMOD, 2, REG | 0o4711)
    rep.op(Op.CHMOD, 3, 0o700)
    st_f, st_d = (root / "f").stat(), (root / "d").stat()
    assert stat.S_IMODE(st_f.st_mode) == 0o4711
    assert stat.S_IMODE(st_d.st_mode) == 0o700
    assert (st_f.st_uid, st_f.st_gid, st_d.st_uid, st_d.st_gid) == (1000, 1001, 2000, 2001)


OWNER_OPS: dict[str, Callable[[Replica, int, int], None]] = {
    "CREATE": lambda r, u, g: r.op(Op.CREATE, ROOT_INO, 9, REG | 0o644, u, g, blobs=(b"n",)),
    "MKDIR": lambda r, u, g: r.op(Op.MKDIR, ROOT_INO, 9, DIR | 0o755, u, g, blobs=(b"n",)),
    "MKNOD": lambda r, u, g: r.op(
        Op.MKNOD, ROOT_INO, 9, stat.S_IFIFO | 0o644, u, g, 0, blobs=(b"n",)
    ),
    "SYMLINK": lambda r, u, g: r.op(Op.SYMLINK, ROOT_INO, 9, u, g, blobs=(b"n", b"t")),
    "CHOWN": lambda r, u, g: r.op(Op.CHOWN, 2, u, g),
}


@pytest.mark.parametrize("opname", list(OWNER_OPS))
@pytest.mark.parametrize("ids", [(2**32, 0), (0, 2**32 + 5), (2**40, 2**40), (-2, 0)])
def test_owner_out_of_range_refused_not_wrapped(
    rep: Replica, root: Path, opname: str, ids: tuple[int, int]
) -> None:
    """A uid/gid no system call can take is malformed: refused, never wrapped to 0 or 5."""
    rep.create(ROOT_INO, 2, b"f")
    with pytest.raises(ProtocolError):
        OWNER_OPS[opname](rep, *ids)
    for p in root.iterdir():
        st_ = p.lstat()
        assert (st_.st_uid, st_.st_gid) == (0, 0), p


def test_xattrs(rep: Replica, root: Path) -> None:
    rep.create(ROOT_INO, 2, b"f")
    try:
        rep.op(Op.SETXATTR, 2, 0, blobs=(b"user.k", b"v1"))
    except OSError as e:
        if e.errno == errno.ENOTSUP:
            pytest.skip("no user xattrs here")
        raise
    assert os.getxattr(root / "f", "user.k") == b"v1"
    with pytest.raises(FileExistsError):
        rep.op(Op.SETXATTR, 2, os.XATTR_CREATE, blobs=(b"user.k", b"v2"))
    rep.op(Op.SETXATTR, 2, os.XATTR_REPLACE, blobs=(b"user.k", b"v3"))
    assert os.getxattr(root / "f", "user.k") == b"v3"
    rep.op(Op.REMOVEXATTR, 2, blobs=(b"user.k",))
    assert "user.k" not in os.listxattr(root / "f")


def test_mknod_fifo_and_socket(rep: Replica, root: Path) -> None:
    rep.op(Op.MKNOD, ROOT_INO, 2, stat.S_IFIFO | 0o640, 5, 6, 0, blobs=(b"fifo",))
    rep.op(Op.MKNOD, ROOT_INO, 3, stat.S_IFSOCK | 0o600, 0, 0, 0, blobs=(b"sock",))
    st_ = (root / "fifo").lstat()
    assert stat.S_ISFIFO(st_.st_mode) and stat.S_IMODE(st_.st_mode) == 0o640
    assert (st_.st_uid, st_.st_gid) == (5, 6)
    assert stat.S_ISSOCK((root / "sock").lstat().st_mode)
    with pytest.raises(ProtocolError):  # a FIFO is not written as a file
        rep.write(2, 0, b"x")


@pytest.mark.parametrize(
    "mode", [stat.S_IFCHR | 0o666, stat.S_IFBLK | 0o660, stat.S_IFDIR | 0o755, 0o644]
)
def test_mknod_device_refused(rep: Replica, root: Path, mode: int) -> None:
    rdev = os.makedev(1, 3)  # /dev/null
    with pytest.raises(ProtocolError, match="mknod"):
        rep.op(Op.MKNOD, ROOT_INO, 2, mode, 0, 0, rdev, blobs=(b"dev",))
    assert list(root.iterdir()) == []


def test_times_trailer(rep: Replica, root: Path) -> None:
    rep.create(ROOT_INO, 2, b"f")
    rep.mkdir(ROOT_INO, 3, b"d")
    rep.op(Op.SYMLINK, ROOT_INO, 4, 0, 0, blobs=(b"l", b"f"))
    times = (FileTimes(2, 1_000_000_001, 2_000_000_002), FileTimes(3, 3 * 10**9, 4 * 10**9))
    rep.write(2, 0, b"x")
    rep.op(Op.TIMES, times=(*times, FileTimes(4, 5 * 10**9, 6 * 10**9)))
    f, d, link = (root / "f").stat(), (root / "d").stat(), (root / "l").lstat()
    assert (f.st_atime_ns, f.st_mtime_ns) == (1_000_000_001, 2_000_000_002)
    assert (d.st_atime_ns, d.st_mtime_ns) == (3 * 10**9, 4 * 10**9)
    assert link.st_mtime_ns == 6 * 10**9
    # A trailer on a WRITE applies after the data, so the write does not bump mtime again.
    rep.write(
        2,
        1,
        b"y",
    )
    rep.op(Op.WRITE, 2, 2, blobs=(b"z",), times=(FileTimes(2, 7, 8),))
    assert (root / "f").stat().st_mtime_ns == 8


def test_fsync_target(rep: Replica, root: Path) -> None:
    rep.create(ROOT_INO, 2, b"f")
    rep.mkdir(ROOT_INO, 3, b"d")
    for ino in (2, 3):
        fd = rep.applier.fsync_target(ino)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@pytest.mark.parametrize("kind", ["fifo", "chardev"])
def test_fsync_target_never_opens_special_files(rep: Replica, root: Path, kind: str) -> None:
    """Opening a FIFO blocks until a writer comes (hanging the stream for good), and opening
    a device planted in the tree acts on the device: FSYNC on either is refused."""
    path = root / kind
    if kind == "fifo":
        os.mkfifo(path)
    else:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # like /dev/null
    rep.bind(2, ROOT_INO, kind.encode())
    result: list[object] = []

    def target() -> None:
        try:
            os.close(rep.applier.fsync_target(2))
            result.append("opened")
        except Exception as e:
            result.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():  # unblock the thread stuck in open() before failing
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        pytest.fail("FSYNC on a FIFO blocked in open()")
    assert len(result) == 1 and isinstance(result[0], ProtocolError), result


def test_write_to_directory_refused(rep: Replica, root: Path) -> None:
    rep.mkdir(ROOT_INO, 2, b"d")
    with pytest.raises(ProtocolError):
        rep.write(2, 0, b"x")
    with pytest.raises(ProtocolError):
        rep.write(ROOT_INO, 0, b"x")


# -- confinement (I4) ----------------------------------------------------------------------


@pytest.fixture
def guard(tmp_path: Path, outside: Path) -> Iterator[Callable[[], None]]:
    """Checks that nothing outside the root changed (the outside dir and the root's parent)."""
    before_outside = snapshot(outside)
    before_parent = sorted(p.name for p in tmp_path.iterdir())

    def check() -> None:
        assert snapshot(outside) == before_outside
        assert sorted(p.name for p in tmp_path.iterdir()) == before_parent

    yield check
    check()


def _bad_names(outside: Path) -> list[bytes]:
    return [
        b"../x",
        b"..",
        b".",
        b"",
        b"/etc/x",
        str(outside / "x").encode(),
        b"a/b",
        b"sub/../../x",
        b"x\0y",
        b"x" * 256,
    ]


BAD_NAME_OPS: dict[str, Callable[[Replica, bytes], None]] = {
    "BIND": lambda r, n: r.bind(9, ROOT_INO, n),
    "CREATE": lambda r, n: r.create(ROOT_INO, 9, n),
    "MKDIR": lambda r, n: r.mkdir(ROOT_INO, 9, n),
    "MKNOD": lambda r, n: r.op(Op.MKNOD, ROOT_INO, 9, stat.S_IFIFO | 0o644, 0, 0, 0, blobs=(n,)),
    "SYMLINK": lambda r, n: r.op(Op.SYMLINK, ROOT_INO, 9, 0, 0, blobs=(n, b"t")),
    "LINK": lambda r, n: r.op(Op.LINK, 2, ROOT_INO, blobs=(n,)),
    "UNLINK": lambda r, n: r.op(Op.UNLINK, ROOT_INO, blobs=(n,)),
    "RMDIR": lambda r, n: r.op(Op.RMDIR, ROOT_INO, blobs=(n,)),
    "RENAME_FROM": lambda r, n: r.op(Op.RENAME, ROOT_INO, ROOT_INO, 0, blobs=(n, b"y")),
    "RENAME_TO": lambda r, n: r.op(Op.RENAME, ROOT_INO, ROOT_INO, 0, blobs=(b"f", n)),
}


@pytest.mark.parametrize("opname", list(BAD_NAME_OPS))
def test_bad_names_refused(
    rep: Replica, root: Path, outside: Path, guard: Callable[[], None], opname: str
) -> None:
    rep.create(ROOT_INO, 2, b"f")
    (root / "sub").mkdir()
    before = snapshot(root)
    for name in _bad_names(outside):
        with pytest.raises(ProtocolError, match="refused entry name"):
            BAD_NAME_OPS[opname](rep, name)
        guard()
        assert snapshot(root) == before, name


def test_absolute_and_dotdot_create_makes_nothing(
    rep: Replica, tmp_path: Path, outside: Path, guard: Callable[[], None]
) -> None:
    for name in (b"../escape", str(outside / "abs").encode(), b"/tmp/abs-hafs-test"):
        with pytest.raises(ProtocolError):
            rep.create(ROOT_INO, 2, name)
    assert not (tmp_path / "escape").exists()
    assert not (outside / "abs").exists()
    assert not Path("/tmp/abs-hafs-test").exists()


@pytest.fixture
def evil_dir(root: Path, outside: Path) -> Path:
    """A symlink inside the root to a directory outside it, planted by someone else."""
    link = root / "evil"
    link.symlink_to(outside)
    return link


SYMLINK_PARENT_OPS: dict[str, Callable[[Replica], None]] = {
    "CREATE": lambda r: r.create(10, 11, b"pwned"),
    "MKDIR": lambda r: r.mkdir(10, 11, b"pwned"),
    "MKNOD": lambda r: r.op(Op.MKNOD, 10, 11, stat.S_IFIFO | 0o644, 0, 0, 0, blobs=(b"pwned",)),
    "SYMLINK": lambda r: r.op(Op.SYMLINK, 10, 11, 0, 0, blobs=(b"pwned", b"x")),
    "LINK": lambda r: r.op(Op.LINK, 2, 10, blobs=(b"pwned",)),
    "UNLINK": lambda r: r.op(Op.UNLINK, 10, blobs=(b"secret",)),
    "RMDIR": lambda r: r.op(Op.RMDIR, 10, blobs=(b"sub",)),
    "RENAME_INTO": lambda r: r.op(Op.RENAME, ROOT_INO, 10, 0, blobs=(b"f", b"pwned")),
    "RENAME_OUT_OF": lambda r: r.op(Op.RENAME, 10, ROOT_INO, 0, blobs=(b"secret", b"stolen")),
    "RENAME_OVER": lambda r: r.op(Op.RENAME, ROOT_INO, 10, 0, blobs=(b"f", b"secret")),
    "BIND_UNDER": lambda r: r.bind(11, 10, b"secret"),
}


@pytest.mark.parametrize("opname", list(SYMLINK_PARENT_OPS))
def test_symlink_to_outside_refused_as_parent(
    rep: Replica, root: Path, evil_dir: Path, guard: Callable[[], None], opname: str
) -> None:
    rep.create(ROOT_INO, 2, b"f")
    rep.bind(10, ROOT_INO, b"evil")  # binding the symlink itself is fine ...
    with pytest.raises(ProtocolError, match="not a directory"):
        SYMLINK_PARENT_OPS[opname](rep)  # ... resolving through it is not
    assert (root / "f").exists()
    assert not (root / "stolen").exists()


def test_symlinked_ancestor_never_followed(
    rep: Replica, root: Path, outside: Path, guard: Callable[[], None]
) -> None:
    """A directory bound, then swapped for a symlink by someone else: the replica keeps
    working on the inode it bound, which is still inside the root."""
    (root / "d").mkdir()
    rep.bind(2, ROOT_INO, b"d")
    (root / "d").rename(root / "d_old")
    (root / "d").symlink_to(outside)
    rep.create(2, 3, b"new")
    assert (root / "d_old" / "new").exists()
    with pytest.raises(ProtocolError):  # rebinding the name now finds the symlink
        rep.bind(2, ROOT_INO, b"d")
        rep.create(2, 4, b"pwned")


@pytest.fixture
def evil_file(root: Path, outside: Path) -> Path:
    link = root / "sl"
    link.symlink_to(outside / "secret")
    return link


SYMLINK_TARGET_REFUSED: dict[str, Callable[[Replica], None]] = {
    "WRITE": lambda r: r.write(20, 0, b"PWNED"),
    "TRUNCATE": lambda r: r.op(Op.TRUNCATE, 20, 0),
    "CHMOD": lambda r: r.op(Op.CHMOD, 20, 0o777),
    "SETXATTR": lambda r: r.op(Op.SETXATTR, 20, 0, blobs=(b"user.pwned", b"1")),
    "REMOVEXATTR": lambda r: r.op(Op.REMOVEXATTR, 20, blobs=(b"user.x",)),
    "FSYNC_TARGET": lambda r: os.close(r.applier.fsync_target(20)),
}


@pytest.mark.parametrize("opname", list(SYMLINK_TARGET_REFUSED))
def test_op_on_bound_symlink_refused(
    rep: Replica, evil_file: Path, guard: Callable[[], None], opname: str
) -> None:
    rep.bind(20, ROOT_INO, b"sl")
    with pytest.raises(ProtocolError, match="symlink|not a regular file|fsync refused"):
        SYMLINK_TARGET_REFUSED[opname](rep)


def test_metadata_of_bound_symlink_changes_the_link_only(
    rep: Replica, root: Path, evil_file: Path, guard: Callable[[], None]
) -> None:
    rep.bind(20, ROOT_INO, b"sl")
    rep.op(Op.CHOWN, 20, 4242, 4343)
    rep.op(Op.TIMES, times=(FileTimes(20, 10**9, 10**9),))
    st_ = evil_file.lstat()
    assert (st_.st_uid, st_.st_gid, st_.st_mtime_ns) == (4242, 4343, 10**9)


def test_link_of_bound_symlink_links_the_symlink(
    rep: Replica, root: Path, outside: Path, evil_file: Path, guard: Callable[[], None]
) -> None:
    rep.bind(20, ROOT_INO, b"sl")
    rep.op(Op.LINK, 20, ROOT_INO, blobs=(b"hard",))
    assert stat.S_ISLNK((root / "hard").lstat().st_mode)
    assert (root / "hard").lstat().st_ino == evil_file.lstat().st_ino
    assert (outside / "secret").stat().st_nlink == 1


NAME_IS_SYMLINK_OPS: dict[str, Callable[[Replica], None]] = {
    "CREATE": lambda r: r.create(ROOT_INO, 21, b"sl"),
    "MKDIR": lambda r: r.mkdir(ROOT_INO, 21, b"sl"),
    "MKNOD": lambda r: r.op(Op.MKNOD, ROOT_INO, 21, stat.S_IFIFO | 0o644, 0, 0, 0, blobs=(b"sl",)),
    "SYMLINK": lambda r: r.op(Op.SYMLINK, ROOT_INO, 21, 0, 0, blobs=(b"sl", b"x")),
    "LINK": lambda r: r.op(Op.LINK, 2, ROOT_INO, blobs=(b"sl",)),
    "RMDIR": lambda r: r.op(Op.RMDIR, ROOT_INO, blobs=(b"sl",)),
}


@pytest.mark.parametrize("opname", list(NAME_IS_SYMLINK_OPS))
@pytest.mark.parametrize("dangling", [False, True])
def test_entry_name_that_is_a_symlink_not_followed(
    rep: Replica,
    root: Path,
    outside: Path,
    guard: Callable[[], None],
    opname: str,
    dangling: bool,
) -> None:
    """Creating over a planted symlink fails instead of creating at its target."""
    (root / "sl").symlink_to(outside / ("new" if dangling else "sub"))
    rep.create(ROOT_INO, 2, b"f")
    with pytest.raises(OSError):
        NAME_IS_SYMLINK_OPS[opname](rep)
    assert (root / "sl").is_symlink()
    assert not (outside / "new").exists()


def test_unlink_and_rename_over_symlink_touch_only_the_link(
    rep: Replica, root: Path, outside: Path, evil_file: Path, guard: Callable[[], None]
) -> None:
    rep.create(ROOT_INO, 2, b"f")
    rep.op(Op.RENAME, ROOT_INO, ROOT_INO, 0, blobs=(b"f", b"sl"))
    assert not (root / "sl").is_symlink()
    rep.op(Op.UNLINK, ROOT_INO, blobs=(b"sl",))
    (root / "sl2").symlink_to(outside / "secret")
    rep.op(Op.UNLINK, ROOT_INO, blobs=(b"sl2",))
    assert list(root.iterdir()) == []


def test_root_cannot_be_rebound_outside(
    rep: Replica, root: Path, guard: Callable[[], None]
) -> None:
    for name in (b"..", b".", b"/"):
        with pytest.raises(ProtocolError):
            rep.bind(ROOT_INO, ROOT_INO, name)
    rep.create(ROOT_INO, 2, b"f")
    assert (root / "f").exists()


# -- fuzz: any op either applies, or raises ProtocolError / OSError, and stays inside -----

NAMES = st.sampled_from(
    [
        b"a",
        b"b",
        b"d",
        b"evil",
        b"sl",
        b"fifo",
        b"..",
        b".",
        b"../x",
        b"/tmp/x",
        b"a/b",
        b"",
        b"n\0",
    ]
)
SMALL_INTS = st.one_of(
    st.integers(0, 12),
    st.sampled_from(
        [
            REG | 0o644,
            DIR | 0o755,
            stat.S_IFIFO | 0o600,
            stat.S_IFCHR | 0o600,
            stat.S_IFLNK | 0o777,
            -1,
            2**31,
            2**32,
            2**40,
            2**63 - 1,
            -(2**63),
        ]
    ),
)
SHAPES = {
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


@st.composite
def fuzz_ops(draw: st.DrawFn) -> OpFrame:
    op = draw(st.sampled_from(list(Op)))
    n_ints, n_blobs = SHAPES[op]
    ints = tuple(draw(st.lists(SMALL_INTS, min_size=n_ints, max_size=n_ints)))
    blobs = tuple(draw(st.lists(NAMES, min_size=n_blobs, max_size=n_blobs)))
    times = tuple(
        draw(
            st.lists(
                st.builds(
                    FileTimes,
                    st.integers(0, 12),
                    st.sampled_from([0, 10**18, -1, 2**63 - 1]),
                    st.sampled_from([0, 10**18, -(2**63)]),
                ),
                max_size=2,
            )
        )
    )
    return OpFrame(op, ints, blobs, times)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(fuzz_ops(), min_size=1, max_size=12))
def test_fuzz_ops_stay_confined(frames: list[OpFrame]) -> None:
    tmp_x = Path("/tmp/x").exists()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        root, outside = base / "root", base / "outside"
        root.mkdir()
        outside.mkdir()
        (outside / "secret").write_bytes(b"secret")
        (outside / "a").mkdir()
        (root / "evil").symlink_to(outside)
        (root / "sl").symlink_to(outside / "secret")
        (root / "d").mkdir()
        before = snapshot(outside)
        rep = Replica(root)
        try:
            rep.bind(2, ROOT_INO, b"evil")
            rep.bind(3, ROOT_INO, b"sl")
            rep.bind(4, ROOT_INO, b"d")
            for frame in frames:
                with contextlib.suppress(ProtocolError, OSError):
                    rep.applier.apply(_wire(frame))
        finally:
            rep.close()
        assert snapshot(outside) == before
        assert sorted(p.name for p in base.iterdir()) == ["outside", "root"]
        assert Path("/tmp/x").exists() == tmp_x
