"""hafs.repair's LiveCopy: its own inode numbers on the replica, the mount's bindings renewed
for the repaired paths it knows, and nothing sent once the mount left MIRROR."""

from __future__ import annotations

import pytest

from hafs import resync
from hafs.manifest import Entry
from hafs.ops import ROOT_INO, Op, OpFrame
from hafs.repair import PRIVATE, LiveCopy
from hafs.replicator import Mode, ResyncInterrupted

ROOT_ST_INO = 100


class Stream:
    """Stands for the Replicator: records what is sent."""

    def __init__(self) -> None:
        self.mode = Mode.MIRROR
        self.reason = ""
        self.sent: list[OpFrame] = []

    def send(self, frame: OpFrame) -> int:
        self.sent.append(frame)
        return len(self.sent)


def entry(path: str, kind: str, ino: int) -> Entry:
    return Entry(path, kind, 0o644, 0, 0, 0, 1, ino=ino)


LOCAL = {
    ".": entry(".", "dir", ROOT_ST_INO),
    "a": entry("a", "file", 5),
    "d": entry("d", "dir", 6),
    "d/b": entry("d/b", "file", 7),
}


def live_copy(stream: Stream) -> LiveCopy:
    report = resync.ResyncReport()
    return LiveCopy(stream, -1, ROOT_ST_INO, LOCAL, {}, report)  # type: ignore[arg-type]


def plan(create: set[str], rewrite: set[str]) -> resync.ResyncPlan:
    return resync.ResyncPlan((), frozenset(create), frozenset(rewrite), frozenset(), ())


def test_the_copy_names_inodes_apart_from_the_mount() -> None:
    copy = live_copy(Stream())
    assert copy.path_ino("a") == 5 | PRIVATE
    assert copy.ino(LOCAL["d"]) == 6 | PRIVATE
    assert copy.path_ino(".") == ROOT_INO  # the root is never forgotten on the replica


def test_rebind_renews_only_what_the_mount_knows() -> None:
    stream = Stream()
    live_copy(stream).rebind(plan({"a"}, {"d/b"}), known={ROOT_INO, 5, 6})
    assert stream.sent == [OpFrame(Op.BIND, (5, ROOT_INO), (b"a",))]
    stream.sent.clear()
    live_copy(stream).rebind(plan({"a"}, {"d/b"}), known={ROOT_INO, 5, 6, 7})
    assert stream.sent[-1] == OpFrame(Op.BIND, (7, 6), (b"b",))


def test_nothing_is_sent_once_the_mount_left_mirror() -> None:
    stream = Stream()
    stream.mode, stream.reason = Mode.ALONE, "peer lost"
    with pytest.raises(ResyncInterrupted, match="peer lost"):
        live_copy(stream).send(OpFrame(Op.FORGET, (5 | PRIVATE,)))
    assert stream.sent == []
