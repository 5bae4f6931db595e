"""A peer joins a mount that is ALONE: `hafs fs mirror` resyncs it, then MIRROR (I6).

Real replica processes and real FUSE mounts (tests/support/cluster.py). The mount starts
`--alone` over a tree of files, directories, symlinks, hard links, FIFOs and xattrs; the
replica serves an empty directory or a stale one; `hafs fs mirror` must make the replica's
copy identical (`hafs fs verify`), keep every write made during and after it, and fail
cleanly (ALONE, journal intact, calls released) when the peer cannot follow.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hafs import blocks, manifest, protocol, wire
from tests.support import cluster
from tests.support.cluster import TIMEOUT
from tests.support.join import Join, wait_until
from tests.support.records import RecordWriter, check_records

UID, GID = 1234, 5678


# ------------------------------------------------------------------------------ helpers


def write_file(path: Path, data: bytes, flags: int = os.O_CREAT | os.O_TRUNC | os.O_WRONLY) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def populate(root: Path) -> None:
    """Every kind of entry and attribute the replica must reproduce."""
    (root / "d1/d2/d3").mkdir(parents=True)
    (root / "private").mkdir(mode=0o700)
    (root / "sticky").mkdir()
    (root / "sticky").chmod(0o1777)
    write_file(root / "small", b"small file\n")
    write_file(root / "empty", b"")
    write_file(root / "big.bin", os.urandom(3 << 20))  # three WRITE chunks and a bit
    with open(root / "sparse", "wb") as f:
        f.truncate(5 << 20)
        f.seek(2 << 20)
        f.write(b"island in a hole")
    write_file(root / "d1/d2/d3/deep", b"deep\n")
    write_file(os.path.join(os.fsencode(root), b"caf\xe9"), b"not UTF-8\n")  # type: ignore[arg-type]
    write_file(root / "setuid", b"#!/bin/sh\n")
    os.chown(root / "setuid", UID, GID)
    (root / "setuid").chmod(0o4755)
    os.chown(root / "d1/d2", UID, GID)
    os.link(root / "small", root / "d1/hard_small")  # a group across directories
    write_file(root / "d1/d2/h1", b"linked twice\n")
    os.link(root / "d1/d2/h1", root / "d1/d2/h2")
    (root / "d1/rel").symlink_to("../small")
    (root / "abs").symlink_to("/etc/hostname")
    (root / "dangling").symlink_to("nowhere/at/all")
    os.lchown(root / "dangling", UID, GID)
    os.mkfifo(root / "pipe", 0o640)
    os.setxattr(root / "small", "user.colour", b"blue")
    os.setxattr(root / "big.bin", "user.binary", bytes(range(256)))
    os.setxattr(root / "d1", "user.dir", b"yes")
    for i in range(20):  # identical on a stale replica: must not be copied again
        write_file(root / f"same{i:02}", os.urandom(64 << 10))
    _set_times(root)


def _set_times(root: Path) -> None:
    """Distinct old times, directories last (making entries changes their mtime)."""
    paths = sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    for i, path in enumerate([*paths, root]):
        t = 1_600_000_000_000_000_000 + i * 1_000_000_123
        os.utime(path, ns=(t, t), follow_symlinks=False)


def stale_copy(primary: Path, replica: Path) -> None:
    """The primary's tree, then changed in every way a stale replica can differ."""
    # No hard links, no FIFOs: copytree refuses them.
    shutil.copytree(
        primary, replica, symlinks=True, dirs_exist_ok=True, ignore=shutil.ignore_patterns("pipe")
    )
    os.mkfifo(replica / "pipe", 0o600)
    write_file(replica / "small", b"SMALL FILE\n")  # same size, other content
    write_file(replica / "big.bin", b"shorter")
    (replica / "empty").unlink()
    (replica / "empty/sub").mkdir(parents=True)  # a directory where a file should be
    write_file(replica / "empty/sub/x", b"x")
    shutil.rmtree(replica / "d1/d2")
    write_file(replica / "d1/d2", b"a file where a tree should be")
    for d in ("extra/a/b/c", "locked/inner"):
        (replica / d).mkdir(parents=True)
        write_file(replica / d / "f", b"only on the replica\n")
    (replica / "locked").chmod(0)
    os.link(replica / "same00", replica / "extra/link_to_same00")  # linked only here
    (replica / "d1/rel").unlink()
    (replica / "d1/rel").symlink_to("../big.bin")
    (replica / "abs").unlink()
    write_file(replica / "abs", b"a file where a symlink should be")
    (replica / "d1").chmod(0o700)
    os.chown(replica / "sticky", UID, GID)
    os.setxattr(replica / "small", "user.colour", b"red")
    os.setxattr(replica / "small", "user.extra", b"only here")
    os.removexattr(replica / "d1", "user.dir")
    os.utime(replica / "same01", ns=(1, 1))


def replica_state(join: Join) -> dict[str, Any]:
    state: dict[str, Any] = json.loads((join.replica_state / "state.json").read_text())
    return state


# ------------------------------------------------------------------------------ joins


def test_join_empty_replica_copies_the_tree_then_mirrors(join: Join) -> None:
    populate(join.primary_dir)
    mp = join.mountpoint
    with join.replica() as rep, join.mount(alone=True) as mnt:
        status = mnt.status()
        assert status["mode"] == "ALONE" and "--alone" in status["reason"], status
        assert rep.status()["synced"] is False
        assert rep.status()["sessions"] == 0, "an --alone mount connected"
        # Inodes the mount knows before the join, used after it: an open file, a deep
        # path, and a file unlinked while open.
        deep_fd = os.open(mp / "d1/d2/d3/deep", os.O_RDWR)
        orphan_fd = os.open(mp / "orphan", os.O_CREAT | os.O_RDWR, 0o600)
        os.unlink(mp / "orphan")
        write_file(mp / "made_alone", b"journaled\n")
        assert "made_alone" in mnt.status()["journal"]
        try:
            counters = join.mirror()
            status = mnt.status()
            assert status["mode"] == "MIRROR" and status["journal"] == [], status
            assert status["resync"]["phase"] == "done", status
            # small, empty, big.bin, sparse, deep, café, setuid, h1, made_alone and the
            # same* files: hard links count once.
            assert counters.files_copied == 9 + 20, counters
            # big.bin, the sparse file's one chunk with data, the same* files, a few bytes.
            sent = (3 << 20) + (1 << 20) + 20 * (64 << 10)
            assert sent < counters.bytes_sent < sent + 4096, f"holes sent? {counters}"
            assert rep.status()["synced"] is True
            assert replica_state(join)["uptodate"] is True
            join.assert_identical()
            assert join.mirror().files_copied == 0, "a second mirror while MIRROR copied"

            os.pwrite(deep_fd, b"DEEP", 0)
            os.fsync(deep_fd)
            os.pwrite(orphan_fd, b"still writable", 0)  # must not break the stream
            changes_after_join(mp)
            assert mnt.status()["mode"] == "MIRROR", mnt.status()
            join.assert_identical()
        finally:
            os.close(deep_fd)
            os.close(orphan_fd)
        assert mnt.status()["mode"] == "MIRROR", mnt.status()
        assert (join.replica_dir / "d1/d2moved/d3/deep").read_bytes() == b"DEEP\n"
    state = replica_state(join)
    assert state["uptodate"] is True and state["session_open"] is False, state


def test_join_with_the_mount_over_its_own_directory(join: Join) -> None:
    """As the controller mounts: the resync reads the tree under the mount, not through it."""
    populate(join.primary_dir)
    with (
        join.replica() as rep,
        cluster.mount(
            join.primary_dir,
            peer=join.peer,
            key=join.key,
            state_dir=join.mount_state,
            timeout=TIMEOUT,
            alone=True,
            hafs_bin=join.hafs_bin,
        ) as mnt,
    ):
        write_file(join.primary_dir / "made_alone", b"through the mount\n")
        assert join.mirror().files_copied == 9 + 20
        changes_after_join(join.primary_dir)
        join.assert_identical()
        assert mnt.status()["mode"] == "MIRROR" and rep.status()["synced"] is True


def changes_after_join(mp: Path) -> None:
    """One call of each mutating kind, through the mount."""
    write_file(mp / "after", b"written after the join\n")
    os.rename(mp / "d1/d2", mp / "d1/d2moved")
    (mp / "private").chmod(0o750)
    os.setxattr(mp / "d1", "user.after", b"1")
    os.removexattr(mp / "small", "user.colour")
    os.link(mp / "after", mp / "private/after_link")
    (mp / "newlink").symlink_to("after")
    (mp / "same03").unlink()
    os.truncate(mp / "big.bin", 1 << 20)
    (mp / "newdir").mkdir()
    (mp / "sticky").rmdir()
    os.utime(mp / "same04", ns=(5, 5))


def test_join_stale_replica_removes_extra_and_fixes_every_difference(join: Join) -> None:
    populate(join.primary_dir)
    stale_copy(join.primary_dir, join.replica_dir)
    with join.replica() as rep, join.mount(alone=True) as mnt:
        counters = join.mirror()
        join.assert_identical()
        # Content sent for: d1/hard_small (small is linked to it: the replica had two
        # inodes), big.bin, empty, deep and h1 (under d1/d2, a file on the replica; h2 is
        # linked), same00 (linked to an extra name on the replica). The other same* files
        # were there already.
        assert counters.files_copied == 6, counters
        assert rep.status()["synced"] is True
        assert not (join.replica_dir / "locked").exists()
        write_file(join.mountpoint / "d1/d2/after", b"after\n")
        join.assert_identical()
        assert mnt.status()["mode"] == "MIRROR"


def sample_phases(mnt: cluster.MountProc, writer: RecordWriter, stop: threading.Event,
                  samples: list[tuple[str, int]]) -> None:  # fmt: skip
    """Until stopped: (the resync's phase, records the writer completed), every 10 ms."""
    while not stop.wait(0.01):
        with contextlib.suppress(cluster.ClusterError):
            phase = str(mnt.status()["resync"].get("phase", ""))
            samples.append((phase, writer.acked))


def test_writer_during_mirror_loses_nothing(join: Join) -> None:
    """The application writes on while the copy runs: its writes complete while pass 1
    copies, wait at most the last (paused) pass, and every record it wrote is on the
    replica after."""
    for i in range(64):
        write_file(join.primary_dir / f"bulk{i:02}", os.urandom(1 << 20))
    with join.replica() as rep, join.mount(alone=True) as mnt:
        writer = RecordWriter(join.mountpoint / "stream.dat", max_records=50_000).start()
        samples: list[tuple[str, int]] = []
        stop = threading.Event()
        sampler = threading.Thread(target=sample_phases, args=(mnt, writer, stop, samples))
        try:
            wait_until(lambda: writer.acked >= 200 or writer.error is not None, 60, "records")
            sampler.start()
            before = writer.acked
            counters = join.mirror()
            stop.set()
            sampler.join(10)
            after = writer.acked
            wait_until(lambda: writer.acked >= after + 300 or writer.error is not None,
                       60, "records after the join")  # fmt: skip
        finally:
            stop.set()
            writer.finish(30)
        assert writer.error is None, f"the application saw {writer.error!r}"
        assert after > before, "no write completed while the mirror command ran"
        copying = [acked for phase, acked in samples if phase == "pass 1: copying"]
        assert len(copying) >= 2 and copying[-1] > copying[0], (
            "no write completed while pass 1 copied",
            samples[:: max(1, len(samples) // 20)],
        )
        assert counters.passes >= 2, counters  # pass 1 live, then the paused one
        assert writer.slowest() < counters.paused_seconds + TIMEOUT, (writer.slowest(), counters)
        assert counters.files_copied == 65, counters  # the bulk files and stream.dat, once each
        progress = mnt.status()["resync"]  # what the daemon logs as percent and MB/s
        assert 64 << 20 <= progress["bytes_done"] <= progress["bytes_planned"], progress
        assert mnt.status()["mode"] == "MIRROR"
        n = check_records((join.primary_dir / "stream.dat").read_bytes(), "primary")
        assert n == writer.acked
        assert check_records((join.replica_dir / "stream.dat").read_bytes(), "replica") == n
        join.assert_identical()
        assert rep.status()["synced"] is True


def test_alone_then_mirror_again_copies_only_what_changed(join: Join) -> None:
    for i in range(30):
        write_file(join.primary_dir / f"f{i:02}", os.urandom(256 << 10))
    with join.replica() as rep, join.mount(alone=True) as mnt:
        assert join.mirror().files_copied == 30
        result = join.alone("heartbeats lost")
        assert result.returncode == 0, result.stderr
        status = mnt.status()
        assert status["mode"] == "ALONE" and status["reason"] == "heartbeats lost", status
        assert join.alone("again").returncode == 0, "alone is not idempotent"
        assert mnt.status()["reason"] == "heartbeats lost"
        wait_until(lambda: rep.status()["synced"] is False, 10, "the replica to see the end")

        write_file(join.mountpoint / "f03", b"changed while alone\n")
        write_file(join.mountpoint / "f17", b"changed too\n")
        write_file(join.mountpoint / "new", b"new while alone\n")
        (join.mountpoint / "f20").unlink()
        assert {"f03", "f17", "new"} <= set(mnt.status()["journal"])
        assert not (join.replica_dir / "new").exists()

        counters = join.mirror()
        assert counters.files_copied == 3, counters
        assert counters.files_checked == 31, counters  # 29 old + new + the root
        assert mnt.status()["journal"] == []
        assert rep.status()["synced"] is True
        join.assert_identical()


# ------------------------------------------------------------------------------ failures


def test_mirror_to_a_dead_peer_fails_and_stays_alone(join: Join) -> None:
    """Nothing listens: mirror fails at once, the mount stays ALONE with the reason and
    its journal, keeps serving writes; once a replica runs, mirror succeeds."""
    populate(join.primary_dir)
    with join.mount(alone=True) as mnt:
        write_file(join.mountpoint / "before", b"alone\n")
        start = time.monotonic()
        result = join.hafs("fs", "mirror", "--state-dir", str(join.mount_state))
        seconds = time.monotonic() - start
        assert result.returncode == 1, result
        assert "mirror failed" in result.stderr and "refused" in result.stderr, result.stderr
        assert seconds < 10 + TIMEOUT, seconds
        status = mnt.status()
        assert status["mode"] == "ALONE", status
        assert status["reason"].startswith("resync failed"), status
        start = time.monotonic()
        write_file(join.mountpoint / "after", b"still alone\n")
        assert time.monotonic() - start < TIMEOUT
        assert {"before", "after"} <= set(mnt.status()["journal"])
        assert json.loads((join.mount_state / "state.json").read_text())["mode"] == "ALONE"

        with join.replica() as rep:
            join.mirror()
            join.assert_identical()
            assert rep.status()["synced"] is True


def test_replica_failing_mid_copy_releases_paused_writers(
    join: Join, small_tmpfs: Callable[[Path], Path]
) -> None:
    """The replica's disk fills during the copy: mirror fails, the paused writer goes on
    ALONE without error, its file is journaled, and the replica says it is not synced."""
    small_tmpfs(join.replica_dir)
    for i in range(4):
        write_file(join.primary_dir / f"bulk{i}", os.urandom(4 << 20))  # 16 MiB > 8 MiB
    with join.replica() as rep, join.mount(alone=True) as mnt:
        writer = RecordWriter(join.mountpoint / "stream.dat", max_records=50_000).start()
        try:
            wait_until(lambda: writer.acked >= 100 or writer.error is not None, 60, "records")
            result = join.hafs("fs", "mirror", "--state-dir", str(join.mount_state))
            at_failure = writer.acked
            wait_until(lambda: writer.acked >= at_failure + 100 or writer.error is not None,
                       30, "records after the failed mirror")  # fmt: skip
        finally:
            writer.finish(30)
        assert result.returncode == 1, result
        assert "No space left" in result.stderr, result.stderr
        assert writer.error is None, f"the application saw {writer.error!r}"
        status = mnt.status()
        assert status["mode"] == "ALONE", status
        assert "stream.dat" in status["journal"], status
        assert status["resync"]["phase"] == "failed", status
        assert rep.status()["synced"] is False
        assert replica_state(join)["uptodate"] is False
        n = check_records((join.primary_dir / "stream.dat").read_bytes(), "primary")
        assert n == writer.acked


def test_commands_refused_where_they_make_no_sense(join: Join, tmp_path: Path) -> None:
    """mirror/alone on a standalone mount, commands to a replica, bad requests; a client
    that sends nothing (and never half-closes) still gets the status."""
    standalone_state = tmp_path / "ss"
    with join.replica() as rep, cluster.mount(
        join.primary_dir, state_dir=standalone_state, mountpoint=join.mountpoint,
        hafs_bin=join.hafs_bin,
    ):  # fmt: skip
        for cmd in ("mirror", "alone"):
            result = join.hafs("fs", cmd, "--state-dir", str(standalone_state))
            assert result.returncode == 1, result
            assert "standalone" in result.stderr, result.stderr
        reply = cluster.command(join.replica_state, {"cmd": "mirror"})
        assert reply == {"ok": False, "message": "this process takes no commands"}
        bad = cluster.command(standalone_state, {"cmd": "fly"})
        assert bad["ok"] is False and "unknown command" in bad["message"], bad
        assert cluster.command(standalone_state, {"cmd": "status"})["mode"] == "STANDALONE"

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(rep.state_dir / cluster.STATUS_SOCK))
            assert json.loads(s.makefile("rb").readline())["role"] == "replica"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(standalone_state / cluster.STATUS_SOCK))
            s.sendall(b"not json\n")
            reply = json.loads(s.makefile("rb").readline())
            assert reply["ok"] is False and "bad request" in reply["message"], reply
    result = join.hafs("fs", "mount", str(join.primary_dir), "--standalone", "--alone")
    assert result.returncode == 2 and "--alone needs --peer" in result.stderr, result


class StuckReplica:
    """A replica server that answers VERIFY with an empty tree and accepts the MIRROR
    stream but never reads it: the resync stalls while "connecting" (its first op, a
    barrier, is never acknowledged), with the application's writes going on, until the
    mount's watchdog, an `alone` command or a SIGTERM ends it."""

    def __init__(self, port: int, key: Path, empty_dir: Path) -> None:
        self.key = protocol.read_key(str(key))
        self.manifest = manifest.to_bytes(manifest.build_manifest(str(empty_dir)))
        self.empty_dir = empty_dir
        self.listener = socket.create_server(("127.0.0.1", port))
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, name="stuck-replica", daemon=True)

    def __enter__(self) -> StuckReplica:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() does not
        self.listener.close()
        for conn in self.held:
            conn.close()
        self.thread.join(10)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            keys, purpose = wire.server_handshake(conn, self.key)
            if purpose is not protocol.Purpose.VERIFY:
                self.held.append(conn)  # never read
                continue
            with conn:
                writer = protocol.FrameWriter(keys.send)
                (request,) = wire.recv_frames(conn, protocol.FrameReader(keys.recv))
                if request.ftype is protocol.FrameType.BLOCKS_REQ:  # is the copy exact? no
                    fd = os.open(self.empty_dir, os.O_RDONLY | os.O_DIRECTORY)
                    asked = blocks.BlockRequest.from_bytes(bytes(request.payload))
                    answer = blocks.reply(fd, asked, exact=False)
                    os.close(fd)
                    conn.sendall(b"".join(writer.seal(protocol.FrameType.BLOCKS, answer)))
                    conn.sendall(b"".join(writer.seal(protocol.FrameType.BLOCKS)))
                    continue
                conn.sendall(b"".join(writer.seal(protocol.FrameType.MANIFEST, self.manifest)))
                conn.sendall(b"".join(writer.seal(protocol.FrameType.MANIFEST)))


class HoldingProxy:
    """Forwards connections to a real replica, but holds the requests for partial
    manifests made after a MIRROR session opened (never forwarded nor answered): the
    passes after the first, which compare the journaled paths, then stall."""

    def __init__(self, port: int, target: int) -> None:
        self.target, self.mirror_seen = target, False
        self.listener = socket.create_server(("127.0.0.1", port))
        self.conns: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._serve, daemon=True)]

    def __enter__(self) -> HoldingProxy:
        self.threads[0].start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        for thread in self.threads:
            thread.join(10)

    def _serve(self) -> None:
        for _ in range(100):
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            self.conns.append(upstream)
            conn.sendall(_recv_exact(upstream, protocol.HELLO.size))
            auth = _recv_exact(conn, protocol.AUTH.size)
            purpose = protocol.Purpose(protocol.AUTH.unpack(auth)[1])
            self.mirror_seen |= purpose is protocol.Purpose.MIRROR
            upstream.sendall(auth)
            conn.sendall(_recv_exact(upstream, protocol.AUTH_OK.size))
            if purpose is protocol.Purpose.VERIFY:
                first = _first_frame(conn)
                if self.mirror_seen and b'"paths"' in first:
                    continue  # held: never forwarded, never answered
                upstream.sendall(first)
            upstream.settimeout(None)
            for a, b in ((conn, upstream), (upstream, conn)):
                pipe = threading.Thread(target=_pipe, args=(a, b), daemon=True)
                self.threads.append(pipe)
                pipe.start()


def _first_frame(conn: socket.socket) -> bytes:
    """The client's first frame, whole (its payload is plain: only MACed)."""
    header = _recv_exact(conn, protocol.HEADER.size)
    length = protocol.HEADER.unpack(header)[2]
    return header + _recv_exact(conn, length + protocol.MAC_LEN)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed during the handshake")
        data += chunk
    return data


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(1 << 16):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


@dataclass
class StuckCopy:
    """A mirror command under way against a stalled replica, and one call made meanwhile."""

    mirror: subprocess.Popen[str]
    call: threading.Thread
    outcome: dict[str, Any]


@contextlib.contextmanager
def stuck_copy(join: Join, mnt: cluster.MountProc, phase: str) -> Iterator[StuckCopy]:
    """`hafs fs mirror` stalled in `phase`, and a mkdir made once it is: it waits there
    if the phase pauses the calls, else it completes."""
    mirror = subprocess.Popen(
        [str(join.hafs_bin), "fs", "mirror", "--state-dir", str(join.mount_state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Opened now: a lookup in a directory where a paused call is making a name waits for
    # that call (the kernel's directory lock), but reads of open files go on.
    reader = os.open(join.mountpoint / "bulk0", os.O_RDONLY)
    try:
        wait_until(lambda: mnt.status()["resync"].get("phase") == phase, 20, phase)
        outcome: dict[str, Any] = {}

        def call() -> None:
            try:
                # One request (its lookup goes first and is not paused): a stopping mount
                # answers the requests under way, not the ones after.
                (join.mountpoint / "paused").mkdir()
                outcome["done"] = time.monotonic()
            except OSError as e:
                outcome["error"] = e

        made = threading.Thread(target=call, name="mkdir-during-copy", daemon=True)
        made.start()
        made.join(0.5)
        assert len(os.pread(reader, 1 << 20, 0)) == 1 << 20, "reads must go on"
        yield StuckCopy(mirror, made, outcome)
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN once the mount stopped
            os.close(reader)
        if mirror.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                mirror.communicate(timeout=30)
        if mirror.poll() is None:
            mirror.kill()
            mirror.wait()


def bulk(root: Path, files: int = 8) -> None:
    """More than the resync's window of 16 MiB in flight, so a stalled replica stalls it."""
    for i in range(files):
        write_file(root / f"bulk{i}", os.urandom(4 << 20))


def test_stalled_replica_fails_the_mirror_within_the_timeout(join: Join) -> None:
    bulk(join.primary_dir)
    with StuckReplica(join.port, join.key, join.replica_dir), join.mount(alone=True) as mnt:
        start = time.monotonic()
        result = join.hafs("fs", "mirror", "--state-dir", str(join.mount_state))
        seconds = time.monotonic() - start
        assert result.returncode == 1, result
        assert "did not acknowledge" in result.stderr, result.stderr
        assert seconds < 10 + 2 * TIMEOUT, seconds
        assert mnt.status()["mode"] == "ALONE"
        start = time.monotonic()
        write_file(join.mountpoint / "after", b"alone again\n")
        assert time.monotonic() - start < TIMEOUT
        assert "after" in mnt.status()["journal"]


def test_alone_during_a_stalled_copy_ends_it_and_keeps_the_journal(join: Join) -> None:
    """The controller's move when heartbeats stop mid-resync: `alone` ends the copy. The
    application was not held: the first pass copies while it writes."""
    bulk(join.primary_dir)
    with (
        StuckReplica(join.port, join.key, join.replica_dir),
        join.mount(alone=True, timeout=60) as mnt,
        stuck_copy(join, mnt, "connecting") as copy,
    ):
        assert not copy.call.is_alive() and "done" in copy.outcome, "a call waited for pass 1"
        result = join.alone("heartbeats lost")
        assert result.returncode == 0, result.stderr
        _, stderr = copy.mirror.communicate(timeout=TIMEOUT + 10)
        assert copy.mirror.returncode == 1 and "heartbeats lost" in stderr, stderr
        status = mnt.status()
        assert status["mode"] == "ALONE" and status["reason"] == "heartbeats lost", status
        assert "." in status["journal"], status  # the directory where a name was made
        assert (join.primary_dir / "paused").is_dir()


def test_alone_during_a_stalled_last_pass_releases_the_paused_calls(join: Join) -> None:
    """The last pass holds the calls: if the peer stalls there, `alone` releases them."""
    bulk(join.primary_dir, files=2)
    real = cluster.free_port()
    with (
        cluster.replica(join.replica_dir, listen=f"127.0.0.1:{real}", key=join.key,
                        state_dir=join.replica_state, hafs_bin=join.hafs_bin),
        HoldingProxy(join.port, real),
        join.mount(alone=True, timeout=60, extra_args=("--live-passes", "1")) as mnt,
        stuck_copy(join, mnt, "pass 2: comparing the journaled paths") as copy,
    ):  # fmt: skip
        assert copy.call.is_alive(), f"a mutating call went through the last pass: {copy.outcome}"
        asked = time.monotonic()
        result = join.alone("heartbeats lost")
        assert result.returncode == 0, result.stderr
        copy.call.join(10)
        assert not copy.call.is_alive() and "error" not in copy.outcome, copy.outcome
        assert copy.outcome["done"] - asked < TIMEOUT
        _, stderr = copy.mirror.communicate(timeout=30)
        assert copy.mirror.returncode == 1 and "heartbeats lost" in stderr, stderr
        status = mnt.status()
        assert status["mode"] == "ALONE" and status["reason"] == "heartbeats lost", status
        assert "." in status["journal"], status
        assert (join.primary_dir / "paused").is_dir()


def test_sigterm_during_a_stalled_copy_unmounts_cleanly(join: Join) -> None:
    bulk(join.primary_dir)
    with (
        StuckReplica(join.port, join.key, join.replica_dir),
        join.mount(alone=True, timeout=60) as mnt,
        stuck_copy(join, mnt, "connecting") as copy,
    ):
        assert mnt.stop() == 0, mnt.log_tail()
        copy.call.join(10)
        assert "error" not in copy.outcome, copy.outcome
        _, stderr = copy.mirror.communicate(timeout=30)
        assert copy.mirror.returncode == 1, stderr
        assert not cluster.is_mounted(join.mountpoint)
    state = json.loads((join.mount_state / "state.json").read_text())
    assert state["mode"] == "ALONE" and state["session_open"] is False, state
    assert (join.primary_dir / "paused").is_dir()


def resync_line(stdout: str) -> dict[str, str]:
    """The fields of `hafs fs resync`'s last line, which scripts parse."""
    line = stdout.splitlines()[-1]
    assert line.startswith("resync: "), stdout
    fields = dict(pair.split("=") for pair in line.removeprefix("resync: ").split())
    assert list(fields) == ["files_checked", "files_copied", "bytes_sent", "seconds"], line
    return fields


def test_resync_by_hand_of_an_unmounted_directory(join: Join) -> None:
    """The application stopped, nothing mounted: `hafs fs resync` copies the tree to the
    replica through a private mount it removes after; a second run copies nothing."""
    populate(join.primary_dir)
    args = ["fs", "resync", str(join.primary_dir), "--peer", join.peer, "--key", str(join.key),
            "--state-dir", str(join.mount_state)]  # fmt: skip
    with join.replica() as rep:
        first = join.hafs(*args)
        assert first.returncode == 0, first.stderr + first.stdout
        assert int(resync_line(first.stdout)["files_copied"]) > 0
        join.assert_identical()
        assert rep.status()["synced"] is False, "its mount is gone: the copy is not mirrored"
        assert not cluster.fuse_mounts_under(join.mount_state.parent.parent)
        again = join.hafs(*args)
        assert again.returncode == 0, again.stderr + again.stdout
        assert resync_line(again.stdout)["files_copied"] == "0", again.stdout
        full = join.hafs(*args, "--full")
        assert full.returncode == 0 and "whole trees" in full.stdout, full.stdout


def test_resync_by_hand_of_a_mounted_directory(join: Join) -> None:
    """A mounted directory resyncs through its own mount, which then mirrors; a peer other
    than the mount's is refused."""
    populate(join.primary_dir)
    args = ["fs", "resync", str(join.primary_dir), "--key", str(join.key),
            "--state-dir", str(join.mount_state)]  # fmt: skip
    with join.replica(), join.mount(alone=True) as mnt:
        wrong = join.hafs(*args, "--peer", f"127.0.0.1:{cluster.free_port()}")
        assert wrong.returncode != 0 and "is mounted with peer" in wrong.stderr, wrong
        result = join.hafs(*args, "--peer", join.peer)
        assert result.returncode == 0, result.stderr + result.stdout
        assert int(resync_line(result.stdout)["files_checked"]) > 0
        assert mnt.status()["mode"] == "MIRROR"
        join.assert_identical()


def test_maxrate_caps_the_copy(join: Join) -> None:
    """`--maxrate 8` (MB/s, the daemon's reiallowedbw): 24 MB cannot be sent in under 3 s;
    no floor is asserted (a slow machine only makes it longer)."""
    for i in range(6):
        write_file(join.primary_dir / f"bulk{i}", os.urandom(4 << 20))
    with join.replica(), join.mount(alone=True, extra_args=("--maxrate", "8")):
        counters = join.mirror()
        assert counters.bytes_sent == 24 << 20, counters
        assert counters.seconds >= 24 * 1.048576 / 8 * 0.9, counters
        join.assert_identical()


def test_last_pass_that_cannot_narrow_runs_a_live_whole_pass_first(join: Join) -> None:
    """A file written during pass 1 has a hard link outside the journaled paths: the
    journal cannot narrow the paused pass, so a live pass compares the whole trees first
    and the application's writes are not held while both trees are read."""
    bulk(join.primary_dir)
    (join.primary_dir / "x").mkdir()
    (join.primary_dir / "y").mkdir()
    write_file(join.primary_dir / "x/h1", b"linked\n")
    os.link(join.primary_dir / "x/h1", join.primary_dir / "y/h2")
    with join.replica(), join.mount(alone=True, extra_args=("--live-passes", "1")) as mnt:
        mirror = subprocess.Popen(
            [str(join.hafs_bin), "fs", "mirror", "--state-dir", str(join.mount_state)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            wait_until(lambda: mnt.status()["resync"].get("phase") == "pass 1: copying", 30,
                       "pass 1")  # fmt: skip
            write_file(join.mountpoint / "x/h1", b"changed during pass 1\n")
            out, err = mirror.communicate(timeout=120)
        finally:
            if mirror.poll() is None:
                mirror.kill()
                mirror.wait()
        assert mirror.returncode == 0, err
        resync = mnt.status()["resync"]
        # Live whole, paused (cannot narrow: nothing sent), live whole, paused.
        assert resync["passes"] == 4, resync
        assert "outside the journaled paths" in resync["full_reason"], resync
        assert (join.replica_dir / "y/h2").read_bytes() == b"changed during pass 1\n"
        join.assert_identical()
