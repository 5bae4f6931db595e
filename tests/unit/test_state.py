"""Unit tests of hafs.state: the persistent per-directory state (I7)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hafs import state as state_mod
from hafs.state import NodeState, StateStore, default_state_dir


def test_fresh_store_has_defaults(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "sd")
    assert store.current == NodeState()
    assert store.current.uptodate is True
    assert (tmp_path / "sd").is_dir()
    assert not store.path.exists()  # nothing written until the first update


def test_state_dir_created_private(tmp_path: Path) -> None:
    StateStore(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").stat().st_mode & 0o777 == 0o700


def test_update_persists_and_reloads(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    new = store.update(role="replica", uptodate=False, session_open=True, generation=7)
    assert new == store.current
    assert new == NodeState(role="replica", uptodate=False, session_open=True, generation=7)
    assert json.loads(store.path.read_text())["uptodate"] is False
    again = StateStore(tmp_path).current
    assert again == new
    store.update(mode="ALONE")  # other fields kept
    assert StateStore(tmp_path).current == NodeState(
        role="replica", mode="ALONE", uptodate=False, session_open=True, generation=7
    )


def test_update_unknown_field_rejected_and_nothing_written(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.update(generation=1)
    with pytest.raises(TypeError):
        store.update(bogus=1)
    assert StateStore(tmp_path).current.generation == 1
    assert store.current.generation == 1


def test_update_is_atomic_replace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash before the rename leaves the previous state file whole."""
    store = StateStore(tmp_path)
    store.update(generation=1, uptodate=True)
    inode_before = store.path.stat().st_ino

    def crash(src: object, dst: object) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(state_mod.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        store.update(generation=2, uptodate=False)
    monkeypatch.undo()
    assert store.path.stat().st_ino == inode_before
    assert StateStore(tmp_path).current == NodeState(generation=1, uptodate=True)
    assert store.current.generation == 1  # memory follows the disk, not the failed attempt
    # The next update still works over the leftover temporary file.
    store.update(generation=3)
    assert StateStore(tmp_path).current.generation == 3
    assert store.path.stat().st_ino != inode_before  # written aside, renamed over


def test_update_fsyncs_file_and_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = StateStore(tmp_path)
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(state_mod.os, "fsync", fsync)
    store.update(generation=5)
    assert str(tmp_path) in synced  # the rename is made durable too
    assert any(p.endswith(".tmp") or p.endswith("state.json") for p in synced)


def test_unknown_keys_in_file_ignored(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text(json.dumps({"generation": 4, "from_the_future": 1}))
    assert StateStore(tmp_path).current == NodeState(generation=4)


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2"])
def test_corrupt_state_refused_loudly(tmp_path: Path, content: str) -> None:
    (tmp_path / "state.json").write_text(content)
    with pytest.raises(RuntimeError, match="unreadable state"):
        StateStore(tmp_path)


def test_default_state_dir_escapes_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAFS_ROOT", "/x")
    assert default_state_dir("/srv/my-data") == Path("/x/var/lib/hafs/fs/srv-my\\x2ddata")
    assert default_state_dir("/srv/my/data") == Path("/x/var/lib/hafs/fs/srv-my-data")
    assert default_state_dir("/srv/my/data") != default_state_dir("/srv/my-data")
    assert default_state_dir("/") == Path("/x/var/lib/hafs/fs/root")
    monkeypatch.delenv("HAFS_ROOT")
    assert default_state_dir("/a") == Path("/var/lib/hafs/fs/a")
