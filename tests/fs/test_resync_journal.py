"""The rejoin driven by the ALONE journal: only what changed is compared and copied (I6).

Real replica processes and FUSE mounts. A tree of ~2000 small files and a few MB files is
joined once (a whole comparison: no session yet), the mount goes ALONE and ~1% of the tree
changes (writes, creations, deletions, a directory renamed, a hard link, chmod, xattrs);
`hafs fs mirror` must then compare only the journaled paths and send about what changed.
When the journal cannot be trusted (the mount was killed while ALONE, or the replica's
directory was replaced) the whole trees are compared. `hafs fs verify` must say identical.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from hafs import manifest, resync
from tests.support.join import Counters, Join, wait_until

MiB = 1 << 20
TOPS, SUBS, FILES = 8, 5, 50  # 2000 small files in 40 directories


def populate(root: Path) -> int:
    """The tree; returns its number of entries (what a whole comparison checks)."""
    rng = random.Random(4)
    for t in range(TOPS):
        for s in range(SUBS):
            d = root / f"t{t}" / f"s{s}"
            d.mkdir(parents=True)
            for f in range(FILES):
                (d / f"f{f:03}").write_bytes(rng.randbytes(rng.randint(1024, 4096)))
    (root / "big").mkdir()
    for i, size in enumerate((2, 3, 4)):
        (root / "big" / f"b{i}").write_bytes(rng.randbytes(size * MiB))
    return 1 + TOPS + TOPS * SUBS + TOPS * SUBS * FILES + 1 + 3


def change_one_percent(mp: Path) -> int:
    """Change ~1% of the tree through the mount; returns the content bytes written."""
    written = 0
    for t in range(TOPS):  # small files rewritten in place, in 8 directories
        for f in (7, 30):
            with open(mp / f"t{t}/s1/f{f:03}", "r+b") as fh:
                fh.write(b"changed while alone " * 5)
                written += 100
    with open(mp / "big/b1", "r+b") as fh:  # one aligned MiB in the middle of 3 MiB
        fh.seek(MiB)
        fh.write(os.urandom(MiB))
        written += MiB
    for i in range(5):
        (mp / f"t0/s0/new{i}").write_bytes(os.urandom(2048))
        written += 2048
    for f in (3, 4, 5):
        (mp / f"t1/s2/f{f:03}").unlink()
    (mp / "t2/s2").rename(mp / "t2/s2-renamed")
    os.link(mp / "t0/s0/f000", mp / "t0/s0/f000.link")
    for f in (1, 2, 3):
        (mp / f"t3/s3/f{f:03}").chmod(0o600)
        os.setxattr(mp / f"t4/s4/f{f:03}", "user.tag", b"alone")
    return written


def mirror_reply(join: Join, mnt: Any) -> tuple[Counters, dict[str, Any]]:
    counters = join.mirror()
    reply: dict[str, Any] = mnt.status()["resync"]
    print(f"\nmirror: {reply['message']}: {counters}")
    return counters, reply


def first_join_then_alone(join: Join, mnt: Any, rep: Any, entries: int) -> None:
    counters, reply = mirror_reply(join, mnt)
    assert not reply["journal"] and "no completed session" in reply["full_reason"], reply
    assert counters.files_checked == entries, counters
    assert join.alone("test: peer away").returncode == 0
    wait_until(lambda: rep.status()["synced"] is False, 10, "the replica to see the end")


def test_rejoin_compares_and_copies_only_what_the_journal_names(join: Join) -> None:
    entries = populate(join.primary_dir)
    with join.replica() as rep, join.mount(alone=True) as mnt:
        first_join_then_alone(join, mnt, rep, entries)
        written = change_one_percent(join.mountpoint)

        counters, reply = mirror_reply(join, mnt)
        assert reply["journal"] is True and reply["full_reason"] == "", reply
        assert counters.files_checked < entries // 10, (counters, entries)
        assert counters.bytes_sent < 3 * written, (counters, written)
        assert mnt.status()["journal"] == []
        join.assert_identical()

        # Mirroring again afterwards: the changes reach the replica as they are made.
        (join.mountpoint / "t5/s0/f000").write_bytes(b"mirrored\n")
        assert (join.replica_dir / "t5/s0/f000").read_bytes() == b"mirrored\n"
        join.assert_identical()


def test_mount_killed_while_alone_compares_everything(join: Join) -> None:
    entries = populate(join.primary_dir)
    with join.replica() as rep:
        with join.mount(alone=True) as mnt:
            first_join_then_alone(join, mnt, rep, entries)
            change_one_percent(join.mountpoint)
            mnt.kill()
        with join.mount(alone=True) as mnt:
            counters, reply = mirror_reply(join, mnt)
            assert reply["journal"] is False and "unclean" in reply["full_reason"], reply
            assert counters.files_checked == entries + 5 + 1 - 3, counters
            join.assert_identical()


def test_replaced_replica_directory_is_not_trusted(join: Join) -> None:
    entries = populate(join.primary_dir)
    with join.mount(alone=True) as mnt:
        with join.replica() as rep:
            first_join_then_alone(join, mnt, rep, entries)
        change_one_percent(join.mountpoint)
        # Another, empty directory in its place; the replica's state directory is kept.
        shutil.move(join.replica_dir, join.replica_dir.with_name("old-replica"))
        join.replica_dir.mkdir()
        with join.replica():
            counters, reply = mirror_reply(join, mnt)
            assert reply["journal"] is False, reply
            assert "not the one the journal starts from" in reply["full_reason"], reply
            assert counters.files_checked == entries + 5 + 1 - 3, counters
            assert counters.files_copied > entries * 0.9, counters
            join.assert_identical()


def test_swapped_directories_and_a_cross_directory_link(join: Join) -> None:
    """Two directories with the same names inside swap places: the journal names only
    their parent's entries, so the moves must make their subtrees compared whole. Then a
    hard link to a file outside the journaled directories: not narrowable, so whole."""
    for name in ("a", "b", "c"):
        (join.primary_dir / name).mkdir()
        for f in range(3):
            (join.primary_dir / name / f"f{f}").write_bytes(f"{name}{f}".encode() * 100)
    with join.replica() as rep, join.mount(alone=True) as mnt:
        first_join_then_alone(join, mnt, rep, 1 + 3 + 9)
        mp = join.mountpoint
        (mp / "a").rename(mp / "tmp")
        (mp / "b").rename(mp / "a")
        (mp / "tmp").rename(mp / "b")
        counters, reply = mirror_reply(join, mnt)
        assert reply["journal"] is True, reply
        assert counters.files_copied == 6, counters
        join.assert_identical()

        assert join.alone("test: again").returncode == 0
        wait_until(lambda: rep.status()["synced"] is False, 10, "the replica to see the end")
        os.link(mp / "c/f0", mp / "a/linked")
        counters, reply = mirror_reply(join, mnt)
        assert reply["journal"] is False and "hard-linked" in reply["full_reason"], reply
        join.assert_identical()


# ------------------------------------------------------------------ the pieces, no mounts


def entry(path: str, kind: str = "file") -> manifest.Entry:
    return manifest.Entry(path, kind, 0o644, 0, 0, 0, 0)


def test_narrow_keeps_one_sided_entries_only_under_journaled_directories() -> None:
    remote = {p: entry(p) for p in ("d/x", "d/gone", "e/stale", "e/kept")}
    remote |= {p: entry(p, "dir") for p in (".", "d", "e")}
    local = {p: entry(p) for p in ("d/x", "d/new", "e/kept")}
    local |= {p: entry(p, "dir") for p in (".", "d", "e")}
    scope = manifest.Scope(frozenset({"e/stale", "d/x"}), frozenset({"d"}))
    mine, theirs = resync.narrow(local, remote, scope)
    plan = resync.plan_resync(mine, theirs)
    assert plan.remove == ("d/gone",)  # never e/stale: e's entries are not journaled
    assert plan.create == {"d/new"}


def test_partial_manifest_is_confined_and_reports_loose_links(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/x").write_bytes(b"x")
    os.link(tmp_path / "d/x", tmp_path / "y")
    (tmp_path / "via").symlink_to("d")
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        part = manifest.build_partial(fd, manifest.Scope(frozenset({"via/x", "d/x"})))
        assert set(part.entries) == {"d/x"}  # no path through a symlink
        assert part.loose == {"d/x"}  # its other name, y, is not in the scope
        both = manifest.build_partial(fd, manifest.Scope(frozenset({"y"}), frozenset({"d"})))
        assert set(both.entries) == {"d", "d/x", "y"} and not both.loose
    finally:
        os.close(fd)
    for bad in ("../x", "/etc", "d/../..", "", "d//x", "./d"):
        with pytest.raises(manifest.ManifestError):
            manifest.Scope.from_json({"paths": [bad]})
