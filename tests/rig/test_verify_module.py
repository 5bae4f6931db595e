"""`hafs verify -m` on the PRIM while the application writes (issue 4): identical despite the
writes, a change made on the SECOND's copy behind hafs's back is reported, `--repair` makes
it identical with the pair still PRIM/SECOND green, and any other node refuses."""

from __future__ import annotations

from tests.support.rig import MODULE, Rig, establish, start_page_writer


def test_verify_reports_a_change_behind_hafs_and_repairs_it_online(rig: Rig) -> None:
    n1, n2 = rig.node1, rig.node2
    establish(rig)
    for i in range(4):
        n1.inside(["sh", "-c", f"printf 'content {i}' > {n1.shared}/file-{i}"])
    start_page_writer(n1, 4 << 20)

    clean = n1.hafs("verify", "-m", MODULE)
    assert f"{MODULE}: {n1.shared}: identical:" in clean.stdout, clean.stdout

    (n2.data / "file-1").write_text("changed behind hafs")
    found = n1.hafs("verify", "-m", MODULE, check=False)
    assert found.returncode == 1, found.stdout + found.stderr
    assert f"{MODULE}: {n1.shared}: differs: file-1: " in found.stdout, found.stdout
    assert "db.dat" not in found.stdout.replace("busy (being written; not compared): db.dat", "")
    assert "verify" in n1.module_log() and "paths differ: file-1" in n1.module_log()

    refused = n2.hafs("verify", "-m", MODULE, check=False)
    assert refused.returncode == 2 and "PRIM" in refused.stderr, refused.stderr

    repaired = n1.hafs("verify", "-m", MODULE, "--repair", check=False)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "repair: repaired 1 paths" in repaired.stdout, repaired.stdout
    assert (n2.data / "file-1").read_text() == "content 1"
    assert n1.inside(["pgrep", "-f", "db.dat"], check=False).returncode == 0  # still writing
    n1.inside(["touch", f"{n1.shared}/stop"])
    assert n1.state()["state"] == "PRIM" and n1.state()["colour"] == "green"
    assert n2.state()["state"] == "SECOND" and n2.state()["colour"] == "green"
    assert "resync to" not in n1.module_log().split("verify against")[-1]  # no resync
