"""`hafs fs verify` on a tree the application is writing (issue 4): writes in flight are not
differences, a file changed behind hafs's back on the replica is one, and `--repair` makes it
identical again through the mirroring mount, which never leaves MIRROR."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SIZE = 4 << 20
STATIC = [f"static-{i}" for i in range(8)]


class Writer:
    """A thread writing 4 KiB pages of one file through the mount, as a database would."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writes = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="writer")

    def _run(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                os.ftruncate(fd, SIZE)
                page = 0
                while not self._stop.is_set():
                    os.pwrite(fd, os.urandom(4096), (page * 7919 % (SIZE // 4096)) * 4096)
                    page += 1
                    self.writes += 1
            finally:
                os.close(fd)
        except BaseException as e:
            self.error = e

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        assert self.error is None, self.error


@pytest.fixture
def busy(mirror: Any) -> Iterator[Writer]:
    for name in STATIC:
        (mirror.mountpoint / name).write_bytes(name.encode() * 1000)
    with Writer(mirror.mountpoint / "db.dat") as writer:
        yield writer


def verify(m: Any, hafs_bin: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = ["fs", "verify", str(m.mountpoint), "--peer", m.peer, "--key", str(m.key), *extra]
    return subprocess.run([str(hafs_bin), *args], capture_output=True, text=True, timeout=300)


def test_writes_in_flight_are_not_differences(mirror: Any, hafs_bin: Path, busy: Writer) -> None:
    for _ in range(3):
        before = busy.writes
        result = verify(mirror, hafs_bin)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.startswith("identical:"), result.stdout
        assert busy.writes > before  # the application wrote all along
    assert mirror.mount.status()["mode"] == "MIRROR"


def test_a_change_behind_hafs_is_reported_then_repaired(
    mirror: Any, hafs_bin: Path, busy: Writer
) -> None:
    replica = mirror.replica_dir
    (replica / "static-1").write_bytes(b"changed on the replica")
    (replica / "static-2").unlink()
    (replica / "static-3").chmod(0o600)
    (replica / "stray").write_bytes(b"only on the replica")
    result = verify(mirror, hafs_bin)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("differs: static-1: ") for line in lines), lines
    assert "only on local: static-2" in lines and "only on peer: stray" in lines
    assert any(line.startswith("differs: static-3: mode") for line in lines), lines
    assert not any("db.dat" in line and not line.startswith("busy") for line in lines), lines

    state = ("--state-dir", str(mirror.mount_state))
    repaired = verify(mirror, hafs_bin, "--repair", *state)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "repair: repaired " in repaired.stdout, repaired.stdout
    assert repaired.stdout.splitlines()[-1].startswith("identical:") or "busy" in repaired.stdout
    assert (replica / "static-1").read_bytes() == b"static-1" * 1000
    assert (replica / "static-2").read_bytes() == b"static-2" * 1000
    assert not (replica / "stray").exists()
    assert mirror.mount.status()["mode"] == "MIRROR"  # repaired without leaving MIRROR
    # The file made again on the replica is the one the mount's later writes reach.
    with open(mirror.mountpoint / "static-2", "ab") as f:
        f.write(b"+after the repair")
    assert (replica / "static-2").read_bytes().endswith(b"+after the repair")
    again = verify(mirror, hafs_bin)
    assert again.returncode == 0 and again.stdout.startswith("identical:"), again.stdout
