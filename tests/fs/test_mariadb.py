"""MariaDB 10.11 with its datadir on a replicated hafs mount: the product's first user."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from hafs import manifest
from tests.conftest import Mirror
from tests.support import cluster
from tests.support.mariadb import MariaDB

pytestmark = pytest.mark.mariadb

TABLES = 2
ROWS = 2000


def _table_facts(db: MariaDB) -> dict[str, str]:
    """Row count and checksum of every user table: what a restarted server must find."""
    names = db.sql(
        "SELECT CONCAT(table_schema, '.', table_name) FROM information_schema.tables "
        "WHERE table_schema IN ('sbtest', 'hafs') ORDER BY 1"
    ).split()
    facts = {}
    for name in names:
        count = db.sql(f"SELECT COUNT(*) FROM {name}").strip()
        checksum = db.sql(f"CHECKSUM TABLE {name}").split()[-1]
        facts[name] = f"{count} rows, checksum {checksum}"
    return facts


def _stop_replica(mirror: Mirror) -> None:
    mirror.replica.stop()
    assert not mirror.replica.running()


def test_mariadb_on_replicated_mount_and_restart_on_replica(mirror: Mirror) -> None:
    datadir = mirror.mountpoint / "mysql"
    with MariaDB(datadir=datadir) as db:
        db.sql("CREATE DATABASE hafs; CREATE TABLE hafs.t (id INT PRIMARY KEY, v TEXT)")
        db.sql("INSERT INTO hafs.t VALUES " + ",".join(f"({i}, 'row {i}')" for i in range(500)))
        result = db.sysbench("oltp_write_only", threads=4, seconds=8, tables=TABLES, rows=ROWS)
        assert result["tps"] > 0
        facts = _table_facts(db)
    assert len(facts) == TABLES + 1
    assert mirror.mount.status()["mode"] == "MIRROR"

    differences = manifest.compare(
        manifest.build_manifest(str(mirror.mountpoint)),
        manifest.build_manifest(str(mirror.replica_dir)),
    )
    assert differences == []

    _stop_replica(mirror)
    with MariaDB(datadir=mirror.replica_dir / "mysql") as replica_db:
        assert _table_facts(replica_db) == facts


def _insert_until_killed(db: MariaDB, mirror: Mirror, seconds: float) -> list[int]:
    """Autocommit inserts from one client; returns the ids whose commit returned."""
    client = subprocess.Popen(
        [
            db.client,
            "--no-defaults",
            f"--socket={db.socket}",
            "-uroot",
            "-N",
            "-B",
            "--unbuffered",
            "hafs",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert client.stdin is not None and client.stdout is not None
    acknowledged: list[int] = []
    deadline = time.monotonic() + seconds
    try:
        for i in range(1, 100_000):
            client.stdin.write(f"INSERT INTO t VALUES ({i}, REPEAT('x', 2000)); SELECT {i};\n")
            client.stdin.flush()
            if client.stdout.readline().strip() != str(i):
                break
            acknowledged.append(i)
            if time.monotonic() > deadline:
                # Power loss of the primary: the mount and the database die together.
                os.kill(mirror.mount.pid, signal.SIGKILL)
                db.kill()
                break
    finally:
        client.kill()
        client.wait(10)
    return acknowledged


def test_primary_killed_under_commits_replica_recovers_every_acknowledged_commit(
    mirror: Mirror,
) -> None:
    db = MariaDB(datadir=mirror.mountpoint / "mysql")
    try:
        db.start()
        db.sql("CREATE DATABASE hafs; CREATE TABLE hafs.t (id INT PRIMARY KEY, v TEXT)")
        acknowledged = _insert_until_killed(db, mirror, seconds=4)
    finally:
        db.close()
        cluster.force_unmount(mirror.mountpoint)
    assert len(acknowledged) > 50, "the workload did not run"

    _stop_replica(mirror)
    with MariaDB(datadir=mirror.replica_dir / "mysql") as replica_db:
        found = {int(x) for x in replica_db.sql("SELECT id FROM hafs.t").split()}
    missing = sorted(set(acknowledged) - found)
    assert missing == [], f"acknowledged commits lost on the replica: {missing[:20]}"
    # Nothing from the future: at most the one insert in flight at the kill is extra.
    assert found <= set(range(1, acknowledged[-1] + 2))
