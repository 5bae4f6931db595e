"""Online verify: compare this node's tree with the replica's while the application writes.

One comparison of two live trees reports false differences: a file written between the two
reads, a write the replica has not applied yet. `verify` compares the whole trees once, then
reads again only the paths that differed, on both sides (partial manifests), a few rounds
apart (`Rounds`: bounded in count and in time):

- a path on which both sides then agree was in flight: not reported (`in_flight` counts it);
- a path whose local entry changed between the last two reads is *busy*: being written, so
  it cannot be compared now; it is listed apart, never as a difference;
- a path that still differs while its local entry stayed the same is a difference.

Re-reading stops early once every path left is stable on both sides. The core takes the two
manifest readers as callables (`Reader`: None asks for the whole tree, a Scope for those
paths), so it runs on fakes in the unit tests; `local_reader` and `remote_reader` are the
I/O, `check` the whole operation as `hafs fs verify` and the daemon run it, with the repair
(`hafs.repair`, on the mount's status socket) when asked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hafs import manifest, status, wire
from hafs.manifest import Entry, Scope

Reader = Callable[[Scope | None], dict[str, Entry]]
BUSY = "busy (being written; not compared)"
# A replica reads its whole tree before it answers (as hafs.resync allows it).
MANIFEST_BUILD_TIMEOUT = 3600.0
# The mount's status socket takes requests of at most 64 KiB (hafs.status): paths to
# repair go in batches below that.
REPAIR_BATCH_BYTES = 48 << 10


class RepairError(Exception):
    """The mount did not answer the repair request."""


@dataclass(frozen=True)
class Rounds:
    """How long differing paths are re-read: `count` rounds `interval` s apart, all within
    `limit` s after the whole comparison."""

    count: int = 3
    interval: float = 1.0
    limit: float = 10.0


@dataclass(frozen=True)
class Verdict:
    entries: int  # entries of the local tree
    differences: tuple[str, ...]  # manifest.compare lines of the differing paths
    differing: tuple[str, ...]  # paths that differ, stable on our side
    busy: tuple[str, ...]  # paths being written: not compared
    in_flight: int  # paths that differed at first, then agreed
    rounds: int  # re-reads made
    linked: tuple[str, ...] = ()  # other names of differing hard-linked files

    @property
    def identical(self) -> bool:
        return not self.differing

    def lines(self) -> list[str]:
        """What `hafs fs verify` prints: the first line says `identical:` when it is."""
        busy = [f"{BUSY}: {path}" for path in self.busy]
        if self.identical:
            note = f" ({len(self.busy)} busy: being written, not compared)" if self.busy else ""
            return [f"identical: {self.entries} entries{note}", *busy]
        return [*self.differences, *busy]

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "identical": self.identical}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Verdict:
        """Parse `to_json` output (the daemon's reply); KeyError or TypeError if malformed."""
        return cls(
            entries=int(doc["entries"]),
            differences=tuple(map(str, doc["differences"])),
            differing=tuple(map(str, doc["differing"])),
            busy=tuple(map(str, doc["busy"])),
            in_flight=int(doc["in_flight"]),
            rounds=int(doc["rounds"]),
            linked=tuple(map(str, doc.get("linked", ()))),
        )


def verify(
    local: Reader,
    remote: Reader,
    rounds: Rounds = Rounds(),
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Verdict:
    """Compare the two trees (module docstring); the readers' errors propagate."""
    ours, theirs = _read_both(local, remote, None)
    first = differing_paths(ours, theirs, ours.keys() | theirs.keys())
    suspects = set(first)
    linked = _link_members(suspects, ours, theirs) - suspects
    scope = Scope(paths=frozenset(suspects | linked))
    seen = _Seen(ours, theirs)
    started, done = clock(), 0
    while suspects and done < rounds.count and not seen.settled(suspects):
        if clock() - started + rounds.interval > rounds.limit:
            break
        sleep(rounds.interval)
        done += 1
        seen.add(*_read_both(local, remote, scope))
        suspects = differing_paths(seen.local, seen.remote, suspects)
    busy = {path for path in suspects if seen.local_changed(path)}
    differing = suspects - busy
    a = {p: e for p, e in seen.local.items() if p in differing}
    b = {p: e for p, e in seen.remote.items() if p in differing}
    return Verdict(
        entries=len(ours),
        differences=tuple(manifest.compare(a, b)),
        differing=tuple(sorted(differing)),
        busy=tuple(sorted(busy)),
        in_flight=len(first) - len(suspects),
        rounds=done,
        linked=tuple(sorted(_link_members(differing, ours, theirs) - differing)),
    )


def differing_paths(
    local: dict[str, Entry], remote: dict[str, Entry], paths: Collection[str]
) -> set[str]:
    """The paths (of `paths`) whose entries are not the same on both sides."""
    return {path for path in paths if local.get(path) != remote.get(path)}


class _Seen:
    """The last two reads of each side (the whole manifests count as the first)."""

    def __init__(self, local: dict[str, Entry], remote: dict[str, Entry]) -> None:
        self.local, self.remote = local, remote
        self.before_local: dict[str, Entry] | None = None
        self.before_remote: dict[str, Entry] | None = None

    def add(self, local: dict[str, Entry], remote: dict[str, Entry]) -> None:
        self.before_local, self.local = self.local, local
        self.before_remote, self.remote = self.remote, remote

    def local_changed(self, path: str) -> bool:
        return self.before_local is not None and _changed(self.before_local, self.local, path)

    def settled(self, paths: Collection[str]) -> bool:
        """Whether no path changed on either side between the last two reads."""
        if self.before_local is None or self.before_remote is None:
            return False
        return not any(
            _changed(self.before_local, self.local, p)
            or _changed(self.before_remote, self.remote, p)
            for p in paths
        )


def _changed(before: dict[str, Entry], after: dict[str, Entry], path: str) -> bool:
    return _state(before.get(path)) != _state(after.get(path))


def _state(entry: Entry | None) -> Entry | None:
    # A partial manifest groups hard links among the names it read, the whole one among
    # all: the group's name says nothing about whether the file changed.
    return None if entry is None else dataclasses.replace(entry, link_group="")


def _link_members(paths: set[str], *sides: dict[str, Entry]) -> set[str]:
    """Every name, on either side, of the hard-linked files among `paths`: re-read with
    them, a partial manifest names the groups as the whole one did."""
    groups = {side[p].link_group for side in sides for p in paths if p in side}
    groups.discard("")
    if not groups:
        return set()
    return {p for side in sides for p, e in side.items() if e.link_group in groups}


def _read_both(
    local: Reader, remote: Reader, scope: Scope | None
) -> tuple[dict[str, Entry], dict[str, Entry]]:
    """Both sides at once: the closer in time the two reads, the fewer paths in flight."""
    with ThreadPoolExecutor(1, thread_name_prefix="verify") as pool:
        theirs = pool.submit(remote, scope)
        ours = local(scope)
        return ours, theirs.result()


# ---------------------------------------------------------------------------- I/O


def local_reader(root: str) -> Reader:
    """This node's tree at `root` (a mount point reads what the application sees)."""

    def read(scope: Scope | None) -> dict[str, Entry]:
        if scope is None:
            return manifest.build_manifest(root)
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return manifest.build_partial(fd, scope).entries
        finally:
            os.close(fd)

    return read


def remote_reader(addr: tuple[str, int], key: bytes, timeout: float) -> Reader:
    """The replica's tree, over authenticated VERIFY connections."""

    def read(scope: Scope | None) -> dict[str, Entry]:
        if scope is None:
            return wire.fetch_manifest(addr, key, timeout, MANIFEST_BUILD_TIMEOUT)
        return wire.fetch_partial(addr, key, timeout, scope).entries

    return read


def repair(status_sock: Path, verdict: Verdict, timeout: float | None) -> dict[str, Any]:
    """Ask the mount serving `status_sock` to send the differing paths again (hafs.repair);
    the replies of its batches, summed; RepairError if it does not answer."""
    total: dict[str, Any] = {"ok": True, **dict.fromkeys(_COUNTERS, 0)}
    messages = []
    for paths in _batches([*verdict.differing, *verdict.linked]):
        try:
            reply = status.command(status_sock, {"cmd": "repair", "paths": paths}, timeout)
        except (OSError, ValueError) as e:
            raise RepairError(f"no hafs mount answers at {status_sock}: {e}") from e
        messages.append(str(reply.get("message", "")))
        for name in _COUNTERS:
            total[name] += reply.get(name, 0)
        if not reply.get("ok"):
            total["ok"] = False
            break
    total["message"] = "; ".join(messages)
    return total


_COUNTERS = ("files_copied", "bytes_sent", "removed", "created", "updated", "paused_seconds")


def repair_line(reply: dict[str, Any]) -> str:
    """The repair's outcome as `hafs fs verify --repair` and `hafs verify --repair` say it."""
    paused = float(reply.get("paused_seconds", 0.0))
    return f"repair: {reply.get('message', '')} (writes paused {paused:.3f} s)"


def _batches(paths: list[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for path in paths:
        length = len(json.dumps(path)) + 2
        if batch and size + length > REPAIR_BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(path)
        size += length
    if batch:
        yield batch


@dataclass(frozen=True)
class Checked:
    """One directory verified: the verdict, and if repaired, the one before and the
    mount's reply."""

    dir: str
    verdict: Verdict
    before: Verdict | None = None
    repair: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"dir": self.dir, "verdict": self.verdict.to_json()}
        if self.before is not None:
            doc["before"] = self.before.to_json()
            doc["repair"] = self.repair
        return doc


def check(
    root: str,
    addr: tuple[str, int],
    key: bytes,
    timeout: float,
    *,
    repair_via: Path | None = None,
    rounds: Rounds = Rounds(),
) -> Checked:
    """Verify `root` against the replica at `addr`; with `repair_via` (the mount's status
    socket), repair what differs and verify again."""
    local, remote = local_reader(root), remote_reader(addr, key, timeout)
    verdict = verify(local, remote, rounds)
    if repair_via is None or verdict.identical:
        return Checked(root, verdict)
    reply = repair(repair_via, verdict, None)
    return Checked(root, verify(local, remote, rounds), verdict, reply)
