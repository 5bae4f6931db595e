"""Mounting over the replicated directory itself, as over /var/lib/mysql in production."""

from __future__ import annotations

import subprocess
from pathlib import Path

from hafs import manifest
from tests.support import cluster


def _populate(directory: Path) -> None:
    (directory / "sub").mkdir()
    (directory / "sub" / "old.txt").write_text("written before the mount\n")
    (directory / "big").write_bytes(bytes(range(256)) * 4096)


def test_mount_over_itself_keeps_the_path_and_replicates(
    data_tmp: Path, tmp_path: Path, cluster_key: Path, hafs_bin: Path
) -> None:
    data, replica_dir = data_tmp / "data", data_tmp / "replica"
    data.mkdir()
    _populate(data)
    # The pair starts identical (the initial copy is the resync's job): cp -a keeps times.
    subprocess.run(["cp", "-a", f"{data}/.", str(replica_dir)], check=True)
    port = cluster.free_port()
    with (
        cluster.replica(
            replica_dir,
            listen=f"127.0.0.1:{port}",
            key=cluster_key,
            state_dir=tmp_path / "rs",
            hafs_bin=hafs_bin,
        ),
        cluster.mount(
            data,
            peer=f"127.0.0.1:{port}",
            key=cluster_key,
            state_dir=tmp_path / "ms",
            hafs_bin=hafs_bin,
        ) as mnt,
    ):
        assert cluster.is_mounted(data)
        assert (data / "sub" / "old.txt").read_text() == "written before the mount\n"
        with open(data / "sub" / "old.txt", "a") as f:
            f.write("and after\n")
        (data / "new.txt").write_text("new\n")
        assert mnt.status()["mode"] == "MIRROR"
        assert (
            manifest.compare(
                manifest.build_manifest(str(data)), manifest.build_manifest(str(replica_dir))
            )
            == []
        )
    assert not cluster.is_mounted(data)
    # Unmounted, the directory shows what was written through the mount.
    assert (data / "sub" / "old.txt").read_text() == "written before the mount\nand after\n"
    assert (data / "new.txt").read_text() == "new\n"
    assert (
        manifest.compare(
            manifest.build_manifest(str(data)), manifest.build_manifest(str(replica_dir))
        )
        == []
    )


def test_unknown_file_on_replica_side_degrades_instead_of_diverging(
    data_tmp: Path, tmp_path: Path, cluster_key: Path, hafs_bin: Path
) -> None:
    """A primary whose files the replica lacks must not pretend to mirror them."""
    data, replica_dir = data_tmp / "data", data_tmp / "replica"
    data.mkdir()
    replica_dir.mkdir()
    _populate(data)  # the replica stays empty: never synchronised
    port = cluster.free_port()
    with (
        cluster.replica(
            replica_dir,
            listen=f"127.0.0.1:{port}",
            key=cluster_key,
            state_dir=tmp_path / "rs",
            hafs_bin=hafs_bin,
        ),
        cluster.mount(
            data,
            peer=f"127.0.0.1:{port}",
            key=cluster_key,
            state_dir=tmp_path / "ms",
            hafs_bin=hafs_bin,
            timeout=2,
        ) as mnt,
    ):
        with open(data / "sub" / "old.txt", "a") as f:
            f.write("change\n")
        status = mnt.status()
        assert status["mode"] == "ALONE"
        assert "sub/old.txt" in status["journal"]
