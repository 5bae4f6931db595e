"""Shared fixtures: the hafs binary, a cluster key, and a running replica + mount pair.

Data directories and mount points live under `data_tmp`, not `tmp_path`: mariadbd runs as
user mysql and must traverse every directory above its datadir, but pytest keeps
/tmp/pytest-of-root at 0700 and re-tightens it whenever any pytest session starts, so a
datadir under tmp_path breaks mid-test on a machine where others run tests too. State dirs
and logs stay in tmp_path, where pytest keeps them for the last few runs.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Tests and bench/ share tests.support; the repo root is not on sys.path under .venv/bin/pytest.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import cluster  # noqa: E402

DATA_TMP_PARENT = Path("/var/tmp")  # the disk, like the repo; /tmp may be tmpfs elsewhere


@pytest.fixture(scope="session")
def hafs_bin() -> Path:
    return Path(sys.executable).parent / "hafs"


@pytest.fixture(scope="session")
def data_tmp_base() -> Iterator[Path]:
    """This session's world-traversable (0711) dir for data dirs and mount points."""
    base = Path(tempfile.mkdtemp(prefix="hafs-test-", dir=DATA_TMP_PARENT))
    base.chmod(0o711)
    yield base
    if not cluster.fuse_mounts_under(base):  # never rmtree through a mount
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def data_tmp(data_tmp_base: Path, request: pytest.FixtureRequest) -> Path:
    """A fresh 0755 dir per test under data_tmp_base (removed at the end of the session)."""
    prefix = re.sub(r"[^\w.-]", "_", request.node.name)[:40] + "-"
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=data_tmp_base))
    path.chmod(0o755)
    return path


@pytest.fixture
def cluster_key(tmp_path: Path, hafs_bin: Path) -> Path:
    return cluster.keygen(tmp_path / "cluster.key", hafs_bin)


@pytest.fixture
def replica_dir(data_tmp: Path) -> Path:
    path = data_tmp / "replica"
    path.mkdir()
    return path


@dataclass
class Mirror:
    """A replica server and a mount replicating to it, both ready."""

    mountpoint: Path  # where the test reads and writes
    primary_dir: Path  # the mount's backing directory
    replica_dir: Path
    mount: cluster.MountProc
    replica: cluster.ReplicaProc
    mount_state: Path
    replica_state: Path
    port: int
    key: Path

    @property
    def peer(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def mirror(
    tmp_path: Path, data_tmp: Path, hafs_bin: Path, cluster_key: Path, replica_dir: Path
) -> Iterator[Mirror]:
    primary_dir, mountpoint = data_tmp / "primary", data_tmp / "mnt"
    # Short names: the status socket path must fit in sun_path (108 bytes).
    mount_state, replica_state = tmp_path / "ms", tmp_path / "rs"
    for d in (primary_dir, mountpoint, mount_state, replica_state):
        d.mkdir()
    port = cluster.free_port()
    with (
        cluster.replica(
            replica_dir,
            listen=f"127.0.0.1:{port}",
            key=cluster_key,
            state_dir=replica_state,
            hafs_bin=hafs_bin,
        ) as rep,
        cluster.mount(
            primary_dir,
            peer=f"127.0.0.1:{port}",
            key=cluster_key,
            mountpoint=mountpoint,
            state_dir=mount_state,
            hafs_bin=hafs_bin,
        ) as mnt,
    ):
        yield Mirror(
            mountpoint=mountpoint,
            primary_dir=primary_dir,
            replica_dir=replica_dir,
            mount=mnt,
            replica=rep,
            mount_state=mount_state,
            replica_state=replica_state,
            port=port,
            key=cluster_key,
        )


def _fuse_mounts(bases: list[Path]) -> list[str]:
    return [mp for base in bases for mp in cluster.fuse_mounts_under(base)]


@pytest.fixture(scope="session", autouse=True)
def no_leftover_mounts_session(
    tmp_path_factory: pytest.TempPathFactory, data_tmp_base: Path
) -> Iterator[list[Path]]:
    """Fail the run loudly if anything left a FUSE mount in the session's tmp dirs, and
    remove it: a stale mount makes the next run hang or fail in confusing ways."""
    bases = [tmp_path_factory.getbasetemp(), data_tmp_base]
    yield bases
    left = _fuse_mounts(bases)
    for path in left:
        cluster.force_unmount(path)
    if left:
        pytest.fail(f"FUSE mounts left behind (now unmounted): {left}", pytrace=False)


@pytest.fixture(autouse=True)
def no_leftover_mounts_test(no_leftover_mounts_session: list[Path]) -> Iterator[None]:
    """Per test, so the failure names the test that leaked; mounts of wider-scoped fixtures
    existed before the test started and are left to their owners."""
    before = set(_fuse_mounts(no_leftover_mounts_session))
    yield
    leaked = [p for p in _fuse_mounts(no_leftover_mounts_session) if p not in before]
    for path in leaked:
        cluster.force_unmount(path)
    if leaked:
        pytest.fail(f"test left FUSE mounts behind (now unmounted): {leaked}", pytrace=False)
