"""Fixtures shared by the data path's tests: a small tmpfs to fill up, a replica + mount
pair, a join pair."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import cluster
from tests.support.cluster import Pair, new_pair
from tests.support.join import Join


@pytest.fixture
def small_tmpfs() -> Iterator[Callable[[Path], Path]]:
    """Mount an 8 MiB tmpfs on a directory (mode 0755 like a fresh mkdir); always unmounted."""
    mounted: list[Path] = []

    def make(path: Path) -> Path:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(path)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        mounted.append(path)
        return path

    yield make
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True, timeout=30)
        assert not cluster.is_mounted(path), f"tmpfs {path} still mounted"


@pytest.fixture
def join(
    tmp_path: Path, data_tmp: Path, hafs_bin: Path, cluster_key: Path, replica_dir: Path
) -> Join:
    return new_pair(Join, tmp_path, data_tmp, hafs_bin, cluster_key, replica_dir)


@pytest.fixture
def rig(
    tmp_path: Path, data_tmp: Path, hafs_bin: Path, cluster_key: Path, replica_dir: Path
) -> Pair:
    """Paths for one replica server and one mount of it (the tests start the processes)."""
    return new_pair(Pair, tmp_path, data_tmp, hafs_bin, cluster_key, replica_dir)
