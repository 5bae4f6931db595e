"""Failback (issue 4): the primary loses power during heavy writes, the survivor runs ALONE,
the old primary comes back as SECOND and is made identical, unacknowledged writes included."""

from __future__ import annotations

import re

from hafs import manifest
from tests.support.rig import Rig, establish, start_page_writer

DB_SIZE = 32 << 20


def test_primary_killed_during_writes_comes_back_identical(rig: Rig) -> None:
    n1, n2 = rig.node1, rig.node2
    establish(rig)
    start_page_writer(n1, DB_SIZE, fsync_every=16)
    n1.kill()  # power cut: in-flight writes exist on node1 only
    n2.wait_state("ALONE", colour="green", timeout=30)
    n2.inside(["sh", "-c", f"printf after > {n2.shared}/written-alone"])

    n1.boot()  # it was started before the power cut: the daemon starts it again
    n1.wait_state("SECOND", colour="green", timeout=120)
    n2.wait_state("PRIM", colour="green")
    differences = manifest.compare(
        manifest.build_manifest(str(n2.data)), manifest.build_manifest(str(n1.data))
    )
    assert differences == [], differences
    done = re.search(r"resync to node1 done .*: (\d+) files, (\d+) bytes copied", n2.module_log())
    assert done is not None, n2.tail()
    # node1's copy was cut mid-session: every file is compared by block hashes, and only
    # the blocks its unacknowledged writes changed (and the new file) are sent back.
    assert int(done[2]) < DB_SIZE // 4, done[0]
