"""A resync interrupted half-way (either side killed) restarts safely and converges (I6, I7).

Real replica and mount processes (tests/support/cluster.py): a tree larger than the resync's
window, the copy killed once a part of it was sent, then started again.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from tests.support.join import Join, wait_until

BULK_FILES, BULK_SIZE = 40, 4 << 20  # 160 MiB: the copy lasts long enough to be cut


def bulk(root: Path) -> None:
    for i in range(BULK_FILES):
        (root / f"bulk{i:02}").write_bytes(os.urandom(BULK_SIZE))


def mirror_in_background(join: Join) -> subprocess.Popen[str]:
    argv = [str(join.hafs_bin), "fs", "mirror", "--state-dir", str(join.mount_state)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def sent(status: dict[str, object]) -> int:
    resync = status.get("resync")
    return int(resync.get("bytes_sent", 0)) if isinstance(resync, dict) else 0


def test_mount_killed_mid_copy_then_restarted_converges(join: Join) -> None:
    bulk(join.primary_dir)
    with join.replica() as rep:
        with join.mount(alone=True) as mnt:
            mirror = mirror_in_background(join)
            wait_until(lambda: sent(mnt.status()) > 3 * BULK_SIZE, 60, "a part of the copy")
            assert mnt.proc is not None
            mnt.proc.send_signal(signal.SIGKILL)
            _, stderr = mirror.communicate(timeout=30)
            assert mirror.returncode != 0, stderr
        wait_until(lambda: rep.status()["synced"] is False, 10, "the replica to see the end")
        assert rep.status()["uptodate"] is False, "marked up to date before the copy ended"
        with join.mount(alone=True):
            again = join.hafs("fs", "mirror", "--state-dir", str(join.mount_state))
            assert again.returncode == 0, again.stderr
            assert "whole trees" in again.stdout, again.stdout  # the journal is unclean
            join.assert_identical()
        assert rep.status()["uptodate"] is True


def test_replica_killed_mid_copy_then_restarted_converges(join: Join) -> None:
    bulk(join.primary_dir)
    with join.mount(alone=True) as mnt:
        with join.replica() as rep:
            mirror = mirror_in_background(join)
            wait_until(lambda: sent(mnt.status()) > 3 * BULK_SIZE, 60, "a part of the copy")
            assert rep.proc is not None
            rep.proc.send_signal(signal.SIGKILL)
            _, stderr = mirror.communicate(timeout=60)
            assert mirror.returncode == 1, stderr
        assert mnt.status()["mode"] == "ALONE"
        (join.mountpoint / "written-meanwhile").write_text("while the replica was down\n")
        with join.replica() as rep:
            assert rep.status()["uptodate"] is False, "marked up to date before the copy ended"
            again = join.hafs("fs", "mirror", "--state-dir", str(join.mount_state))
            assert again.returncode == 0, again.stderr
            join.assert_identical()
            assert rep.status()["synced"] is True
