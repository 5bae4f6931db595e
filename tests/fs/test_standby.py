"""`hafs fs mount --standby`, the SECOND's warm mount process: it mounts only once told
`go alone` or `go mirror` on stdin, in that mode, and leaves without mounting at the end of
its input (its daemon stopped or died) or on any other line."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator

import pytest

from hafs.mountinfo import force_unmount
from tests.support import cluster
from tests.support.cluster import Pair, wait_until


@contextlib.contextmanager
def standby(rig: Pair) -> Iterator[subprocess.Popen[bytes]]:
    rig.mount_state.mkdir(exist_ok=True)
    argv = [str(rig.hafs_bin), "fs", "mount", str(rig.primary_dir), "--peer", rig.peer,
            "--key", str(rig.key), "--state-dir", str(rig.mount_state),
            "--mountpoint", str(rig.mountpoint), "--timeout", str(rig.timeout), "--fence",
            "--standby"]  # fmt: skip
    with (rig.mount_state / "standby.log").open("ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log, stderr=log)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
        if cluster.is_mounted(rig.mountpoint):
            force_unmount(rig.mountpoint)


def told(proc: subprocess.Popen[bytes], line: bytes) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line)
    proc.stdin.close()


def test_standby_mounts_only_when_told_in_the_mode_it_is_told(rig: Pair) -> None:
    with rig.replica(), standby(rig) as proc:
        time.sleep(1.5)  # long enough to have mounted, had it not waited
        assert proc.poll() is None and not cluster.is_mounted(rig.mountpoint)
        told(proc, b"go mirror\n")
        wait_until(lambda: cluster.is_mounted(rig.mountpoint), 20, "the mount")
        wait_until(lambda: cluster.status(rig.mount_state)["mode"] == "MIRROR", 20, "MIRROR")
        (rig.mountpoint / "hello").write_bytes(b"replicated")
        assert (rig.replica_dir / "hello").read_bytes() == b"replicated"


@pytest.mark.parametrize("line", [b"", b"go sideways\n"], ids=["end of input", "bad line"])
def test_standby_leaves_without_mounting_unless_told_to_go(rig: Pair, line: bytes) -> None:
    with standby(rig) as proc:
        told(proc, line)
        assert proc.wait(30) == 0
        assert not cluster.is_mounted(rig.mountpoint)
    if line:
        assert "expected `go alone` or `go mirror`" in (rig.mount_state / "standby.log").read_text()


def test_standby_told_alone_journals(rig: Pair) -> None:
    with standby(rig) as proc:
        told(proc, b"go alone\n")
        wait_until(lambda: cluster.is_mounted(rig.mountpoint), 20, "the mount")
        wait_until(lambda: cluster.status(rig.mount_state)["mode"] == "ALONE", 20, "ALONE")
        (rig.mountpoint / "alone").write_bytes(b"journaled")
        assert "alone" in cluster.status(rig.mount_state)["journal"]
