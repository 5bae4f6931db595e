"""Unit tests of hafs.manifest: building a manifest of a real tree, comparing, wire format."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from hafs import manifest
from hafs.manifest import (
    Entry,
    ManifestError,
    build_manifest,
    compare,
    from_bytes,
    partial_from_bytes,
    to_bytes,
)

ODD_NAME = os.fsdecode(b"caf\xe9")  # not UTF-8: travels as a lone surrogate


def _set_xattr(path: Path, name: str, value: bytes) -> None:
    try:
        os.setxattr(path, name, value, follow_symlinks=False)
    except OSError as e:
        if e.errno == errno.ENOTSUP:
            pytest.skip("file system has no user xattrs")
        raise


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A tree holding one of every kind of thing the manifest records."""
    root = tmp_path / "src"
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"hello")
    (root / "a.txt").chmod(0o644)
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)) * 12)
    (root / "sub" / "deep" / "c").write_bytes(b"c")
    (root / "empty").touch()
    (root / "suid").write_bytes(b"#!/bin/true\n")
    (root / "suid").chmod(0o4755)
    (root / ODD_NAME).write_bytes(b"odd")
    (root / "link").symlink_to("a.txt")
    (root / "dirlink").symlink_to("sub")
    os.mkfifo(root / "fifo", 0o640)
    (root / "h1").write_bytes(b"linked")
    os.link(root / "h1", root / "h2")
    os.link(root / "h1", root / "sub" / "h3")
    try:
        os.setxattr(root / "a.txt", "user.k", b"v1")
        os.setxattr(root / "sub", "user.d", b"dir")
    except OSError as e:
        if e.errno != errno.ENOTSUP:
            raise
    return root


def _clone(src: Path, dst: Path) -> None:
    """Copy src to dst preserving everything the manifest records, fifos and links too."""
    shutil.copytree(src, dst, symlinks=True, ignore=_fifos)
    inodes: dict[int, Path] = {}
    for path in sorted(src.rglob("*")):
        st, twin = path.lstat(), dst / path.relative_to(src)
        if stat.S_ISFIFO(st.st_mode):
            os.mkfifo(twin)
        elif stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            if st.st_ino in inodes:
                twin.unlink()
                os.link(inodes[st.st_ino], twin)
            inodes.setdefault(st.st_ino, twin)
    # Metadata last: creating fifos and links above changed directory mtimes.
    for path in [src, *src.rglob("*")]:
        shutil.copystat(path, dst / path.relative_to(src), follow_symlinks=False)


def _fifos(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if stat.S_ISFIFO(os.lstat(os.path.join(directory, n)).st_mode)]


@contextmanager
def _times_kept(*paths: Path) -> Iterator[None]:
    """Restore the timestamps of `paths` after a change, so only the intended field differs."""
    saved = [(p, p.lstat()) for p in paths]
    yield
    for p, st in saved:
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


@pytest.fixture
def dst(src: Path, tmp_path: Path) -> Path:
    _clone(src, tmp_path / "dst")
    return tmp_path / "dst"


def _sha8(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:8]


# ---------------------------------------------------------------------------- building


def test_entries_record_each_kind(src: Path) -> None:
    m = build_manifest(str(src))
    assert m["."] == Entry(
        ".",
        "dir",
        stat.S_IMODE(src.stat().st_mode),
        os.getuid(),
        os.getgid(),
        0,
        src.stat().st_mtime_ns,
    )
    a = m["a.txt"]
    assert (a.kind, a.mode, a.size, a.digest) == (
        "file",
        0o644,
        5,
        hashlib.sha256(b"hello").hexdigest(),
    )
    assert m["suid"].mode == 0o4755
    assert m["sub/deep/c"].digest == hashlib.sha256(b"c").hexdigest()
    assert m[ODD_NAME].digest == hashlib.sha256(b"odd").hexdigest()
    assert (m["link"].kind, m["link"].target, m["link"].digest) == ("symlink", "a.txt", "")
    assert (m["fifo"].kind, m["fifo"].mode) == ("fifo", 0o640)
    assert (m["sub"].kind, m["sub"].size) == ("dir", 0)
    assert [m[p].link_group for p in ("h1", "h2", "sub/h3")] == ["h1"] * 3
    assert m["a.txt"].link_group == ""


def test_symlinks_are_recorded_not_followed(src: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (src / "escape_dir").symlink_to(outside)
    (src / "escape_file").symlink_to(outside / "secret")
    (src / "loop").symlink_to(".")
    m = build_manifest(str(src))
    assert m["escape_dir"] == Entry(
        "escape_dir",
        "symlink",
        0o777,
        os.getuid(),
        os.getgid(),
        len(str(outside)),
        (src / "escape_dir").lstat().st_mtime_ns,
        target=str(outside),
    )
    assert (m["escape_file"].kind, m["escape_file"].digest) == ("symlink", "")
    assert m["dirlink"].kind == m["loop"].kind == "symlink"
    assert not [p for p in m if p.startswith(("escape_dir/", "dirlink/", "loop/"))]
    assert not any("secret" in p for p in m)


def test_xattrs_are_recorded_sorted(src: Path) -> None:
    _set_xattr(src / "a.txt", "user.a", b"\x00\xff")
    m = build_manifest(str(src))
    assert m["a.txt"].xattrs == (("user.a", "00ff"), ("user.k", "7631"))
    assert m["sub"].xattrs == (("user.d", "646972"),)


def test_special_file_xattrs_are_read(src: Path) -> None:
    try:  # user.* is refused on fifos; trusted.* needs CAP_SYS_ADMIN
        os.setxattr(src / "fifo", "trusted.t", b"x", follow_symlinks=False)
    except PermissionError:
        pytest.skip("needs CAP_SYS_ADMIN")
    assert build_manifest(str(src))["fifo"].xattrs == (("trusted.t", "78"),)


def test_root_may_be_an_o_path_fd(src: Path) -> None:
    fd = os.open(src, os.O_PATH | os.O_DIRECTORY)
    try:
        assert build_manifest(fd) == build_manifest(str(src))
        os.fstat(fd)  # still the caller's, still open
    finally:
        os.close(fd)


def test_other_file_systems_are_skipped(src: Path) -> None:
    mnt = src / "sub" / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=False).returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        (mnt / "inside").write_bytes(b"not ours")
        m = build_manifest(str(src))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert "sub/b.bin" in m
    assert not [p for p in m if p.startswith("sub/mnt")]


def test_entries_vanishing_during_walk_are_skipped(
    src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_listdir, real_stat = os.listdir, os.stat
    sub = (src / "sub").stat()

    def racing_listdir(fd: Any) -> list[str]:
        names = real_listdir(fd)
        if isinstance(fd, int) and os.path.samestat(os.fstat(fd), sub):
            os.unlink("b.bin", dir_fd=fd)  # listed, not yet looked at by the manifest
        return names

    def racing_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        st = real_stat(path, *args, **kwargs)
        if path == "deep":  # looked at, not yet descended into
            shutil.rmtree(src / "sub" / "deep")
        return st

    expected = set(build_manifest(str(src))) - {"sub/b.bin", "sub/deep", "sub/deep/c"}
    monkeypatch.setattr(os, "listdir", racing_listdir)
    monkeypatch.setattr(os, "stat", racing_stat)
    assert set(build_manifest(str(src))) == expected


@pytest.mark.timeout(20)
def test_files_changing_between_lstat_and_open_are_skipped(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_stat = os.stat

    def racing_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        st = real_stat(path, *args, **kwargs)
        if path == "a.txt":  # now a fifo: opening it must not hang
            os.unlink(src / "a.txt")
            os.mkfifo(src / "a.txt")
        elif path == "empty":
            os.unlink(src / "empty")
        elif path == "c":  # now a symlink out of the tree: must not be read through
            os.unlink(src / "sub" / "deep" / "c")
            os.symlink(tmp_path / "secret", src / "sub" / "deep" / "c")
        return st

    (tmp_path / "secret").write_bytes(b"secret")
    monkeypatch.setattr(os, "stat", racing_stat)
    m = build_manifest(str(src))
    assert "a.txt" not in m and "empty" not in m and "sub/deep/c" not in m
    assert m["suid"].kind == "file"


def test_ten_thousand_files_build_quickly(tmp_path: Path) -> None:
    for d in range(100):
        (tmp_path / f"d{d}").mkdir()
        for f in range(100):
            (tmp_path / f"d{d}" / f"f{f}").write_bytes(b"%d" % f)
    start = time.monotonic()
    m = build_manifest(str(tmp_path))
    assert len(m) == 1 + 100 + 10_000
    assert time.monotonic() - start < 5  # about 0.4 s here


# ---------------------------------------------------------------------------- comparing


def test_identical_copies_compare_equal(src: Path, dst: Path) -> None:
    local, peer = build_manifest(str(src)), build_manifest(str(dst))
    assert local.keys() == peer.keys()
    assert compare(local, peer) == []


def _rewrite(data: bytes) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        with _times_kept(root / "a.txt"):
            (root / "a.txt").write_bytes(data)

    return change


def _chmod(root: Path) -> None:
    (root / "a.txt").chmod(0o600)


def _chmod_root(root: Path) -> None:
    root.chmod(0o700)


def _chown(root: Path) -> None:
    try:
        os.chown(root / "a.txt", 1234, -1)
    except PermissionError:
        pytest.skip("chown needs root")


def _touch(root: Path) -> None:
    st = (root / "a.txt").stat()
    os.utime(root / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 1))


def _remove(root: Path) -> None:
    with _times_kept(root / "sub"):
        (root / "sub" / "b.bin").unlink()


def _add(root: Path) -> None:
    with _times_kept(root / "sub"):
        (root / "sub" / "new").write_bytes(b"")


def _retarget(root: Path) -> None:
    with _times_kept(root, root / "link"):
        (root / "link").unlink()
        (root / "link").symlink_to("b.txt")  # same length: only the target differs


def _xattr(root: Path) -> None:
    _set_xattr(root / "a.txt", "user.k", b"v2")


def _fifo_to_file(root: Path) -> None:
    with _times_kept(root, root / "fifo"):
        (root / "fifo").unlink()
        (root / "fifo").touch()
        (root / "fifo").chmod(0o640)


def _break_link(root: Path) -> None:
    with _times_kept(root):
        (root / "h2").unlink()
        shutil.copy2(root / "h1", root / "h2")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_rewrite(b"jello"), [f"content sha256 {_sha8(b'hello')}.. != {_sha8(b'jello')}.."]),
        (
            _rewrite(b"hello!"),
            [f"content sha256 {_sha8(b'hello')}.. != {_sha8(b'hello!')}..", "size 5 != 6"],
        ),
        (_chmod, ["mode 0o644 != 0o600"]),
        (_chown, ["owner {uid}:{gid} != 1234:{gid}"]),
        (_xattr, ["xattr user.k 7631 != 7632"]),
        (_touch, ["mtime_ns {mtime} != {mtime_plus_1}"]),
    ],
    ids=["content", "size", "mode", "owner", "xattr", "mtime"],
)
def test_file_differences_name_path_and_field(
    src: Path, dst: Path, change: Callable[[Path], None], expected: list[str]
) -> None:
    change(dst)
    st = (src / "a.txt").stat()
    facts = {"uid": st.st_uid, "gid": st.st_gid, "mtime": st.st_mtime_ns}
    facts["mtime_plus_1"] = st.st_mtime_ns + 1
    want = sorted(f"differs: a.txt: {line.format(**facts)}" for line in expected)
    assert compare(build_manifest(str(src)), build_manifest(str(dst))) == want


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_remove, ["only on local: sub/b.bin"]),
        (_add, ["only on peer: sub/new"]),
        (_retarget, ["differs: link: symlink target 'a.txt' != 'b.txt'"]),
        (_fifo_to_file, ["differs: fifo: kind fifo != file"]),
        (_chmod_root, ["differs: .: mode 0o755 != 0o700"]),
        # h1 and sub/h3 stay linked: only h2 left the group
        (_break_link, ["differs: h2: hard link group 'h1' != (none)"]),
    ],
    ids=["missing", "extra", "symlink-target", "fifo-vs-file", "root-mode", "broken-link"],
)
def test_tree_differences_name_path_and_field(
    src: Path, dst: Path, change: Callable[[Path], None], expected: list[str]
) -> None:
    src.chmod(0o755)
    dst.chmod(0o755)
    change(dst)
    assert compare(build_manifest(str(src)), build_manifest(str(dst))) == expected


def test_broken_link_keeps_content_and_size_equal(src: Path, dst: Path) -> None:
    _break_link(dst)
    diffs = compare(build_manifest(str(src)), build_manifest(str(dst)))
    assert diffs and all("hard link group" in d for d in diffs)


# ---------------------------------------------------------------------------- wire format


def test_round_trip(src: Path) -> None:
    m = build_manifest(str(src))
    data = to_bytes(m)
    assert from_bytes(data) == m
    assert isinstance(data, bytes) and b"\n" not in data


def test_round_trip_empty() -> None:
    assert from_bytes(to_bytes({})) == {}


_ROW = '[".","dir",493,0,0,0,1,"","",[],""]'


def _doc(*rows: str) -> bytes:
    return ('{"version":1,"entries":[' + ",".join(rows) + "]}").encode()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00garbage",
        b"[" * 100_000,
        b"[]",
        b'{"entries":[]}',
        b'{"version":2,"entries":[]}',
        b'{"version":1}',
        b'{"version":1,"entries":{}}',
        b'{"version":1,"entries":[7]}',
        b'{"version":1,"entries":[[".","dir",493]]}',
        b'{"version":1,"entries":[[".","dir","493",0,0,0,1,"","",[],""]]}',
        b'{"version":1,"entries":[[".","dir",true,0,0,0,1,"","",[],""]]}',
        b'{"version":1,"entries":[[".","dir",493,0,0,0,1.5,"","",[],""]]}',
        b'{"version":1,"entries":[[".","door",493,0,0,0,1,"","",[],""]]}',
        b'{"version":1,"entries":[[".","dir",65536,0,0,0,1,"","",[],""]]}',
        b'{"version":1,"entries":[[".","dir",493,0,0,0,1,"","",[["user.a"]],""]]}',
        b'{"version":1,"entries":[[".","dir",493,0,0,0,1,"","",[["user.a",1]],""]]}',
        _doc(_ROW, _ROW),
    ],
)
def test_malformed_bytes_raise_manifest_error(data: bytes) -> None:
    with pytest.raises(ManifestError, match="manifest"):
        from_bytes(data)


def test_well_formed_row_parses() -> None:
    # The malformed cases above are variations of this row: it alone must be accepted.
    m = from_bytes(_doc(_ROW))
    assert m == {".": Entry(".", "dir", 0o755, 0, 0, 0, 1)}


def test_manifest_error_is_a_value_error() -> None:
    assert issubclass(ManifestError, ValueError)


# ---------------------------------------------------------------------------- cheap, parallel


def _without_digests(m: dict[str, Entry]) -> dict[str, Entry]:
    return {p: dataclasses.replace(e, digest="") for p, e in m.items()}


def test_cheap_manifest_is_the_full_one_without_digests(src: Path) -> None:
    full = build_manifest(str(src))
    cheap = build_manifest(str(src), digests=False)
    assert cheap == _without_digests(full)
    assert {e.ino for e in cheap.values()} == {e.ino for e in full.values()}


@pytest.mark.parametrize("digests", [True, False])
def test_workers_build_the_same_manifest(
    src: Path, monkeypatch: pytest.MonkeyPatch, digests: bool
) -> None:
    for d in range(3):
        (src / "sub" / f"many{d}").mkdir()
        for f in range(7):
            (src / "sub" / f"many{d}" / f"f{f}").write_bytes(b"%d" % f)
    serial = build_manifest(str(src), digests=digests)
    monkeypatch.setattr(manifest, "SLICE", 3)  # big directories are shared out in slices
    assert build_manifest(str(src), digests=digests, workers=4) == serial
    assert build_manifest(str(src), digests=digests, workers=1) == serial


def test_round_trip_partial_and_paged(src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest, "PAGE", 4)  # several pages, the last one short
    m = build_manifest(str(src))
    part = partial_from_bytes(to_bytes(m, {"h1"}, "token"))
    assert (part.entries, part.loose, part.session) == (m, {"h1"}, "token")
    assert from_bytes(to_bytes(m)) == m


@pytest.mark.parametrize(
    "data",
    [
        b'{"version":2,"entries":2}[' + _ROW.encode() + b"]",  # a row missing
        b'{"version":2,"entries":1}[' + _ROW.encode() + b"] ",  # trailing data
        b'{"version":2,"entries":1} [' + _ROW.encode() + b"]",  # whitespace
        b'{"version":2,"entries":1}[]',  # an empty page
        b'{"version":2,"entries":1}' + _ROW.encode(),  # a row, not a page
        b'{"version":2,"entries":-1}',
        b'{"version":2,"entries":[]}',
        b'{"version":2,"entries":1}[[".","dir",493]]',
        b'{"version":2,"entries":0}\xff',
    ],
)
def test_malformed_version_2_raises_manifest_error(data: bytes) -> None:
    with pytest.raises(ManifestError, match="manifest"):
        from_bytes(data)


def test_a_hundred_thousand_rows_parse_quickly() -> None:
    m = {
        f"d{i // 1000}/f{i}": Entry(f"d{i // 1000}/f{i}", "file", 0o644, 0, 0, i, i)
        for i in range(100_000)
    }
    data = to_bytes(m)
    start = time.monotonic()
    assert from_bytes(data) == m
    assert time.monotonic() - start < 10  # about 1 s here for 100,000


def test_scope_with_unknown_keys_is_refused() -> None:
    # e.g. a request for a whole cheap manifest sent to a replica that does not know it:
    # it must fail, not be answered with the manifest of an empty scope.
    assert manifest.Scope.from_json({"paths": ["a"]}) == manifest.Scope(frozenset({"a"}))
    with pytest.raises(ManifestError, match="unknown keys"):
        manifest.Scope.from_json({"digests": False})


def test_digests_of_files_around_the_read_size(tmp_path: Path) -> None:
    sizes = (0, 1, manifest.CHUNK - 1, manifest.CHUNK, manifest.CHUNK + 1, 2 * manifest.CHUNK)
    contents = {f"f{size}": os.urandom(size) for size in sizes}
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    m = build_manifest(str(tmp_path), workers=2)
    for name, data in contents.items():
        assert m[name].digest == hashlib.sha256(data).hexdigest(), name
