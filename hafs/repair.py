"""Repair while mirroring: send named paths to the replica again, on the live stream.

`hafs verify --repair` (hafs.verify) found paths that differ on the replica while the mount
mirrors: a file changed on the replica behind hafs's back, a disk that lost a write. The
mount's `repair` command makes them identical without leaving MIRROR: the SECOND stays
synchronised and the application keeps running. For the few moments of the repair:

1. mutating calls wait at the resync's gate (reads go on), and every op already sent is
   acknowledged (a TIMES of the root, correct anyway, is the barrier): both trees are still;
2. partial manifests of the paths and their parents on both sides, `plan_resync`;
3. `TreeCopy` sends the plan as ordinary ops on the mirroring stream (differing files by
   block hashes: only differing blocks travel), binds the repaired paths the mount knows,
   then waits for the acknowledgement;
4. the gate opens.

The copy binds and forgets inodes on the replica under numbers of its own (`PRIVATE`), so
the mount's bindings, which the application's ops resolve by, are never disturbed; at the
end every repaired path the mount's node table names is bound again under the mount's
number (`LiveCopy.rebind`).

If the stream fails meanwhile, the mount goes ALONE as always (I5) and every path of the
repair is journaled as moved, so the resync that follows compares them whole.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import trio

from hafs import manifest, resync, wire
from hafs import protocol as p
from hafs.manifest import Entry
from hafs.ops import ROOT_INO, Op, OpFrame
from hafs.replicator import Mode, Replicator, ResyncInterrupted

if TYPE_CHECKING:
    from hafs.fs import HafsOperations

log = logging.getLogger(__name__)

_FAILURES = (OSError, p.ProtocolError, manifest.ManifestError, ResyncInterrupted, trio.TooSlowError)


# The copy's own names for inodes on the replica: the primary's inode numbers with this bit
# set (ops carry signed 64-bit ints). The mount's bindings stay untouched: a FORGET the
# kernel makes the mount send meanwhile cannot pull an inode from under the copy.
PRIVATE = 1 << 62


class LiveCopy(resync.TreeCopy):
    """A TreeCopy on the mirroring stream: ops go out as the application's do."""

    def ino(self, entry: Entry) -> int:
        return _private(super().ino(entry))

    def path_ino(self, path: str) -> int:
        return _private(super().path_ino(path))

    def send(self, frame: OpFrame) -> int:
        if self.rep.mode is not Mode.MIRROR:
            raise ResyncInterrupted(self.rep.reason or f"mode is {self.rep.mode.value}")
        self._last_seq = self.rep.send(frame)
        self._window_ops += 1
        self._window_bytes += sum(len(blob) for blob in frame.blobs)
        return self._last_seq

    def rebind(self, plan: resync.ResyncPlan, known: Collection[int]) -> None:
        """Bind again every repaired path the mount's node table names, under the mount's
        number: a file the replica got anew (or that was replaced there behind hafs's back)
        is then the one the application's later ops reach. No await: `known` cannot change
        meanwhile."""
        for path in plan.updates():
            ino = self.path_ino(path) & ~PRIVATE
            parent = self.path_ino(resync.parent_of(path)) & ~PRIVATE
            if ino != ROOT_INO and ino in known and (parent in known or parent == ROOT_INO):
                name = os.fsencode(path.rpartition("/")[2])
                self.send(OpFrame(Op.BIND, (ino, parent), (name,)))

    def barrier(self) -> int:
        """A TIMES of the root (its own times: correct anyway); once it is acknowledged,
        the replica applied every op sent before it."""
        return self.send(OpFrame(Op.TIMES, times=(self._times(ROOT_INO, "."),)))

    async def pace(self) -> None:
        if (
            self._window_bytes < resync.WINDOW_BYTES // 2
            and self._window_ops < resync.WINDOW_OPS // 2
        ):
            return
        await self.rep.applied(self._checkpoint)
        if self.rep.mode is not Mode.MIRROR:
            raise ResyncInterrupted(self.rep.reason)
        self._checkpoint, self._window_bytes, self._window_ops = self._last_seq, 0, 0

    def sent_after(self, seq: int) -> bool:
        return self._last_seq > seq


async def repair(rep: Replicator, mount: HafsOperations, paths: list[str]) -> dict[str, Any]:
    """The reply to `{"cmd": "repair", "paths": [...]}` (module docstring); one at a time
    (the caller's lock: two would each open the gate the other closed)."""
    if rep.mode is not Mode.MIRROR:
        why = f"the mount is {rep.mode.value}, not mirroring"
        return {"ok": False, "message": f"{why}: {rep.reason}" if rep.reason else why}
    try:
        for path in paths:
            manifest.check_path(path)
    except manifest.ManifestError as e:
        return {"ok": False, "message": f"bad request: {e}"}
    report = resync.ResyncReport()
    root_fd = mount.nodes[ROOT_INO].fd
    copy = LiveCopy(rep, root_fd, mount.root_st_ino, {}, {}, report)
    started = trio.current_time()
    # Durable before anything is sent: if the peer fails half-way, the resync that follows
    # compares these paths whole (records in MIRROR only widen the next resync).
    for path in paths:
        rep.journal.record("moved", path, 0)
    rep.pause_changes()
    barrier = 0
    try:
        barrier = copy.barrier()
        # Cancelled by degrade(), as a resync is: a repair must not outlive its stream.
        with trio.CancelScope() as rep.resync_scope:
            await _repair(rep, copy, barrier, paths, mount.nodes.keys())
        report.ok = rep.mode is Mode.MIRROR
    except _FAILURES as e:
        report.message = f"repair failed: {e or type(e).__name__}"
    except Exception as e:  # a bug must not leave the application's calls paused
        log.exception("repair failed")
        report.message = f"repair failed: internal error: {e!r}"
    finally:
        rep.resync_scope = None
        if not report.ok:
            _after_failure(rep, report.message, half_done=copy.sent_after(barrier))
        rep.resume_changes()
    paused = round(trio.current_time() - started, 3)
    if report.ok:
        report.message = (
            f"repaired {len(paths)} paths: {report.files_copied} files copied, "
            f"{report.removed} removed, {report.created} created, {report.updated} updated"
        )
    log.info("%s (writes paused %.3f s)", report.message or "repair failed", paused)
    return {
        "ok": report.ok,
        "message": report.message or f"repair failed: {rep.reason}",
        "files_copied": report.files_copied,
        "bytes_sent": report.bytes_sent,
        "removed": report.removed,
        "created": report.created,
        "updated": report.updated,
        "skipped": report.skipped,
        "paused_seconds": paused,
    }


async def _repair(
    rep: Replicator, copy: LiveCopy, barrier: int, paths: list[str], known: Collection[int]
) -> None:
    await rep.applied(barrier)
    if rep.mode is not Mode.MIRROR:
        raise ResyncInterrupted(rep.reason)
    assert rep.peer is not None and rep.key is not None
    scope = manifest.Scope(paths=frozenset(paths) | {manifest.parent_path(p) for p in paths})
    fetch = functools.partial(wire.fetch_partial, rep.peer, rep.key, max(rep.timeout, 2.0), scope)
    remote = await trio.to_thread.run_sync(fetch, abandon_on_cancel=True)
    build = functools.partial(manifest.build_partial, copy.root_fd, scope)
    local = await trio.to_thread.run_sync(build, abandon_on_cancel=True)
    loose = local.loose | remote.loose
    if loose:
        raise ResyncInterrupted(
            f"hard-linked {min(loose)} has names outside the paths to repair: "
            "a full resync is needed"
        )
    copy.local, copy.remote = local.entries, remote.entries
    copy.report.files_checked = len(local.entries)
    plan = resync.plan_resync(local.entries, remote.entries)
    await copy.run(plan)
    copy.rebind(plan, known)
    await copy.settled()


def _private(ino: int) -> int:
    return ino if ino == ROOT_INO else ino | PRIVATE


def _after_failure(rep: Replicator, why: str, half_done: bool) -> None:
    """A repair that sent part of its plan leaves the replica neither as it was nor as
    ours: stop mirroring (ALONE, or HELD for the controller; the paths are journaled). One
    that sent nothing leaves things as they were."""
    if half_done and rep.mode is Mode.MIRROR:
        rep.lose(why or "repair failed half-way")
