"""The persistent MySQL rig, end to end, as an operator drives it (tools/rig, issue 5):
`up`, rows through the virtual IP from the client namespace, the states from inside the
nodes, `down` leaving nothing behind.

The rig has fixed names (hafs-node1 ...), unlike the per-test rigs of test_two_nodes.py, so
the fixture first takes down a rig a manual run may have left up.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from tools.riglib.node import REPO, VIP
from tools.riglib.rig import ALL, PREFIX, RIG_DIR

pytestmark = pytest.mark.mariadb

RIG = REPO / "tools/rig"
UP_TIMEOUT = 240.0


def rig(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(RIG), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def client_sql(query: str) -> str:
    reply = rig("exec", "client", "--", "mariadb", "-h", VIP, "-u", "hafs", "-phafs",
                "-N", "-B", "hafs", "-e", query)  # fmt: skip
    assert reply.returncode == 0, reply.stderr
    return reply.stdout


def state(node: str) -> dict[str, object]:
    reply = rig("exec", node, "--", ".venv/bin/hafs", "state", "-m", "mysql", "--json")
    assert reply.returncode == 0, reply.stderr
    return dict(json.loads(reply.stdout)[0])


def rig_namespaces() -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = {line.split()[0] for line in listed.splitlines() if line.strip()}
    return sorted(names & {PREFIX + n for n in (*ALL, "switch")})


@pytest.fixture
def mysql_rig() -> Iterator[None]:
    assert rig("down").returncode == 0  # a rig left up by hand
    try:
        up = rig("up", timeout=UP_TIMEOUT)
        assert up.returncode == 0, up.stdout + up.stderr
        yield
    finally:
        down = rig("down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert rig_namespaces() == []
        assert not RIG_DIR.exists()


def test_rows_through_the_vip_on_a_mirrored_pair(mysql_rig: None) -> None:
    n1, n2 = state("node1"), state("node2")
    assert (n1["state"], n1["colour"], n2["state"], n2["colour"]) == (
        "PRIM", "green", "SECOND", "green",
    )  # fmt: skip
    client_sql("CREATE TABLE t (id INT PRIMARY KEY, via VARCHAR(16)) ENGINE=InnoDB")
    for i in range(1, 21):  # autocommit: one acknowledged commit each
        client_sql(f"INSERT INTO t VALUES ({i}, 'autocommit')")
    values = ", ".join(f"({i}, 'transaction')" for i in range(21, 41))
    client_sql(f"START TRANSACTION; INSERT INTO t VALUES {values}; COMMIT")
    assert client_sql("SELECT COUNT(*), COUNT(DISTINCT id), MIN(id), MAX(id) FROM t").split() == [
        "40", "40", "1", "40",
    ]  # fmt: skip
    # The SECOND's copy has the table: the commits went through the replicated directory.
    assert (RIG_DIR / "node2/mysql/hafs/t.ibd").is_file()
    status = rig("status")
    assert status.returncode == 0 and "node1 PRIM (green)" in status.stdout, status.stdout
    # The client reaches the primary's MAC for the VIP: node1 answers ARP for it.
    client_neigh = rig("exec", "client", "--", "ip", "-j", "neigh", "show", VIP).stdout
    node1_link = rig("exec", "node1", "--", "ip", "-j", "link", "show", "eth0").stdout
    assert json.loads(client_neigh)[0]["lladdr"] == json.loads(node1_link)[0]["address"]
