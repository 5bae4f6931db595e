"""Run hafs replica and mount processes for tests and benchmarks.

Every process is started with its output in a log file inside its state dir, becomes "ready"
only when its status socket answers, and is always stopped by the context managers, which
also remove a FUSE mount the process left behind: a stale mount breaks every later run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from hafs import status as hafs_status
from hafs.mountinfo import (  # noqa: F401  (the tests' names for them)
    force_unmount,
    fuse_mounts_under,
    is_mounted,
    mounts,
)

HAFS_BIN = Path(sys.executable).parent / "hafs"
STATUS_SOCK = "status.sock"
# Long enough for a mount over a big directory tree, short enough that a hung start fails a
# test instead of eating the pytest timeout.
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class ClusterError(RuntimeError):
    """A hafs process did not start, answer or stop as expected."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def status(state_dir: Path | str, timeout: float = 5.0) -> dict[str, Any]:
    """The JSON object served on STATE_DIR/status.sock; raises ClusterError on any failure."""
    path = Path(state_dir) / STATUS_SOCK
    try:
        return hafs_status.query(path, timeout)
    except (OSError, ValueError) as e:
        raise ClusterError(f"status {path}: {e}") from e


def command(
    state_dir: Path | str, request: dict[str, Any], timeout: float | None = 120.0
) -> dict[str, Any]:
    """Send one command ({"cmd": "mirror"} ...) to the process at STATE_DIR; its reply."""
    path = Path(state_dir) / STATUS_SOCK
    try:
        return hafs_status.command(path, request, timeout)
    except (OSError, ValueError) as e:
        raise ClusterError(f"command {path}: {e}") from e


@dataclass(kw_only=True)
class HafsProc:
    """One foreground hafs process; subclasses build the command line."""

    state_dir: Path
    name: str = "hafs"
    hafs_bin: Path = HAFS_BIN
    extra_args: Sequence[str] = ()
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        return self.state_dir / f"{self.name}.log"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ClusterError(f"{self.name} was never started")
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> HafsProc:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # so the log is complete when it dies
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} {' '.join(self.command())}\n".encode())
            log.flush()
            # Own session: a Ctrl-C aimed at pytest must not reach the daemon before the
            # fixture's orderly stop does.
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"(no log: {e})"
        return "\n".join(text.splitlines()[-lines:])

    def _is_ready(self) -> bool:
        try:
            status(self.state_dir, timeout=2.0)
        except ClusterError:
            return False
        return True

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        """Poll the status socket until it answers; raise with the log tail if we give up."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise ClusterError(f"{self.name} exited ({code}) before ready:\n{self.log_tail()}")
            if self._is_ready():
                return status(self.state_dir)
            if time.monotonic() > deadline:
                raise ClusterError(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def status(self) -> dict[str, Any]:
        return status(self.state_dir)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to TIMEOUT, then SIGKILL. Returns the exit code (None if never run)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would; a mount is left behind for the caller to inspect."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        self.proc.wait(STOP_TIMEOUT)


@dataclass(kw_only=True)
class ReplicaProc(HafsProc):
    directory: Path
    listen: str  # HOST:PORT
    key: Path
    name: str = "replica"

    def command(self) -> list[str]:
        args = ["fs", "replica", str(self.directory), "--listen", self.listen]
        args += ["--key", str(self.key), "--state-dir", str(self.state_dir)]
        return [str(self.hafs_bin), *args, *self.extra_args]


@dataclass(kw_only=True)
class MountProc(HafsProc):
    directory: Path
    mountpoint: Path | None = None  # None: mounted over DIRECTORY itself
    peer: str | None = None  # HOST:PORT; None means --standalone
    key: Path | None = None
    timeout: float | None = None
    alone: bool = False  # --alone: start journaling, no connect until `hafs fs mirror`
    name: str = "mount"

    @property
    def target(self) -> Path:
        """Where the file system appears."""
        return self.mountpoint if self.mountpoint is not None else self.directory

    def command(self) -> list[str]:
        args = ["fs", "mount", str(self.directory)]
        if self.peer is None:
            args.append("--standalone")
        else:
            args += ["--peer", self.peer, "--key", str(self.key)]
        if self.mountpoint is not None:
            args += ["--mountpoint", str(self.mountpoint)]
        args += ["--state-dir", str(self.state_dir)]
        if self.timeout is not None:
            args += ["--timeout", str(self.timeout)]
        if self.alone:
            args.append("--alone")
        return [str(self.hafs_bin), *args, *self.extra_args]

    def _is_ready(self) -> bool:
        return super()._is_ready() and is_mounted(self.target)

    def cleanup(self) -> None:
        """Stop the process and make sure nothing stays mounted."""
        try:
            self.stop()
        finally:
            force_unmount(self.target)


@contextlib.contextmanager
def replica(
    directory: Path,
    *,
    listen: str,
    key: Path,
    state_dir: Path,
    hafs_bin: Path = HAFS_BIN,
    extra_args: Sequence[str] = (),
    ready_timeout: float = READY_TIMEOUT,
) -> Iterator[ReplicaProc]:
    """A ready replica server, stopped on exit whatever happens."""
    proc = ReplicaProc(
        state_dir=state_dir,
        hafs_bin=hafs_bin,
        extra_args=extra_args,
        directory=directory,
        listen=listen,
        key=key,
    )
    try:
        proc.start()
        proc.wait_ready(ready_timeout)
        yield proc
    finally:
        proc.stop()


@contextlib.contextmanager
def mount(
    directory: Path,
    *,
    state_dir: Path,
    peer: str | None = None,
    key: Path | None = None,
    mountpoint: Path | None = None,
    timeout: float | None = None,
    alone: bool = False,
    hafs_bin: Path = HAFS_BIN,
    extra_args: Sequence[str] = (),
    ready_timeout: float = READY_TIMEOUT,
) -> Iterator[MountProc]:
    """A ready mount (peer=None: standalone); on exit it is stopped and surely unmounted."""
    if (peer is None) != (key is None):
        raise ValueError("peer and key go together; give neither for --standalone")
    proc = MountProc(
        state_dir=state_dir,
        hafs_bin=hafs_bin,
        extra_args=extra_args,
        directory=directory,
        mountpoint=mountpoint,
        peer=peer,
        key=key,
        timeout=timeout,
        alone=alone,
    )
    try:
        proc.start()
        proc.wait_ready(ready_timeout)
        yield proc
    finally:
        proc.cleanup()


def keygen(path: Path, hafs_bin: Path = HAFS_BIN) -> Path:
    """Write a fresh cluster key with `hafs keygen`."""
    result = subprocess.run(
        [str(hafs_bin), "keygen", str(path)], capture_output=True, text=True, timeout=30
    )
    if result.returncode != 0:
        raise ClusterError(f"hafs keygen failed ({result.returncode}): {result.stderr}")
    return path


TIMEOUT = 2.0  # the mount's --timeout in the failure and join tests


@dataclass
class Pair:
    """Paths and settings of one replica + mount pair; the tests start the processes."""

    primary_dir: Path
    replica_dir: Path
    mountpoint: Path
    mount_state: Path
    replica_state: Path
    port: int
    key: Path
    hafs_bin: Path
    timeout: float = TIMEOUT

    @property
    def peer(self) -> str:
        return f"127.0.0.1:{self.port}"

    def replica(self) -> contextlib.AbstractContextManager[ReplicaProc]:
        return replica(
            self.replica_dir,
            listen=self.peer,
            key=self.key,
            state_dir=self.replica_state,
            hafs_bin=self.hafs_bin,
        )

    def mount(
        self, alone: bool = False, timeout: float | None = None, extra_args: Sequence[str] = ()
    ) -> contextlib.AbstractContextManager[MountProc]:
        return mount(
            self.primary_dir,
            peer=self.peer,
            key=self.key,
            mountpoint=self.mountpoint,
            state_dir=self.mount_state,
            timeout=self.timeout if timeout is None else timeout,
            alone=alone,
            hafs_bin=self.hafs_bin,
            extra_args=extra_args,
        )


P = TypeVar("P", bound=Pair)


def new_pair(
    kind: type[P], tmp_path: Path, data_tmp: Path, hafs_bin: Path, key: Path, replica_dir: Path
) -> P:
    # Data under data_tmp (see tests/conftest.py); state dirs under tmp_path with short
    # names: the status socket path must fit in sun_path (108 bytes).
    dirs = [data_tmp / "primary", data_tmp / "mnt", tmp_path / "ms", tmp_path / "rs"]
    for d in dirs:
        d.mkdir()
    return kind(
        primary_dir=dirs[0],
        replica_dir=replica_dir,
        mountpoint=dirs[1],
        mount_state=dirs[2],
        replica_state=dirs[3],
        port=free_port(),
        key=key,
        hafs_bin=hafs_bin,
    )


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
