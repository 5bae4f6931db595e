"""Shared fixtures: the hafs binary, a cluster key, and a running replica + mount pair."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Tests and bench/ share tests.support; the repo root is not on sys.path under .venv/bin/pytest.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import cluster  # noqa: E402


@pytest.fixture(scope="session")
def hafs_bin() -> Path:
    return Path(sys.executable).parent / "hafs"


@pytest.fixture
def cluster_key(tmp_path: Path, hafs_bin: Path) -> Path:
    return cluster.keygen(tmp_path / "cluster.key", hafs_bin)


@pytest.fixture
def replica_dir(tmp_path: Path) -> Path:
    path = tmp_path / "replica"
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
    tmp_path: Path, hafs_bin: Path, cluster_key: Path, replica_dir: Path
) -> Iterator[Mirror]:
    # Short names: the status socket path must fit in sun_path (108 bytes).
    primary_dir, mountpoint = tmp_path / "primary", tmp_path / "mnt"
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


def _remove_leftover_mounts(base: Path) -> list[str]:
    """Unmount every FUSE mount under BASE; returns what was found."""
    left = cluster.fuse_mounts_under(base)
    for path in left:
        cluster.force_unmount(path)
    return left


@pytest.fixture(scope="session", autouse=True)
def no_leftover_mounts_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Fail the run loudly if anything left a FUSE mount in pytest's tmp dirs, and remove it.

    A stale mount makes the next run hang or fail in confusing ways, so it is an error even
    when every test passed.
    """
    base = tmp_path_factory.getbasetemp()
    yield base
    left = _remove_leftover_mounts(base)
    if left:
        pytest.fail(f"FUSE mounts left behind (now unmounted): {left}", pytrace=False)


@pytest.fixture(autouse=True)
def no_leftover_mounts_test(no_leftover_mounts_session: Path) -> Iterator[None]:
    """Per test, so the failure names the test that leaked; mounts of wider-scoped fixtures
    existed before the test started and are left to their owners."""
    base = no_leftover_mounts_session
    before = set(cluster.fuse_mounts_under(base))
    yield
    leaked = [p for p in cluster.fuse_mounts_under(base) if p not in before]
    for path in leaked:
        cluster.force_unmount(path)
    if leaked:
        pytest.fail(f"test left FUSE mounts behind (now unmounted): {leaked}", pytrace=False)
