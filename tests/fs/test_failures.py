"""Failures on real mounts: the mount or the replica dies, hangs, or runs out of space.

Each test runs a real replica server and a real pyfuse3 mount (tests/support/cluster.py) and
checks the data-path invariants of design.md section 3 from the outside: I1 (an acknowledged
write is on the replica), I3 (after a crash the replica holds a state the primary passed
through at or after its last acknowledged call) and I5 (a failed, hung or refusing replica
never blocks the application beyond the timeout; the mount goes ALONE and journals every
file changed, in-flight ones too, and stays ALONE across a restart).

Writes are made of numbered, self-checking 4 KiB records, and a record counts as
acknowledged only once the call that wrote it returned.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hafs import manifest
from tests.support import cluster
from tests.support.cluster import TIMEOUT, Pair, wait_until
from tests.support.records import RECORD, RecordWriter, check_records, record

MARGIN = 1.5  # scheduling, journal fdatasync and state fsync on top of the timeout
FAST_CALL = TIMEOUT / 2  # slower than this, a call waited for the peer
DEAD_MOUNT_ERRNOS = {errno.ENOTCONN, errno.ECONNABORTED}


# ------------------------------------------------------------------------------ records


# ------------------------------------------------------------------------------ helpers


def timed(call: Callable[[], Any]) -> float:
    start = time.monotonic()
    call()
    return time.monotonic() - start


def read_state(state_dir: Path) -> dict[str, Any]:
    state: dict[str, Any] = json.loads((state_dir / "state.json").read_text())
    return state


def journal_lines(state_dir: Path) -> list[dict[str, Any]]:
    lines = (state_dir / "journal").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for rec in records:
        assert {"kind", "path", "ino", "chunk"} <= rec.keys(), rec
    return records


def replica_idle(rep: cluster.ReplicaProc) -> bool:
    """The replica ended its session: everything it received is applied."""
    return rep.status()["mode"] == "LISTENING"


def write_file(path: Path, data: bytes, flags: int = os.O_CREAT | os.O_EXCL | os.O_WRONLY) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def tree(root: Path) -> dict[str, bytes | str]:
    """Relative path -> content for files, "dir" for directories."""
    result: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in dirnames:
            result[os.path.normpath(os.path.join(rel, name))] = "dir"
        for name in filenames:
            result[os.path.normpath(os.path.join(rel, name))] = (Path(dirpath) / name).read_bytes()
    return result


Rig = Pair


@contextlib.contextmanager
def continued_on_exit(proc: cluster.HafsProc) -> Iterator[None]:
    """SIGCONT the process on the way out, so a stopped replica can be stopped cleanly."""
    try:
        yield
    finally:
        if proc.running():
            os.kill(proc.pid, signal.SIGCONT)


# ------------------------------------------------------------------------------ 1. mount crash


def kill_mount_mid_stream(
    mnt: cluster.MountProc, writer: RecordWriter, enough: Callable[[], bool]
) -> None:
    """SIGKILL the mount once ENOUGH records went through; the writer must see it die."""
    try:
        wait_until(lambda: enough() or writer.error is not None, 60, "records before the crash")
        assert writer.error is None, f"write failed before the crash: {writer.error}"
        mnt.kill()
        writer.thread.join(15)  # type: ignore[union-attr]
    finally:
        writer.finish()
    cluster.force_unmount(mnt.target)
    assert writer.error is not None, "the writer finished before the crash: not mid-stream"
    assert writer.error.errno in DEAD_MOUNT_ERRNOS, f"unexpected error {writer.error!r}"


def test_mount_sigkill_mid_write_stream_replica_holds_acked_prefix(rig: Rig) -> None:
    """I1 + I3: after SIGKILL of the mount, the replica holds every acknowledged record and
    nothing past the one write that may have been in flight."""
    with rig.replica() as rep, rig.mount() as mnt:
        path = rig.mountpoint / "stream.dat"
        write_file(path, b"")
        writer = RecordWriter(path).start()
        kill_mount_mid_stream(mnt, writer, lambda: writer.acked >= 300)
        acked = writer.acked

        wait_until(lambda: replica_idle(rep), 10, "the replica to end the dead session")
        data = (rig.replica_dir / "stream.dat").read_bytes()
        n = check_records(data, "replica stream.dat")
        assert n >= acked, f"acknowledged records lost: replica has {n}, {acked} were acked"
        assert n <= acked + 1, f"replica has {n} records, only {acked} acked + 1 in flight"
        # The primary applies locally before sending: it is never behind the replica.
        primary = check_records((rig.primary_dir / "stream.dat").read_bytes(), "primary")
        assert n <= primary <= acked + 1, (acked, n, primary)
        state = read_state(rig.replica_state)
        assert state["session_open"] is True, f"replica claims a clean end: {state}"
        assert state["uptodate"] is True, state


@dataclass
class TreeModel:
    """Files and directories a step sequence produces, as tree() reports them."""

    entries: dict[str, bytes | str] = field(default_factory=dict)

    def apply(self, step: tuple[Any, ...]) -> None:
        kind, *args = step
        if kind == "create":
            self.entries[args[0]] = b""
        elif kind == "write":
            name, offset, data = args
            old = self.entries[name]
            assert isinstance(old, bytes)
            grown = old.ljust(offset, b"\0")
            self.entries[name] = grown[:offset] + data + grown[offset + len(data) :]
        elif kind == "rename":
            self.entries[args[1]] = self.entries.pop(args[0])
        elif kind == "unlink":
            del self.entries[args[0]]
        elif kind == "mkdir":
            self.entries[args[0]] = "dir"


def tree_steps(count: int) -> Iterator[tuple[Any, ...]]:
    """Creates, writes, renames over existing names, unlinks and mkdirs, interleaved."""
    live: set[str] = set()
    yield ("create", "log")
    for i in range(count):
        tmp = f"t{i}"
        yield ("create", tmp)
        yield ("write", tmp, 0, record(i))
        if i % 5 == 4:
            yield ("mkdir", f"d{i}")
            yield ("rename", tmp, f"d{i}/moved")
        else:
            dest = f"r{i % 4}"
            yield ("rename", tmp, dest)
            live.add(dest)
        yield ("write", "log", i * RECORD, record(i))
        if i % 7 == 6 and live:
            victim = sorted(live)[i % len(live)]
            live.discard(victim)
            yield ("unlink", victim)


def run_step(root: Path, step: tuple[Any, ...], fds: dict[str, int]) -> None:
    """One application call per step (closing a file is not a step: it changes nothing)."""
    kind, *args = step
    if kind == "create":
        fds[args[0]] = os.open(root / args[0], os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    elif kind == "write":
        name, offset, data = args
        assert os.pwrite(fds[name], data, offset) == len(data)
        if name != "log":
            os.close(fds.pop(name))
    elif kind == "rename":
        os.rename(root / args[0], root / args[1])
    elif kind == "unlink":
        os.unlink(root / args[0])
    elif kind == "mkdir":
        os.mkdir(root / args[0])


def test_mount_sigkill_amid_creates_and_renames_replica_tree_is_a_past_state(rig: Rig) -> None:
    """I3 over several files: after SIGKILL of the mount, the replica's tree is the state
    after the last acknowledged call, or after the one call in flight."""
    steps = list(tree_steps(5000))
    done = 0
    error: OSError | None = None
    stop = threading.Event()

    def app() -> None:
        nonlocal done, error
        fds: dict[str, int] = {}
        try:
            for step in steps:
                if stop.is_set():
                    return
                run_step(rig.mountpoint, step, fds)
                done += 1
        except OSError as e:
            error = e
        finally:
            for fd in fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)

    with rig.replica() as rep, rig.mount() as mnt:
        thread = threading.Thread(target=app, name="tree-writer", daemon=True)
        thread.start()
        try:
            wait_until(lambda: done >= 600 or error is not None, 60, "600 steps")
            assert error is None, f"step {done} failed before the crash: {error}"
            mnt.kill()
            thread.join(15)
        finally:
            stop.set()
            thread.join(15)
            assert not thread.is_alive(), "the application is stuck in a call on the mount"
        cluster.force_unmount(mnt.target)
        assert error is not None, "the application finished before the crash"
        assert error.errno in DEAD_MOUNT_ERRNOS, f"unexpected error {error!r}"

        wait_until(lambda: replica_idle(rep), 10, "the replica to end the dead session")
        got = tree(rig.replica_dir)
        model = TreeModel()
        for step in steps[:done]:
            model.apply(step)
        acked_state = dict(model.entries)
        model.apply(steps[done])
        inflight_state = model.entries
        if got != acked_state and got != inflight_state:
            names = sorted(set(got) | set(acked_state) | set(inflight_state))
            diff = [
                f"{n}: replica {_short(got.get(n))}, acked {_short(acked_state.get(n))}, "
                f"in flight {_short(inflight_state.get(n))}"
                for n in names
                if not (got.get(n) == acked_state.get(n) == inflight_state.get(n))
            ]
            pytest.fail(
                f"replica tree is neither the state after {done} acknowledged calls nor after "
                f"the call in flight ({steps[done][:2]}):\n" + "\n".join(diff)
            )
        assert read_state(rig.replica_state)["session_open"] is True


def _short(v: bytes | str | None) -> str:
    if isinstance(v, bytes):
        return f"{len(v)} bytes {hashlib.sha256(v).hexdigest()[:8]}"
    return repr(v)


# ------------------------------------------------------------------------------ 2. replica fails


def test_replica_sigkill_mid_stream_app_unaffected_mount_alone_journals_changes(rig: Rig) -> None:
    """I5: the replica dies; every call completes in time without error, the mount goes
    ALONE and journals each file changed since, including the one being written."""
    with rig.replica() as rep, rig.mount() as mnt:
        mp = rig.mountpoint
        for name in ("old1", "old2", "untouched"):
            write_file(mp / name, f"{name} before\n".encode())
        for name in ("from", "to", "linkdir", "quiet"):
            (mp / name).mkdir()
        write_file(mp / "from/moved", b"moved before\n")
        stream = mp / "stream.dat"
        write_file(stream, b"")
        writer = RecordWriter(stream, fsync_every=4).start()
        try:
            wait_until(lambda: writer.acked >= 200 or writer.error is not None, 60, "records")
            assert writer.error is None, f"write failed before the kill: {writer.error}"
            assert mnt.status()["mode"] == "MIRROR"
            rep.kill()
            seconds = {
                "create new1": timed(lambda: write_file(mp / "new1", b"new one\n")),
                "create new2": timed(lambda: write_file(mp / "new2", b"new two\n")),
                "mkdir newdir": timed(lambda: (mp / "newdir").mkdir()),
                "create newdir/new3": timed(lambda: write_file(mp / "newdir/new3", b"three\n")),
                "append old1": timed(
                    lambda: write_file(mp / "old1", b"more\n", os.O_WRONLY | os.O_APPEND)
                ),
                "append old2": timed(
                    lambda: write_file(mp / "old2", b"more\n", os.O_WRONLY | os.O_APPEND)
                ),
                "rename": timed(lambda: os.rename(mp / "from/moved", mp / "to/moved2")),
                "link": timed(lambda: os.link(mp / "untouched", mp / "linkdir/hard")),
            }
            after_kill = writer.acked
            wait_until(
                lambda: writer.acked >= after_kill + 100 or writer.error is not None,
                TIMEOUT + 20,
                "100 more records after the kill",
            )
        finally:
            writer.finish()
        assert writer.error is None, f"the application saw an error: {writer.error!r}"
        seconds["slowest record write/fsync"] = writer.slowest()
        slow = {k: round(v, 2) for k, v in seconds.items() if v > TIMEOUT + MARGIN}
        assert not slow, f"calls took longer than the {TIMEOUT}s timeout + {MARGIN}s: {slow}"

        status = mnt.status()
        assert status["mode"] == "ALONE", status
        assert status["reason"], status
        journal = set(status["journal"])
        changed = {"stream.dat", "new1", "new2", "newdir", "newdir/new3", "old1", "old2"}
        assert changed <= journal, f"not journaled: {sorted(changed - journal)}; {status}"
        assert "quiet" not in journal, journal
        records = journal_lines(rig.mount_state)
        on_disk = {rec["path"] for rec in records}
        assert journal <= on_disk, f"status lists paths the journal file lacks: {journal - on_disk}"
        # Names created, removed or renamed are journaled as "entry" changes of their
        # directory (docs/datapath.md): both ends of the rename, where files were made, where
        # the hard link was made.
        entry_dirs = {rec["path"] for rec in records if rec["kind"] == "entry"}
        assert {"from", "to", ".", "newdir", "linkdir"} <= entry_dirs, records
        assert read_state(rig.mount_state)["mode"] == "ALONE"
        # The application's data is all there, locally.
        assert check_records(stream.read_bytes(), "primary stream.dat") == writer.acked
        assert (mp / "to/moved2").read_bytes() == b"moved before\n"
        assert (mp / "old1").read_bytes() == b"old1 before\nmore\n"


def blocked_call(call: Callable[[], Any], name: str) -> tuple[threading.Thread, dict[str, Any]]:
    """Start CALL in a thread; the dict gets its result and duration, or its error."""
    result: dict[str, Any] = {}

    def run() -> None:
        start = time.monotonic()
        try:
            result["value"] = call()
            result["seconds"] = time.monotonic() - start
        except OSError as e:
            result["error"] = e

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread, result


def _pwrite_file(path: Path, data: bytes) -> int:
    fd = os.open(path, os.O_RDWR)
    try:
        return os.pwrite(fd, data, 0)
    finally:
        os.close(fd)


def test_write_in_flight_when_replica_dies_is_journaled(rig: Rig) -> None:
    """I5: a write sent but never acknowledged (the replica stopped, then killed) returns
    without error and its file is journaled, though the file is not written again."""
    with rig.replica() as rep, rig.mount() as mnt:
        path = rig.mountpoint / "inflight.dat"
        write_file(path, b"x" * RECORD)
        with continued_on_exit(rep):
            os.kill(rep.pid, signal.SIGSTOP)
            thread, result = blocked_call(lambda: _pwrite_file(path, record(0)), "one-write")
            time.sleep(0.5)
            assert thread.is_alive(), f"write returned before the replica acked it: {result}"
            assert mnt.status()["mode"] == "MIRROR"
            rep.kill()
            thread.join(TIMEOUT + MARGIN)
            assert not thread.is_alive(), "write still blocked after the replica died"
        assert "error" not in result, result
        assert result["value"] == RECORD
        assert result["seconds"] < TIMEOUT + MARGIN, result
        status = mnt.status()
        assert status["mode"] == "ALONE", status
        assert "inflight.dat" in status["journal"], status
        assert any(
            r["path"] == "inflight.dat" and r["kind"] == "data" and r["chunk"] == 0
            for r in journal_lines(rig.mount_state)
        ), journal_lines(rig.mount_state)
        assert path.read_bytes() == record(0)


def test_entry_changes_in_flight_when_replica_dies_journal_their_directories(rig: Rig) -> None:
    """I5 for names: a rename, create, mkdir, symlink, link and unlink sent but never
    acknowledged are journaled as "entry" changes of every directory whose names changed,
    as they are when made ALONE (docs/datapath.md)."""
    dirs = ("from", "to", "cdir", "mdir", "sdir", "ldir", "udir")
    mp = rig.mountpoint
    calls: dict[str, Callable[[], Any]] = {
        "rename": lambda: os.rename(mp / "from/f", mp / "to/f2"),
        "create": lambda: write_file(mp / "cdir/new", b""),
        "mkdir": lambda: (mp / "mdir/sub").mkdir(),
        "symlink": lambda: (mp / "sdir/link").symlink_to("target"),
        "link": lambda: os.link(mp / "udir/keep", mp / "ldir/hard"),
        "unlink": lambda: os.unlink(mp / "udir/gone"),
    }
    with rig.replica() as rep, rig.mount() as mnt:
        for d in dirs:
            (mp / d).mkdir()
        for name in ("from/f", "udir/keep", "udir/gone"):
            write_file(mp / name, b"data\n")
        with continued_on_exit(rep):
            os.kill(rep.pid, signal.SIGSTOP)
            running = {name: blocked_call(call, name) for name, call in calls.items()}
            time.sleep(0.5)
            assert mnt.status()["mode"] == "MIRROR"
            assert all(t.is_alive() for t, _ in running.values()), "a call returned unacked"
            rep.kill()
            for thread, _ in running.values():
                thread.join(TIMEOUT + MARGIN)
                assert not thread.is_alive(), f"{thread.name} still blocked"
        errors = {name: r["error"] for name, (_, r) in running.items() if "error" in r}
        assert not errors, errors
        assert mnt.status()["mode"] == "ALONE"
    records = journal_lines(rig.mount_state)
    entry_dirs = {r["path"] for r in records if r["kind"] == "entry"}
    missing = set(dirs) - entry_dirs
    assert not missing, f"directories whose names changed are not journaled: {missing}; {records}"


def test_hung_replica_write_returns_within_timeout_then_writes_are_fast(rig: Rig) -> None:
    """I5: a replica that stops answering (SIGSTOP) delays one write by at most the timeout;
    the mount goes ALONE and later writes do not wait for the peer."""
    with rig.replica() as rep, rig.mount() as mnt:
        path = rig.mountpoint / "hung.dat"
        write_file(path, b"")
        writer = RecordWriter(path, fsync_every=4)
        with continued_on_exit(rep):
            writer.start()
            try:
                wait_until(lambda: writer.acked >= 100 or writer.error is not None, 60, "records")
                stopped_at = time.monotonic()
                os.kill(rep.pid, signal.SIGSTOP)
                wait_until(
                    lambda: writer.acked >= 300 or writer.error is not None,
                    TIMEOUT + 20,
                    "writes to continue after the replica hung",
                )
            finally:
                writer.finish()
            status = mnt.status()
        assert writer.error is None, f"the application saw an error: {writer.error!r}"
        assert writer.slowest() < TIMEOUT + MARGIN, f"a call took {writer.slowest():.2f}s"
        assert writer.slowest() > TIMEOUT * 0.9, "no call waited for the hung peer's ack"
        slow_calls = [c for c in writer.calls if c.seconds > FAST_CALL]
        assert len(slow_calls) == 1, f"several calls waited for the hung peer: {slow_calls}"
        after = [c for c in writer.calls if c.start > slow_calls[0].start]
        assert len(after) >= 100 and max(c.seconds for c in after) < FAST_CALL
        assert slow_calls[0].start < stopped_at + FAST_CALL
        assert status["mode"] == "ALONE", status
        assert "acknowledge" in status["reason"], status
        assert "hung.dat" in status["journal"], status
        assert read_state(rig.mount_state)["mode"] == "ALONE"


# ------------------------------------------------------------------------------ 3. disk full


def test_replica_disk_full_app_unaffected_mount_alone(
    rig: Rig, small_tmpfs: Callable[[Path], Path]
) -> None:
    """The replica cannot apply a write (ENOSPC): the application's write still succeeds,
    the mount goes ALONE saying why, and the replica marks its copy not up to date."""
    small_tmpfs(rig.replica_dir)
    data = b"".join(record(i) for i in range(16 * (1 << 20) // RECORD))  # 16 MiB
    with rig.replica() as rep, rig.mount() as mnt:
        path = rig.mountpoint / "big.dat"
        start = time.monotonic()
        write_file(path, data)
        seconds = time.monotonic() - start
        status = mnt.status()
        assert status["mode"] == "ALONE", status
        assert "No space left" in status["reason"], status
        assert "big.dat" in status["journal"], status
        assert read_state(rig.mount_state)["mode"] == "ALONE"
        assert check_records(path.read_bytes(), "primary big.dat") == len(data) // RECORD
        assert seconds < 30 + TIMEOUT, f"16 MiB took {seconds:.1f}s"
        wait_until(lambda: read_state(rig.replica_state)["uptodate"] is False, 10, "uptodate")
        assert rep.status()["uptodate"] is False
        log = rep.log_path.read_text()
        assert "could not apply" in log and "[Errno 28]" in log, rep.log_tail()


def test_primary_disk_full_app_gets_enospc_replica_never_ahead(
    rig: Rig, small_tmpfs: Callable[[Path], Path]
) -> None:
    """The primary's own disk fills: the application gets ENOSPC, the replica never got data
    the primary does not have, both trees stay identical, and the mount stays MIRROR."""
    small_tmpfs(rig.primary_dir)
    chunk = b"".join(record(i) for i in range(256))  # 1 MiB
    with rig.replica() as rep, rig.mount() as mnt:
        path = rig.mountpoint / "fill.dat"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        written = 0
        failure: OSError | None = None
        try:
            for _ in range(16):
                try:
                    written += os.write(fd, chunk)
                except OSError as e:
                    failure = e
                    break
            with contextlib.suppress(OSError):
                os.fsync(fd)
        finally:
            os.close(fd)
        assert failure is not None, f"wrote {written} bytes to an 8 MiB file system"
        assert failure.errno == errno.ENOSPC, repr(failure)
        status = mnt.status()
        assert status["mode"] == "MIRROR", status
        assert status["journal"] == [], status

        primary_size = (rig.primary_dir / "fill.dat").stat().st_size
        replica_size = (rig.replica_dir / "fill.dat").stat().st_size
        assert replica_size <= primary_size, (replica_size, primary_size)
        assert primary_size == written, (primary_size, written)
        local = manifest.build_manifest(str(rig.primary_dir))
        remote = manifest.build_manifest(str(rig.replica_dir))
        assert manifest.compare(local, remote) == [], (
            "trees differ after a failed local write:\n"
            + "\n".join(manifest.compare(local, remote))
        )
        # The mount keeps mirroring: space freed, the next change reaches the replica.
        os.truncate(path, 1 << 20)
        write_file(rig.mountpoint / "after", b"after the full disk\n")
        assert (rig.replica_dir / "after").read_bytes() == b"after the full disk\n"
        assert (rig.replica_dir / "fill.dat").stat().st_size == 1 << 20
        assert mnt.status()["mode"] == "MIRROR"
        assert rep.status()["uptodate"] is True


# ------------------------------------------------------------------------------ 4. restart


def test_restart_after_alone_starts_alone_and_never_mirrors_to_the_stale_replica(
    rig: Rig,
) -> None:
    """ALONE survives clean restarts: the new mount does not connect to the replica, which
    missed changes, and keeps journaling. Restarted twice: a start that finds only an
    unclean end in state.json also persists ALONE, so the second start tests mode ALONE."""
    with rig.replica() as rep, rig.mount() as mnt:
        write_file(rig.mountpoint / "before", b"mirrored\n")
        rep.kill()
        write_file(rig.mountpoint / "while_alone", b"alone\n")
        assert mnt.status()["mode"] == "ALONE"
        assert mnt.stop() == 0, mnt.log_tail()
    assert read_state(rig.mount_state)["mode"] == "ALONE"
    assert not (rig.replica_dir / "while_alone").exists()

    journaled = {"while_alone"}
    for restart in (1, 2):
        with rig.replica() as rep, rig.mount() as mnt:
            status = mnt.status()
            assert status["mode"] == "ALONE", (restart, status)
            assert "resync" in status["reason"], (restart, status)
            write_file(rig.mountpoint / f"after_restart{restart}", b"still alone\n")
            os.truncate(rig.mountpoint / "before", 3 - restart)  # shrink each time
            journaled |= {f"after_restart{restart}", "before"}
            time.sleep(TIMEOUT)  # time to (wrongly) connect
            status = mnt.status()
            assert status["mode"] == "ALONE", (restart, status)
            assert journaled <= set(status["journal"]), (restart, status)
            assert rep.status()["sessions"] == 0, "the ALONE mount opened a stream to the replica"
            assert mnt.stop() == 0, mnt.log_tail()
        state = read_state(rig.mount_state)
        assert state["mode"] == "ALONE", (restart, state)
        assert not (rig.replica_dir / "while_alone").exists()
        assert not (rig.replica_dir / f"after_restart{restart}").exists()
        assert (rig.replica_dir / "before").read_bytes() == b"mirrored\n"
        assert (rig.primary_dir / "before").read_bytes() == b"mirrored\n"[: 3 - restart]


def test_restart_after_mount_crash_starts_alone(rig: Rig) -> None:
    """A mount that died mid-session restarts ALONE: writes in flight at the crash may be
    on one side only, so it must not resume mirroring without a resync."""
    with rig.replica() as rep:
        with rig.mount() as mnt:
            write_file(rig.mountpoint / "before", b"mirrored\n")
            assert read_state(rig.mount_state)["session_open"] is True
            mnt.kill()
            cluster.force_unmount(mnt.target)
        wait_until(lambda: replica_idle(rep), 10, "the replica to end the dead session")
        assert rep.status()["sessions"] == 1
        with rig.mount() as mnt:
            status = mnt.status()
            assert status["mode"] == "ALONE", status
            assert "unclean" in status["reason"], status
            write_file(rig.mountpoint / "after_crash", b"alone\n")
            time.sleep(TIMEOUT)
            assert mnt.status()["mode"] == "ALONE"
            assert "after_crash" in mnt.status()["journal"]
            assert rep.status()["sessions"] == 1, "the restarted mount mirrored to the replica"
            assert not (rig.replica_dir / "after_crash").exists()
        state = read_state(rig.mount_state)
        assert state["mode"] == "ALONE" and state["session_open"] is False, state
