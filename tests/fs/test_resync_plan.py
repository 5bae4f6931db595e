"""The resync's plan (hafs.resync.plan_resync): what it removes, makes and fixes, and in
which order. Pure: manifests in, plan out; test_join.py runs plans on real trees."""

from __future__ import annotations

import dataclasses

from hafs.manifest import Entry
from hafs.resync import dfs_key, plan_resync


def tree(*entries: Entry) -> dict[str, Entry]:
    root = Entry(".", "dir", 0o755, 0, 0, 0, 1)
    return {".": root, **{e.path: e for e in entries}}


def d(path: str, mode: int = 0o755) -> Entry:
    return Entry(path, "dir", mode, 0, 0, 0, 1)


def f(path: str, digest: str = "aa", size: int = 2, link_group: str = "") -> Entry:
    return Entry(path, "file", 0o644, 0, 0, size, 1, digest=digest, link_group=link_group)


def ln(path: str, target: str) -> Entry:
    return Entry(path, "symlink", 0o777, 0, 0, len(target), 1, target=target)


def test_identical_trees_need_nothing() -> None:
    m = tree(d("a"), f("a/x"), ln("s", "a/x"))
    plan = plan_resync(m, dict(m))
    assert plan.remove == () and not (plan.create | plan.rewrite | plan.refresh)
    assert plan.touched_dirs == ()


def test_extra_tree_is_removed_children_first() -> None:
    local = tree(d("a"))
    remote = tree(d("a"), d("x"), d("x/y"), f("x/y/z"), f("x/w"), f("a/extra"))
    plan = plan_resync(local, remote)
    assert set(plan.remove) == {"x", "x/y", "x/y/z", "x/w", "a/extra"}
    for i, path in enumerate(plan.remove):
        later = plan.remove[i + 1 :]
        assert not any(p.startswith(path + "/") for p in later), f"{path} before its children"
    assert set(plan.touched_dirs) == {".", "a"}


def test_missing_entries_are_created_parents_first() -> None:
    local = tree(d("a"), d("a/b"), f("a/b/c"), f("a-b"), ln("a/s", "b"))
    plan = plan_resync(local, tree())
    assert plan.create == {"a", "a/b", "a/b/c", "a-b", "a/s"}
    order = plan.updates()
    assert order.index("a") < order.index("a/b") < order.index("a/b/c")
    assert order == sorted(order, key=dfs_key)


def test_kind_or_target_change_is_a_replacement() -> None:
    local = tree(d("x"), f("y"), ln("s", "new"))
    remote = tree(f("x"), d("y"), f("y/inner"), ln("s", "old"))
    plan = plan_resync(local, remote)
    assert set(plan.remove) == {"x", "y", "y/inner", "s"}
    assert plan.create == {"x", "y", "s"}


def test_content_and_metadata_differences() -> None:
    local = tree(f("c", digest="new"), f("n", size=3), f("m"), d("dm", mode=0o700))
    remote = tree(f("c", digest="old"), f("n", size=2), f("m"), d("dm"))
    remote["m"] = dataclasses.replace(remote["m"], xattrs=(("user.a", "00"),))
    plan = plan_resync(local, remote)
    assert plan.rewrite == {"c", "n"}
    assert plan.refresh == {"m", "dm"}
    assert plan.remove == () and plan.create == frozenset()
    assert plan.touched_dirs == ("dm",)


def test_hard_links_that_differ_are_made_again() -> None:
    # Linked on the primary, separate on the replica: both names made again.
    local = tree(f("a", link_group="a"), f("b", link_group="a"), f("c"))
    remote = tree(f("a"), f("b"), f("c", link_group="c"), f("z", link_group="c"))
    plan = plan_resync(local, remote)
    # c is linked to z on the replica only: writing c would change z, so c is made again.
    assert set(plan.remove) == {"a", "b", "c", "z"}
    assert plan.create == {"a", "b", "c"}


def test_same_hard_links_are_kept() -> None:
    m = tree(f("a", link_group="a"), f("b", link_group="a"))
    assert plan_resync(m, dict(m)).remove == ()
