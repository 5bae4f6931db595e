"""Running the data process: the mount (primary) and the replica server, in the foreground."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import resource
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from hafs import _libc, repair, resync
from hafs.fs import HafsOperations
from hafs.journal import Journal
from hafs.manifest import WORKERS
from hafs.ops import Ack
from hafs.replica import ReplicaServer
from hafs.replicator import LIVE_PASSES, Mode, Replicator
from hafs.state import StateStore
from hafs.status import STARTING, StatusServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MountConfig:
    data_dir: str
    mountpoint: str
    state_dir: Path
    peer: tuple[str, int] | None  # None: standalone
    key: bytes | None
    timeout: float
    xattrs: bool = True
    ack: Ack = Ack.APPLIED  # when a mutating call returns
    alone: bool = False  # start ALONE, as the controller's Mount(ALONE): no connect attempt
    live_passes: int = LIVE_PASSES  # a rejoin's passes while the application writes
    maxrate: int = 0  # bytes/s a rejoin's live passes send at most; 0: no cap
    workers: int = WORKERS  # threads reading the tree in a rejoin (<rfs nbrei>)
    fence: bool = False  # a lost stream holds calls until `alone`/`fence` (hafs.replicator)
    standby: bool = False  # start, then wait for `go alone|mirror` on stdin (wait_for_go)


def _prepare_process() -> None:
    # Modes come from the callers (their umask is applied by the kernel/handlers), never
    # from ours; and a database opens many files.
    os.umask(0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # A thread back from fdatasync waits for the GIL up to the switch interval (5 ms by
    # default) while the loop thread runs Python: that wait was most of an fsync's latency.
    sys.setswitchinterval(float(os.environ.get("HAFS_SWITCH_INTERVAL", "0.0005")))


def _fuse_fd() -> int:
    """The fd pyfuse3.init opened on /dev/fuse (pyfuse3 does not export it)."""
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
    log.warning("no /dev/fuse fd found: calls wait for replies through the event loop")
    return -1


def wait_for_go(cfg: MountConfig) -> MountConfig | None:
    """A standby mount (a SECOND's, ready for a failover with Python started and hafs
    imported) waits for one line: `go alone` or `go mirror`; end of input (its daemon
    stopped it, or died): None, exit without mounting."""
    line = sys.stdin.readline().split()
    if line[:1] != ["go"] or line[1:] not in (["alone"], ["mirror"]):
        if line:
            log.error("standby: expected `go alone` or `go mirror`, got %r", " ".join(line))
        return None
    return dataclasses.replace(cfg, alone=line[1] == "alone", standby=False)


def run_mount(cfg: MountConfig) -> None:
    _prepare_process()
    state = StateStore(cfg.state_dir)
    journal = Journal(cfg.state_dir / "journal")
    # Open the backing directory before mounting: with the mount over DIR itself, this fd
    # is the only way left to reach the files underneath.
    root_fd = os.open(cfg.data_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    replicator = Replicator(cfg.peer, cfg.key, cfg.timeout, state, journal, lambda i: "")
    replicator.live_passes = cfg.live_passes
    replicator.resync_maxrate = cfg.maxrate
    replicator.resync_workers = cfg.workers
    replicator.hold_on_loss = cfg.fence
    replicator.ack = cfg.ack
    operations = HafsOperations(root_fd, replicator, cfg.xattrs)
    replicator.path_of = operations.path_of
    _start_mode(replicator, state, journal, cfg.alone)
    control = MountControl(replicator, operations)
    options = set(pyfuse3.default_options) | {"fsname=hafs", "subtype=hafs", "allow_other"}
    pyfuse3.init(operations, cfg.mountpoint, options)
    replicator.watch_requests(_fuse_fd())
    status = StatusServer(
        cfg.state_dir / "status.sock",
        lambda: {
            "role": "mount",
            "dir": cfg.data_dir,
            "mountpoint": cfg.mountpoint,
            **replicator.snapshot(),
            "requests": dict(operations.requests),
        },
        control,
    )
    log.info("mounted %s over %s (%s)", cfg.mountpoint, cfg.data_dir, replicator.mode.value)
    try:
        status.start()
        trio.run(_serve, replicator, control)
    finally:
        status.close()
        pyfuse3.close(unmount=True)
        # Before the journal says "closed cleanly": on disk, every file's data must match
        # its mtime, or a crash soon after leaves a copy a later resync takes for exact.
        try:
            _libc.syncfs_dir(root_fd)
        except OSError as e:
            log.error("syncfs of %s failed (%s): the journal stays unclean", cfg.data_dir, e)
        else:
            journal.close()
        log.info("unmounted %s", cfg.mountpoint)


def _start_mode(replicator: Replicator, state: StateStore, journal: Journal, alone: bool) -> None:
    """A mount that was ALONE, or crashed mid-stream, must not mirror before a resync."""
    if replicator.mode is Mode.STANDALONE:
        state.update(role="mount", mode=Mode.STANDALONE.value)
        return
    before = state.current
    if before.session_open:
        # Crashed while mirroring or resyncing: writes may be on one side only.
        replicator.reason = "previous run ended uncleanly: in-flight writes need a resync"
        journal.record("unclean", "", 0)
    elif before.mode == Mode.ALONE.value:
        replicator.reason = "was ALONE before this start: the peer needs a resync"
    elif alone:
        replicator.reason = "started ALONE (--alone): the peer joins with a resync"
    else:
        return
    replicator.mode = Mode.ALONE
    switched = before.mode != Mode.ALONE.value
    state.update(
        role="mount",
        mode=Mode.ALONE.value,
        session_open=False,
        generation=before.generation + int(switched),
    )
    log.warning("starting ALONE: %s", replicator.reason)


class MountControl:
    """The commands a running mount takes on its status socket (hafs.status).

    Called on the socket's threads; the work runs in the mount's trio loop.
    """

    def __init__(self, replicator: Replicator, operations: HafsOperations) -> None:
        self.replicator = replicator
        self.operations = operations
        self.token: trio.lowlevel.TrioToken | None = None  # set once the loop runs
        # One resync or repair at a time: each pauses the calls at the replicator's one
        # gate, and each opens it when it ends.
        self._copying = threading.Lock()

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.token is None:
            return {"ok": False, "message": STARTING}
        try:
            if request["cmd"] == "mirror":
                return self._mirror(bool(request.get("full")))
            if request["cmd"] == "repair":
                return self._repair(request.get("paths"))
            if request["cmd"] == "alone":
                reason = str(request.get("reason") or "asked to go ALONE")
                return trio.from_thread.run_sync(self._alone, reason, trio_token=self.token)
            if request["cmd"] == "fence":
                reason = str(request.get("reason") or "asked to fence")
                return trio.from_thread.run_sync(self._fence, reason, trio_token=self.token)
        except (trio.RunFinishedError, trio.Cancelled):
            return {"ok": False, "message": "the mount is stopping"}
        return {"ok": False, "message": f"unknown command {request['cmd']!r}"}

    def _mirror(self, full: bool) -> dict[str, Any]:
        if not self._copying.acquire(blocking=False):
            return {"ok": False, "message": "a resync or a repair is already running"}
        try:
            report = trio.from_thread.run(
                resync.rejoin, self.replicator, self.operations, full, trio_token=self.token
            )
            return report.reply()
        finally:
            self._copying.release()

    def _repair(self, paths: object) -> dict[str, Any]:
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            return {"ok": False, "message": "bad request: paths must be a list of paths"}
        if not self._copying.acquire(blocking=False):
            return {"ok": False, "message": "a resync or a repair is already running"}
        try:
            return trio.from_thread.run(
                repair.repair, self.replicator, self.operations, paths, trio_token=self.token
            )
        finally:
            self._copying.release()

    def _alone(self, reason: str) -> dict[str, Any]:
        rep = self.replicator
        if rep.mode is Mode.STANDALONE:
            return {"ok": False, "message": "a standalone mount has no peer"}
        if rep.mode is Mode.ALONE:
            return {"ok": True, "message": f"already ALONE: {rep.reason}"}
        if rep.mode is Mode.FENCED:  # final: the node is on its way out of the role
            return {"ok": True, "message": f"stays FENCED: {rep.reason}"}
        rep.degrade(reason)  # also ends a running resync, and releases HELD calls
        return {"ok": True, "message": f"ALONE: {reason}"}

    def _fence(self, reason: str) -> dict[str, Any]:
        if self.replicator.mode is Mode.STANDALONE:
            return {"ok": False, "message": "a standalone mount has no peer"}
        self.replicator.fence(reason)
        return {"ok": True, "message": f"FENCED: {self.replicator.reason}"}


async def _serve(replicator: Replicator, control: MountControl) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, nursery.cancel_scope, replicator)
        await nursery.start(replicator.run)
        control.token = trio.lowlevel.current_trio_token()
        await pyfuse3.main()
        # main returns after terminate(): every request answered, so drain the stream.
        with trio.move_on_after(replicator.timeout + 1):
            await replicator.drain()
        nursery.cancel_scope.cancel()


async def _stop_on_signal(scope: trio.CancelScope, replicator: Replicator) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %s: draining and unmounting", signal.Signals(signum).name)
            # Calls paused by a resync would hold pyfuse3.main: end it, ALONE. Calls HELD
            # for the controller's word were never acknowledged by the peer: they fail.
            replicator.abort_resync("the mount is stopping")
            if replicator.mode is Mode.HELD:
                replicator.fence("the mount stopped while holding calls")
            pyfuse3.terminate()
            return


def run_replica(
    data_dir: str, listen: tuple[str, int], key: bytes, state_dir: Path, workers: int = WORKERS
) -> None:
    _prepare_process()
    state = StateStore(state_dir)
    state.update(role="replica")
    server = ReplicaServer(data_dir, listen, key, state, workers)
    status = StatusServer(state_dir / "status.sock", server.snapshot)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %s: stopping the replica server", signal.Signals(signum).name)
        stop.set()
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    status.start()
    log.info("replica of %s listening on %s:%s", data_dir, *server.listen_addr)
    try:
        server.serve_forever()
    finally:
        status.close()
