"""The ALONE journal: which files and byte ranges changed while the peer was not in sync.

Kept outside the replicated directory (in the state directory), append-only, one JSON
record per line. A record is made durable *before* the local change it describes, so a
crash can lose a journal line only for a change that never happened (I5). Data ranges are
recorded per 1 MiB chunk and deduplicated, so a database rewriting the same pages pays one
fdatasync per chunk, not one per write. A completed resync clears it (hafs.resync).

A resync that copies while the application writes (hafs.resync) starts a new *epoch* before
each pass: records are deduplicated within an epoch only, so `changes(since=mark)` names
everything changed since that pass began, even what an earlier record already named.

A sentinel file (`<journal>.live`) exists while a process has the journal open. Found at
open with records in the journal, the last process died without closing it: the journal is
marked unclean, so the next resync compares everything rather than trusting it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from hafs.manifest import Scope

CHUNK = 1 << 20


@dataclass(frozen=True)
class JournalRecord:
    # "data" (chunk changed), "truncate" (size changed; chunk = first chunk affected),
    # "meta" (mode, owner, times, xattrs), "entry" (a name created/removed/renamed under
    # the directory), "moved" (an entry renamed to this path: its whole subtree changed
    # place), "unclean" (a crash while mirroring: the whole tree needs checking)
    kind: str
    path: str
    ino: int
    chunk: int = -1  # for "data": the 1 MiB chunk index


@dataclass(frozen=True)
class Changes:
    """Some of a journal's records, read as what changed."""

    records: tuple[JournalRecord, ...]

    def scope(self) -> Scope:
        """What changed, as the records name it: paths, directories whose entries changed,
        and entries moved (whose subtrees must be compared whole).

        Names of unlinked inodes ("<unlinked inode N>") are left out: their unlink is an
        "entry" record of their directory, and their content is in no tree.
        """
        by_kind: dict[str, set[str]] = {"entry": set(), "moved": set(), "": set()}
        for r in self.records:
            if _named(r.path):
                by_kind.get(r.kind, by_kind[""]).add(r.path)
        return Scope(
            frozenset(by_kind[""]), frozenset(by_kind["entry"]), frozenset(by_kind["moved"])
        )

    def chunks(self, path: str) -> tuple[set[int], int]:
        """(data chunks recorded for path, first chunk a truncate affected or -1)."""
        data = {r.chunk for r in self.records if r.path == path and r.kind == "data"}
        cuts = [r.chunk for r in self.records if r.path == path and r.kind == "truncate"]
        return data, min(cuts, default=-1)


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: set[tuple[str, str, int]] = set()
        self._records: list[JournalRecord] = []
        complete = self._load()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        if os.fstat(self._fd).st_size > complete:
            # Drop a torn last line, or the next record would be glued to it and lost.
            os.ftruncate(self._fd, complete)
        self._live = path.with_name(path.name + ".live")
        if self._live.exists() and self._records:
            self.record("unclean", "", 0)  # died while journaling: a crash, never trusted
        _create_durably(self._live)

    def _load(self) -> int:
        """Read the records; return the length of the journal up to its last complete line."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        complete = data.rfind(b"\n") + 1
        for line in data[:complete].decode(errors="replace").splitlines():
            try:
                d = json.loads(line)
                rec = JournalRecord(d["kind"], d["path"], d["ino"], d.get("chunk", -1))
            except (ValueError, KeyError, TypeError):
                continue  # a damaged line: skip it
            self._remember(rec)
        return complete

    def _remember(self, rec: JournalRecord) -> bool:
        key = (rec.kind, rec.path, rec.chunk)
        if key in self._seen:
            return False
        self._seen.add(key)
        self._records.append(rec)
        return True

    def record(self, kind: str, path: str, ino: int, offset: int = 0, length: int = 0) -> None:
        """Durably note a change to come; data ranges are split into 1 MiB chunks."""
        if kind == "data":
            first, last = offset // CHUNK, max(offset + length - 1, offset) // CHUNK
            recs = [JournalRecord(kind, path, ino, c) for c in range(first, last + 1)]
        elif kind == "truncate":  # the new size: everything from its chunk on may differ
            recs = [JournalRecord(kind, path, ino, offset // CHUNK)]
        else:
            recs = [JournalRecord(kind, path, ino)]
        new = [r for r in recs if self._remember(r)]
        if not new:
            return
        now = time.time()
        lines = "".join(
            json.dumps({"kind": r.kind, "path": r.path, "ino": r.ino, "chunk": r.chunk, "t": now})
            + "\n"
            for r in new
        )
        os.write(self._fd, lines.encode())
        os.fdatasync(self._fd)

    def clear(self) -> None:
        """Forget every record (of every epoch), durably: a completed resync covered them."""
        os.ftruncate(self._fd, 0)
        os.fdatasync(self._fd)
        self._seen.clear()
        self._records.clear()

    def records(self) -> list[JournalRecord]:
        return list(self._records)

    def paths(self) -> list[str]:
        return sorted({r.path for r in self._records})

    @property
    def unclean(self) -> bool:
        """Whether something may have changed that the records do not name."""
        return any(r.kind == "unclean" for r in self._records)

    def changes(self, since: int = 0) -> Changes:
        """The records from mark `since` (see `new_epoch`) on; all of them by default."""
        return Changes(tuple(self._records[since:]))

    def new_epoch(self) -> int:
        """Start deduplicating afresh; returns the mark of the records made from now on."""
        self._seen.clear()
        return len(self._records)

    def close(self) -> None:
        """A clean stop: the records say everything that changed."""
        os.close(self._fd)
        self._live.unlink(missing_ok=True)


def _named(path: str) -> bool:
    return bool(path) and not path.startswith("<")


def _create_durably(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.close(fd)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
