"""Unit tests of hafs.journal: the ALONE journal of changed files and 1 MiB chunks (I5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hafs.journal import CHUNK, Journal, JournalRecord

MiB = 1 << 20


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "journal"


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_chunk_is_one_mib() -> None:
    assert MiB == CHUNK


def test_data_records_split_into_chunks(path: Path) -> None:
    j = Journal(path)
    j.record("data", "/db/ibdata1", 7, offset=MiB - 10, length=20)  # straddles chunks 0 and 1
    j.record("data", "/db/big", 8, offset=5 * MiB, length=3 * MiB)  # exactly chunks 5..7
    j.record("data", "/db/empty", 9, offset=2 * MiB + 1, length=0)  # a zero-length range
    j.close()
    assert j.records() == [
        JournalRecord("data", "/db/ibdata1", 7, 0),
        JournalRecord("data", "/db/ibdata1", 7, 1),
        JournalRecord("data", "/db/big", 8, 5),
        JournalRecord("data", "/db/big", 8, 6),
        JournalRecord("data", "/db/big", 8, 7),
        JournalRecord("data", "/db/empty", 9, 2),
    ]


def test_records_deduplicated_per_chunk(path: Path) -> None:
    j = Journal(path)
    for i in range(100):  # a database rewriting the same pages
        j.record("data", "/f", 2, offset=(i % 4) * 16384, length=16384)
    j.record("data", "/f", 2, offset=MiB, length=1)
    j.record("data", "/f", 2, offset=0, length=2 * MiB)  # chunks 0 and 1, both known
    j.record("meta", "/f", 2)
    j.record("meta", "/f", 2)
    j.record("entry", "/f", 2)
    j.close()
    expected = [
        JournalRecord("data", "/f", 2, 0),
        JournalRecord("data", "/f", 2, 1),
        JournalRecord("meta", "/f", 2),
        JournalRecord("entry", "/f", 2),
    ]
    assert j.records() == expected
    assert len(_lines(path)) == len(expected)  # duplicates never reach the disk


def test_records_survive_reopen_and_stay_deduplicated(path: Path) -> None:
    j = Journal(path)
    j.record("data", "/a", 2, offset=0, length=10)
    j.record("meta", "/b", 3)
    j.close()
    j2 = Journal(path)
    assert j2.records() == [JournalRecord("data", "/a", 2, 0), JournalRecord("meta", "/b", 3)]
    j2.record("data", "/a", 2, offset=5, length=5)  # known before the restart: no new line
    j2.record("data", "/a", 2, offset=MiB, length=1)  # new chunk: appended
    j2.close()
    lines = _lines(path)
    assert [(d["kind"], d["path"], d["chunk"]) for d in lines] == [
        ("data", "/a", 0),
        ("meta", "/b", -1),
        ("data", "/a", 1),
    ]
    assert Journal(path).records() == [
        JournalRecord("data", "/a", 2, 0),
        JournalRecord("meta", "/b", 3),
        JournalRecord("data", "/a", 2, 1),
    ]


@pytest.mark.parametrize("torn", ['{"kind": "data", "pa', "{", "garbage", '{"kind": "meta"}'])
def test_torn_last_line_ignored(path: Path, torn: str) -> None:
    j = Journal(path)
    j.record("meta", "/ok", 2)
    j.close()
    with open(path, "a") as f:
        f.write(torn)  # a crash in the middle of a write: no newline
    j2 = Journal(path)
    assert j2.records() == [JournalRecord("meta", "/ok", 2)]
    j2.close()


def test_record_after_torn_line_is_readable(path: Path) -> None:
    """A line appended after a torn one must not be glued to it and lost."""
    j = Journal(path)
    j.record("meta", "/ok", 2)
    j.close()
    with open(path, "a") as f:
        f.write('{"kind": "data", "path": "/to')
    j2 = Journal(path)
    j2.record("meta", "/after", 3)
    j2.close()
    assert JournalRecord("meta", "/after", 3) in Journal(path).records()


def test_paths_lists_names(path: Path) -> None:
    j = Journal(path)
    j.record("data", "/z/file", 2, offset=0, length=3 * MiB)
    j.record("meta", "/a", 3)
    j.record("entry", "/m/new name", 4)
    j.record("inflight", "/a", 3)
    assert j.paths() == ["/a", "/m/new name", "/z/file"]
    j.close()
    assert Journal(path).paths() == ["/a", "/m/new name", "/z/file"]


def test_empty_and_missing_journal(path: Path) -> None:
    j = Journal(path)
    assert j.records() == [] and j.paths() == []
    j.close()
    assert path.exists()
    assert Journal(path).records() == []


def test_records_returns_a_copy(path: Path) -> None:
    j = Journal(path)
    j.record("meta", "/a", 2)
    j.records().clear()
    assert j.records() == [JournalRecord("meta", "/a", 2)]
    j.close()


def test_journal_file_private(path: Path) -> None:
    Journal(path).close()
    assert path.stat().st_mode & 0o077 == 0


def test_binary_garbage_tail_ignored(path: Path) -> None:
    """A torn write can leave any bytes (a block of zeros, junk): the journal still opens."""
    j = Journal(path)
    j.record("meta", "/ok", 2)
    j.close()
    with open(path, "ab") as f:
        f.write(b"\xff\xfe\x00\x00garbage")
    j2 = Journal(path)
    assert j2.records() == [JournalRecord("meta", "/ok", 2)]
    j2.record("meta", "/next", 3)
    j2.close()
    assert Journal(path).records() == [
        JournalRecord("meta", "/ok", 2),
        JournalRecord("meta", "/next", 3),
    ]


def test_truncate_is_one_record_from_the_new_size_on(tmp_path: Path) -> None:
    """A size change names where the file may now differ, whatever the old size was."""
    journal = Journal(tmp_path / "journal")
    journal.record("truncate", "db/ib_logfile0", 7, 5 * CHUNK + 3)
    journal.record("truncate", "db/ib_logfile0", 7, 5 * CHUNK + 9)  # same chunk: deduplicated
    assert journal.records() == [JournalRecord("truncate", "db/ib_logfile0", 7, 5)]
    journal.close()


def test_a_journal_left_open_with_records_becomes_unclean(path: Path) -> None:
    j = Journal(path)
    j.record("data", "f", 2, offset=0, length=1)
    assert not j.unclean
    # No close(): the process died. Reopened, the journal cannot be trusted any more.
    reopened = Journal(path)
    assert reopened.unclean
    reopened.close()


def test_a_journal_closed_cleanly_stays_trusted(path: Path) -> None:
    j = Journal(path)
    j.record("data", "f", 2, offset=0, length=1)
    j.close()
    reopened = Journal(path)
    assert not reopened.unclean
    reopened.close()


def test_scope_and_chunks(path: Path) -> None:
    j = Journal(path)
    j.record("data", "d/f", 2, offset=MiB, length=1)
    j.record("truncate", "d/f", 2, offset=3 * MiB + 1)
    j.record("meta", "d/g", 3)
    j.record("entry", "d", 4)
    j.record("moved", "d/new", 4)
    j.record("entry", "<unlinked inode 9>", 9)
    scope = j.changes().scope()
    assert scope.paths == {"d/f", "d/g"}
    assert scope.dirs == {"d"}
    assert scope.trees == {"d/new"}
    assert j.changes().chunks("d/f") == ({1}, 3)
    j.close()


def test_epoch_names_what_changed_since_its_mark(path: Path) -> None:
    """A resync pass copies while writes go on: the next pass must see every chunk written
    since it began, even chunks an earlier record (before the mark) already named."""
    j = Journal(path)
    j.record("data", "db/ibdata1", 7, offset=0, length=1)
    j.record("meta", "db/old", 8)
    mark = j.new_epoch()
    j.record("data", "db/ibdata1", 7, offset=10, length=1)  # chunk 0 again: kept
    j.record("data", "db/ibdata1", 7, offset=10, length=1)  # but once per epoch
    since = j.changes(since=mark)
    assert since.records == (JournalRecord("data", "db/ibdata1", 7, 0),)
    assert since.scope().paths == {"db/ibdata1"}
    assert j.changes().scope().paths == {"db/ibdata1", "db/old"}
    j.close()
    reopened = Journal(path)  # after a restart, every epoch's records are there
    assert reopened.changes().scope().paths == {"db/ibdata1", "db/old"}
    reopened.close()
