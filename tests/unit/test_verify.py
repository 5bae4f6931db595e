"""The online verify's core (hafs.verify.verify) on scripted manifests: writes in flight are
dropped, files being written are busy, stable differences are reported, rounds are bounded."""

from __future__ import annotations

from hafs.manifest import Entry, Scope
from hafs.verify import Rounds, Verdict, verify

Tree = dict[str, Entry]


def entry(path: str, version: int = 1, link_group: str = "") -> Entry:
    return Entry(path, "file", 0o644, 0, 0, 10 * version, 1000 + version, f"{version:064x}",
                 link_group=link_group)  # fmt: skip


def tree(*entries: Entry) -> Tree:
    root = Entry(".", "dir", 0o755, 0, 0, 0, 1)
    return {".": root, **{e.path: e for e in entries}}


class Script:
    """A reader returning one tree per call (the last one again once they run out), and
    remembering the scopes it was asked for."""

    def __init__(self, *trees: Tree) -> None:
        self.trees = list(trees)
        self.scopes: list[Scope | None] = []

    def __call__(self, scope: Scope | None) -> Tree:
        self.scopes.append(scope)
        whole = self.trees.pop(0) if len(self.trees) > 1 else self.trees[0]
        if scope is None:
            return whole
        return {p: e for p, e in whole.items() if p in scope.paths}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


DEFAULT = Rounds()


def run(local: Script, remote: Script, rounds: Rounds = DEFAULT) -> tuple[Verdict, Clock]:
    clock = Clock()
    return verify(local, remote, rounds, sleep=clock.sleep, clock=clock), clock


def test_identical_trees_need_no_second_look() -> None:
    same = tree(entry("a"), entry("b"))
    verdict, clock = run(Script(same), Script(same))
    assert verdict.identical and verdict.rounds == 0 and clock.sleeps == []
    assert verdict.lines() == ["identical: 3 entries"]


def test_a_write_in_flight_is_not_reported() -> None:
    # The primary applied version 2 before the replica did: agreed one round later.
    local = Script(tree(entry("a", 2), entry("b")))
    remote = Script(tree(entry("a", 1), entry("b")), tree(entry("a", 2), entry("b")))
    verdict, _ = run(local, remote)
    assert verdict.identical
    assert verdict.in_flight == 1 and verdict.rounds == 1 and verdict.busy == ()
    assert verdict.lines()[0] == "identical: 3 entries"


def test_a_file_being_written_is_busy_not_different() -> None:
    # Each read of the primary sees a newer version than the replica's read.
    local = Script(*(tree(entry("db", v), entry("b")) for v in range(2, 10)))
    remote = Script(*(tree(entry("db", v), entry("b")) for v in range(1, 9)))
    verdict, clock = run(local, remote, Rounds(count=3, interval=1.0, limit=10.0))
    assert verdict.identical and verdict.busy == ("db",)
    assert verdict.rounds == 3 and clock.sleeps == [1.0, 1.0, 1.0]
    assert verdict.lines() == [
        "identical: 3 entries (1 busy: being written, not compared)",
        "busy (being written; not compared): db",
    ]


def test_a_stable_difference_is_reported_after_one_round() -> None:
    local = Script(tree(entry("a", 1), entry("b")))
    remote = Script(tree(entry("a", 7), entry("b")))
    verdict, clock = run(local, remote)
    assert not verdict.identical
    assert verdict.differing == ("a",) and verdict.busy == ()
    assert verdict.rounds == 1 and clock.sleeps == [1.0]  # stable on both: no more rounds
    assert verdict.differences[0].startswith("differs: a: ")
    assert all(line.startswith("differs: a: ") for line in verdict.lines())


def test_entries_on_one_side_only_are_differences_once_stable() -> None:
    local = Script(tree(entry("mine")))
    remote = Script(tree(entry("theirs")))
    verdict, _ = run(local, remote)
    assert verdict.differences == ("only on local: mine", "only on peer: theirs")


def test_a_path_written_then_left_different_is_a_difference() -> None:
    # Written during the first round (busy then), then still: the replica never got it.
    local = Script(tree(entry("a", 2)), tree(entry("a", 3)))
    remote = Script(tree(entry("a", 1)))
    verdict, _ = run(local, remote)
    assert verdict.differing == ("a",) and verdict.rounds == 2


def test_rounds_are_bounded_in_count_and_time() -> None:
    local = Script(*(tree(entry("db", v)) for v in range(2, 40)))
    remote = Script(*(tree(entry("db", v)) for v in range(1, 39)))
    verdict, clock = run(local, remote, Rounds(count=10, interval=1.0, limit=2.5))
    assert verdict.rounds == 2 and clock.now <= 2.5
    assert verdict.busy == ("db",)
    verdict, _ = run(
        Script(*(tree(entry("db", v)) for v in range(2, 40))),
        Script(*(tree(entry("db", v)) for v in range(1, 39))),
        Rounds(count=0),
    )
    assert verdict.rounds == 0 and verdict.differing == ("db",)  # no second look: as before


def test_only_differing_paths_are_read_again_with_their_hard_links() -> None:
    local = Script(tree(entry("a", 2, "a"), entry("z", 2, "a"), entry("b")))
    remote = Script(tree(entry("a", 1, "a"), entry("z", 1, "a"), entry("b")))
    verdict, _ = run(local, remote)
    assert local.scopes[0] is None and remote.scopes[0] is None
    again = local.scopes[1]
    assert again is not None and again.paths == {"a", "z"}
    assert verdict.differing == ("a", "z")


def test_a_verdict_survives_json() -> None:
    verdict, _ = run(Script(tree(entry("a", 1))), Script(tree(entry("a", 2))))
    assert Verdict.from_json(verdict.to_json()) == verdict
