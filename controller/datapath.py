"""The daemon's side of the data path: it runs `hafs fs mount` and `hafs fs replica` for each
replicated directory of a module, switches the mounts between MIRROR and ALONE, and watches
them.

They are separate processes (design.md section 2): the data path must not stall while the
daemon is busy, and a daemon crash must not unmount the application's data. They are started
in their own session, so a signal meant for the daemon does not reach them, and they log to
the module's log directory.

Ports: replicated directory i of a module listens on `replication_port + i` on the node's
address of the module's first heartbeat network.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import trio

from hafs import manifest, protocol, status, verify
from hafs.mountinfo import force_unmount, is_fuse_mounted
from hafs.state import StateStore

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0  # a mount or replica that is not serving after this has failed
STOP_TIMEOUT = 20.0  # SIGTERM lets a mount drain its stream; SIGKILL after this
VERIFY_TIMEOUT = 60.0  # connecting to the peer's replica, and each partial manifest


class DataPathError(Exception):
    """A data process could not be started, commanded or stopped."""


@dataclass(frozen=True)
class Replicated:
    """One replicated directory and where its data processes keep their state."""

    dir: Path
    state_dir: Path  # parent of mount/ and replica/
    local: tuple[str, int]  # where this node's replica listens
    peer: tuple[str, int]  # where the peer's replica listens

    @property
    def mount_state(self) -> Path:
        return self.state_dir / "mount"

    @property
    def replica_state(self) -> Path:
        return self.state_dir / "replica"


DATA_CLI = "hafs.cli"  # `hafs fs ...` alone: it starts faster than the whole hafs command


def hafs_command(*args: str) -> list[str]:
    """The data path's CLI of this installation (the venv the daemon runs from)."""
    return [sys.executable, "-m", DATA_CLI, *args]


def _mode(snapshot: dict[str, Any]) -> str:
    """The mount's mode (hafs.replicator.Mode): CONNECTING, MIRROR, ALONE, RESYNC ..."""
    return str(snapshot.get("mode", "")).upper()


def _hostport(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe_resync(progress: dict[str, Any]) -> str:
    """A mount's resync status as an operator reads it: phase, percent, bytes, rate, ETA."""
    phase = str(progress.get("phase", "starting"))
    done, planned = int(progress.get("bytes_done", 0)), int(progress.get("bytes_planned", 0))
    elapsed = float(progress.get("elapsed", 0.0))
    if not planned or "copying" not in phase:
        return phase
    rate = done / elapsed if elapsed > 0 else 0.0
    text = f"{phase}: {100 * done // planned}% ({_mb(done)} of {_mb(planned)} MB)"
    if rate > 0:
        text += f", {_mb(rate)} MB/s, about {max(planned - done, 0) / rate:.0f} s left"
    return text


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


class DataProcess:
    """One `hafs fs mount|replica` process."""

    def __init__(
        self, role: str, argv: list[str], status_sock: Path, logfile: Path, standby: bool = False
    ) -> None:
        self.role = role
        self.argv = argv
        self.status_sock = status_sock
        self.logfile = logfile
        self.standby = standby  # started with --standby: waits for go() on its stdin
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pidfile(self) -> Path:
        # A standby's is not the mount's: stop_orphan must not take it for a mount left over.
        return self.status_sock.with_name("standby.pid" if self.standby else "pid")

    def start(self) -> None:
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.status_sock.unlink()
        with self.logfile.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE if self.standby else subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._write_pidfile()

    def _write_pidfile(self) -> None:
        # For the next daemon, should this one die: it stops what was left (stop_orphan).
        assert self.proc is not None
        self.pidfile.write_text(f"{self.proc.pid}\n")

    def go(self, mode: str) -> bool:
        """Let a standby mount go on: mount in `mode` (alone or mirror). False if it died
        meanwhile (the caller starts a fresh one)."""
        assert self.proc is not None and self.proc.stdin is not None and self.standby
        try:
            self.proc.stdin.write(f"go {mode}\n".encode())
            self.proc.stdin.close()
        except OSError:  # BrokenPipeError: it is gone
            self.pidfile.unlink(missing_ok=True)
            return False
        self.pidfile.unlink(missing_ok=True)
        self.standby = False
        self._write_pidfile()
        return True

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_detail(self) -> str:
        code = None if self.proc is None else self.proc.poll()
        return f"{self.role} exited with {code} (see {self.logfile})"

    async def status(self) -> dict[str, Any]:
        return await trio.to_thread.run_sync(status.query, self.status_sock, 5.0)

    async def wait_ready(self, ready: Any) -> dict[str, Any]:
        """Poll the status socket until `ready(snapshot)`; raise if the process died."""
        with trio.move_on_after(READY_TIMEOUT):
            while True:
                if not self.alive:
                    raise DataPathError(self.exit_detail())
                with contextlib.suppress(OSError, ValueError):
                    snap = await self.status()
                    if ready(snap):
                        return snap
                await trio.sleep(0.1)
        raise DataPathError(f"{self.role} not ready after {READY_TIMEOUT:g} s (see {self.logfile})")

    async def stop(self) -> None:
        """SIGTERM, wait for a clean exit (a mount drains its stream), SIGKILL after a while."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_TIMEOUT):
                while proc.poll() is None:
                    await trio.sleep(0.05)
            if proc.poll() is None:
                log.warning("%s did not stop after SIGTERM: killing it", self.role)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await trio.to_thread.run_sync(proc.wait)
        self.proc = None
        self.pidfile.unlink(missing_ok=True)

    async def stop_orphan(self) -> None:
        """Stop the process an earlier daemon started here, if it still runs."""
        try:
            pid = int(self.pidfile.read_text())
            orphan = psutil.Process(pid)
            cmdline = orphan.cmdline()
            mine = self.role in cmdline and any(m in cmdline for m in (DATA_CLI, "controller.cli"))
        except (FileNotFoundError, ValueError, psutil.Error):
            mine = False
        if mine:
            log.warning("stopping %s pid %s left by an earlier daemon", self.role, pid)
            with contextlib.suppress(psutil.Error):
                orphan.terminate()
                await trio.to_thread.run_sync(_wait_or_kill, orphan, STOP_TIMEOUT)
        self.pidfile.unlink(missing_ok=True)


def _wait_or_kill(process: psutil.Process, timeout: float) -> None:
    try:
        process.wait(timeout)
    except psutil.TimeoutExpired:
        process.kill()
        process.wait(5)


class DataPath:
    """The mounts and replica servers of one module on this node."""

    def __init__(
        self,
        dirs: list[Replicated],
        key_file: Path,
        log_dir: Path,
        timeout: float,
        maxrate: int = 0,
        workers: int = 4,
        ack: str = "applied",
        xattrs: bool = True,
    ):
        self.dirs = dirs
        self.key_file = key_file
        self.log_dir = log_dir
        self.timeout = timeout
        self.maxrate = maxrate  # bytes/s a resync sends at most (0: no cap)
        self.workers = workers  # threads reading trees and hashing blocks (<rfs nbrei>)
        self.ack = ack  # when a mutating call returns (<rfs ack>, hafs.replicator.Ack)
        self.xattrs = xattrs  # <rfs xattrs>
        self.mounts: list[DataProcess] = []
        self.replicas: list[DataProcess] = []
        self.standby: dict[int, DataProcess] = {}  # directory -> its waiting mount process

    # ------------------------------------------------------------------ primary side

    async def mount(self, alone: bool) -> None:
        """Mount every directory over itself: ALONE (journaling) or MIRROR (the peer's
        replica must be listening: the state machine mounts MIRROR only in a swap, where the
        peer's copy is identical and its replica runs)."""
        if self.mounts:
            raise DataPathError("already mounted")
        for i, d in enumerate(self.dirs):
            if not alone:
                # The copies are identical (the state machine says so): a journal or an
                # unclean mark from an earlier period as primary no longer means anything.
                shutil.rmtree(d.mount_state, ignore_errors=True)
            d.mount_state.mkdir(parents=True, exist_ok=True)
            if is_fuse_mounted(d.dir):  # left by a mount process that died with the node
                await trio.to_thread.run_sync(force_unmount, d.dir)
            proc = self._standing_by(i)
            if proc is None or not proc.go("alone" if alone else "mirror"):
                proc = self._mount_process(i, d, alone)
                proc.start()
            self.mounts.append(proc)
            snap = await proc.wait_ready(lambda s: _mode(s) in ("MIRROR", "ALONE"))
            if not is_fuse_mounted(d.dir):
                raise DataPathError(f"mount of {d.dir} reported ready but is not mounted")
            if not alone and _mode(snap) != "MIRROR":
                # A swap's mount that cannot reach the peer's replica must not serve: the
                # peer counts itself synchronised and would take over without its changes.
                why = snap.get("reason") or "not mirroring"
                raise DataPathError(f"mount of {d.dir} could not reach the peer's replica: {why}")

    def _mount_process(
        self, i: int, d: Replicated, alone: bool = True, standby: bool = False
    ) -> DataProcess:
        sock = d.mount_state / "status.sock"
        argv = self._mount_argv(d, alone)
        if standby:
            argv = [a for a in argv if a != "--alone"] + ["--standby"]
        return DataProcess("mount", argv, sock, self.log_dir / f"mount{i}.log", standby)

    def _standing_by(self, i: int) -> DataProcess | None:
        """Directory i's standby mount process, taken from the standby ones, if alive."""
        proc = self.standby.pop(i, None)
        return proc if proc is not None and proc.alive else None

    async def start_standby(self) -> None:
        """A mount process per directory, started and waiting (`--standby`): the next
        mount, a failover's, need not wait for Python to start and import hafs (about a
        second). It exits by itself when this daemon dies."""
        if len(self.standby) == len(self.dirs) and all(p.alive for p in self.standby.values()):
            return
        await self.stop_standby()
        for i, d in enumerate(self.dirs):
            d.mount_state.mkdir(parents=True, exist_ok=True)
            self.standby[i] = self._mount_process(i, d, standby=True)
            self.standby[i].start()

    async def stop_standby(self) -> None:
        for proc in self.standby.values():
            await proc.stop()
        self.standby = {}

    def _mount_argv(self, d: Replicated, alone: bool) -> list[str]:
        argv = hafs_command(
            "fs", "mount", str(d.dir),
            "--peer", _hostport(d.peer),
            "--key", str(self.key_file),
            "--state-dir", str(d.mount_state),
            "--timeout", str(self.timeout),
            "--maxrate", str(self.maxrate / 1e6),
            "--workers", str(self.workers),
            "--ack", self.ack,
            "--xattrs" if self.xattrs else "--no-xattrs",
            "--fence",  # this daemon decides when a mount that lost its peer goes on
        )  # fmt: skip
        return [*argv, "--alone"] if alone else argv

    async def mirror(self) -> dict[str, Any]:
        """Join the peer's replicas: full comparison, copy what differs, then MIRROR."""
        totals: dict[str, Any] = {"files_copied": 0, "bytes_sent": 0}
        for proc in self.mounts:
            # No timeout: the copy takes as long as the data that differs.
            request = {"cmd": "mirror"}
            reply = await trio.to_thread.run_sync(status.command, proc.status_sock, request, None)
            if not reply.get("ok"):
                raise DataPathError(reply.get("message", "mirror failed"))
            totals["files_copied"] += reply.get("files_copied", 0)
            totals["bytes_sent"] += reply.get("bytes_sent", 0)
        return totals

    async def resync_progress(self) -> str:
        """Where the running resyncs are, one phrase per replicated directory ("" if none)."""
        lines = []
        for proc in self.mounts:
            with contextlib.suppress(OSError, ValueError):
                snap = await proc.status()
                if snap.get("mode") == "RESYNC":
                    lines.append(describe_resync(snap.get("resync") or {}))
        return "; ".join(lines)

    async def verify(self, repair: bool) -> list[dict[str, Any]]:
        """Compare each directory with the peer's replica while the application writes
        (hafs.verify), in a thread: the daemon's heartbeats go on. With `repair`, the mount
        sends what differs again on its mirroring stream (hafs.repair). One result per
        directory: hafs.verify.Checked's JSON, or {"dir", "error"}."""
        if len(self.mounts) != len(self.dirs):
            raise DataPathError("the replicated directories are not all mounted")
        key = protocol.read_key(str(self.key_file))
        results = []
        for d, proc in zip(self.dirs, self.mounts, strict=True):
            snap = await proc.status()
            if _mode(snap) != "MIRROR":
                why = snap.get("reason") or "no peer to compare with"
                results.append({"dir": str(d.dir), "error": f"the mount is {_mode(snap)}: {why}"})
                continue
            check = functools.partial(
                verify.check,
                str(d.dir),
                d.peer,
                key,
                VERIFY_TIMEOUT,
                repair_via=proc.status_sock if repair else None,
            )
            try:
                checked = await trio.to_thread.run_sync(check, abandon_on_cancel=True)
            except (OSError, protocol.ProtocolError, manifest.ManifestError) as e:
                results.append({"dir": str(d.dir), "error": f"cannot compare: {e}"})
            except verify.RepairError as e:
                results.append({"dir": str(d.dir), "error": str(e)})
            else:
                results.append(checked.to_json())
        return results

    async def alone(self, reason: str) -> None:
        """Stop replicating and journal instead (I5); held calls complete."""
        await self._tell_mounts("alone", reason)

    async def fence(self, reason: str) -> None:
        """Fail the calls the peer did not acknowledge, and every later change (EIO)."""
        await self._tell_mounts("fence", reason)

    async def _tell_mounts(self, cmd: str, reason: str) -> None:
        for proc in self.mounts:
            request = {"cmd": cmd, "reason": reason}
            try:
                reply = await trio.to_thread.run_sync(
                    status.command, proc.status_sock, request, 10.0
                )
            except ValueError as e:  # closed without a reply: it died or failed
                raise DataPathError(f"{cmd}: {proc.exit_detail()}: {e}") from e
            if not reply.get("ok"):
                raise DataPathError(f"{cmd}: {reply.get('message', 'refused')}")

    async def unmount(self) -> None:
        """Stop the mounts, this daemon's and any an earlier daemon left, and make sure
        nothing stays mounted over the replicated directories."""
        for i, d in enumerate(self.dirs):
            proc = self.mounts[i] if i < len(self.mounts) else None
            if proc is not None:
                await proc.stop()
            else:
                await self._mount_process(i, d).stop_orphan()
            if is_fuse_mounted(d.dir):
                await trio.to_thread.run_sync(force_unmount, d.dir)
        self.mounts = []

    def mounted_dirs(self) -> list[Path]:
        """Replicated directories with a FUSE mount on them (ours, or left by a crash)."""
        return [d.dir for d in self.dirs if is_fuse_mounted(d.dir)]

    async def replication_lost(self) -> str | None:
        """Why a mount stopped replicating (HELD, or ALONE by itself), or None."""
        for proc in self.mounts:
            if not proc.alive:
                return proc.exit_detail()
            with contextlib.suppress(OSError, ValueError):
                snap = await proc.status()
                if _mode(snap) in ("HELD", "ALONE"):
                    return str(snap.get("reason") or "the mount went ALONE")
        return None

    # ------------------------------------------------------------------ secondary side

    async def start_replicas(self, stale: bool) -> None:
        """Serve the primary's stream. `stale`: this copy is not up to date (the state
        machine's record)."""
        if self.replicas:
            return
        for i, d in enumerate(self.dirs):
            proc = self._replica_process(i, d)
            await proc.stop_orphan()  # an earlier daemon's would hold the port
            d.replica_state.mkdir(parents=True, exist_ok=True)
            if stale:
                # Only a completed resync may mark this copy synchronised again; the token of
                # its last session stays, so the primary's journal can still narrow the resync.
                StateStore(d.replica_state).update(uptodate=False)
            proc.start()
            self.replicas.append(proc)
            await proc.wait_ready(lambda s: True)
        await self.start_standby()

    def _replica_process(self, i: int, d: Replicated) -> DataProcess:
        argv = hafs_command(
            "fs", "replica", str(d.dir),
            "--listen", _hostport(d.local),
            "--key", str(self.key_file),
            "--state-dir", str(d.replica_state),
            "--workers", str(self.workers),
        )  # fmt: skip
        sock = d.replica_state / "status.sock"
        return DataProcess("replica", argv, sock, self.log_dir / f"replica{i}.log")

    async def stop_replicas(self) -> None:
        for proc in self.replicas:
            await proc.stop()
        self.replicas = []

    async def stop_orphan_replicas(self) -> None:
        """Replica servers an earlier daemon left: this node is no one's SECOND now."""
        for i, d in enumerate(self.dirs):
            await self._replica_process(i, d).stop_orphan()

    async def replicas_synced(self) -> bool | None:
        """True once every replica has a live session whose resync completed; None when a
        replica process died (the resync failed)."""
        if not self.dirs:
            return True  # a module that replicates nothing is always synchronised
        if not self.replicas:
            return None
        for proc in self.replicas:
            if not proc.alive:
                return None
            try:
                snap = await proc.status()
            except (OSError, ValueError):
                return False
            if not snap.get("synced"):
                return False
        return True

    async def stop_all(self) -> None:
        await self.unmount()
        await self.stop_replicas()
        await self.stop_standby()
