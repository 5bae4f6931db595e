"""Block hashes (hafs.blocks): the request and reply codec, confinement, the primary's
comparison, batching, and the replica server answering over a real VERIFY connection."""

from __future__ import annotations

import json
import os
import random
import socket
import threading
from pathlib import Path

import pytest

from hafs import blocks, wire
from hafs import protocol as p
from hafs.blocks import BLOCK, BlockItem, BlockRequest, FileBlocks
from hafs.manifest import Entry, ManifestError
from hafs.replica import ReplicaServer
from hafs.resync import cheap_compare_trusted, plan_resync
from hafs.state import StateStore

SALT = bytes(range(16))


def request(*items: BlockItem, block: int = BLOCK) -> BlockRequest:
    return BlockRequest(block, SALT, items)


def root_fd(path: Path) -> int:
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def parse(req: BlockRequest, data: bytes, pieces: int = 7) -> blocks.ReplyParser:
    """Feed a reply cut at random places, as frames may cut it."""
    parser = blocks.ReplyParser(req)
    cuts = sorted(random.Random(len(data)).sample(range(len(data) + 1), pieces))
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        parser.feed(data[start:end])
    return parser


# ---------------------------------------------------------------------------- requests


def test_request_round_trip_keeps_odd_names() -> None:
    req = request(BlockItem("a/b", 0, 3), BlockItem("caf\udce9", 7, 1))
    assert BlockRequest.from_bytes(req.to_bytes()) == req


@pytest.mark.parametrize(
    "doc",
    [
        b"not json",
        b"[]",
        json.dumps({"block": 1000, "salt": SALT.hex(), "items": []}).encode(),
        json.dumps({"block": 2 << 20, "salt": SALT.hex(), "items": []}).encode(),
        json.dumps({"block": True, "salt": SALT.hex(), "items": []}).encode(),
        json.dumps({"block": BLOCK, "salt": "00", "items": []}).encode(),
        json.dumps({"block": BLOCK, "salt": "zz" * 16, "items": []}).encode(),
        json.dumps({"block": BLOCK, "salt": SALT.hex(), "items": {}}).encode(),
        json.dumps({"block": BLOCK, "salt": SALT.hex(), "items": [["a", 0]]}).encode(),
        json.dumps({"block": BLOCK, "salt": SALT.hex(), "items": [["../x", 0, 1]]}).encode(),
        json.dumps({"block": BLOCK, "salt": SALT.hex(), "items": [["/etc/passwd", 0, 1]]}).encode(),
        json.dumps({"block": BLOCK, "salt": SALT.hex(), "items": [["a//b", 0, 1]]}).encode(),
        json.dumps({"block": BLOCK, "salt": SALT.hex(), "items": [[".", 0, 1]]}).encode(),
        json.dumps({"block": BLOCK, "salt": SALT.hex(), "items": [["a\u0000b", 0, 1]]}).encode(),
        json.dumps({"block": BLOCK, "salt": SALT.hex(), "items": [["a", -1, 1]]}).encode(),
        json.dumps({"block": BLOCK, "salt": SALT.hex(), "items": [["a", 0, 0]]}).encode(),
        json.dumps({"block": BLOCK, "salt": SALT.hex(), "items": [["a", 0, 1.0]]}).encode(),
        json.dumps(
            {"block": BLOCK, "salt": SALT.hex(), "items": [["a", 0, blocks.MAX_ITEM_BLOCKS + 1]]}
        ).encode(),
        json.dumps(
            {
                "block": BLOCK,
                "salt": SALT.hex(),
                "items": [[f"f{i}", 0, blocks.MAX_ITEM_BLOCKS] for i in range(17)],
            }
        ).encode(),
        json.dumps(
            {
                "block": BLOCK,
                "salt": SALT.hex(),
                "items": [["f", 0, 1]] * (blocks.MAX_ITEMS + 1),
            }
        ).encode(),
    ],
)
def test_malformed_requests_are_refused(doc: bytes) -> None:
    with pytest.raises(ManifestError):
        BlockRequest.from_bytes(doc)


# ---------------------------------------------------------------------------- replies


def test_reply_hashes_each_block_of_the_range(tmp_path: Path) -> None:
    data = os.urandom(5 * BLOCK + 100)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    req = request(
        BlockItem("d/f", 0, 4),
        BlockItem("d/f", 4, 4),
        BlockItem("d/f", 9, 1),
        BlockItem("empty", 0, 1),
    )
    fd = root_fd(tmp_path)
    try:
        parser = parse(req, blocks.reply(fd, req, exact=True))
    finally:
        os.close(fd)
    assert parser.done and parser.exact is True
    head, tail, beyond, empty = parser.results
    hasher = blocks.Hasher(BLOCK, SALT)
    expected = [hasher.digest(data[i : i + BLOCK]) for i in range(0, len(data), BLOCK)]
    assert head == FileBlocks(len(data), 0, b"".join(expected[:4]))
    assert tail == FileBlocks(len(data), 4, b"".join(expected[4:]))  # 2 of the 4 asked
    assert beyond == FileBlocks(len(data), 9, b"")
    assert empty == FileBlocks(0, 0, b"")
    assert tail is not None and tail.get(5) == expected[5] and tail.get(6) is None


def test_salt_changes_every_hash() -> None:
    a, b = blocks.Hasher(BLOCK, SALT), blocks.Hasher(BLOCK, bytes(16))
    assert a.digest(b"x" * 10) != b.digest(b"x" * 10)


def test_what_is_not_a_file_beneath_the_root_is_absent(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    root = tmp_path / "root"
    root.mkdir()
    (root / "dir").mkdir()
    (root / "link").symlink_to(outside / "secret")
    (root / "dirlink").symlink_to(outside)
    os.mkfifo(root / "fifo")
    names = ("missing", "dir", "link", "dirlink/secret", "fifo", "dir/missing/x")
    req = request(*(BlockItem(n, 0, 1) for n in names))
    fd = root_fd(root)
    try:
        parser = parse(req, blocks.reply(fd, req, exact=False), pieces=2)
    finally:
        os.close(fd)
    assert parser.exact is False
    assert parser.results == [None] * len(names)


@pytest.mark.parametrize(
    "reply",
    [
        b"\x00" + blocks.RECORD.pack(2, 0, 0),  # unknown status
        b"\x00" + blocks.RECORD.pack(blocks.FILE, 10, 2) + bytes(32),  # 2 hashes for 1 block
        b"\x00" + blocks.RECORD.pack(blocks.ABSENT, 5, 0),  # absent but sized
        b"\x00" + blocks.RECORD.pack(blocks.FILE, 10, 1) + bytes(16) + b"extra",
    ],
)
def test_malformed_replies_are_refused(reply: bytes) -> None:
    with pytest.raises(ManifestError):
        blocks.ReplyParser(request(BlockItem("f", 0, 1))).feed(reply)


def test_a_short_reply_is_not_done() -> None:
    parser = blocks.ReplyParser(request(BlockItem("f", 0, 1)))
    parser.feed(b"\x01" + blocks.RECORD.pack(blocks.FILE, 10, 1) + bytes(15))
    assert not parser.done


# ---------------------------------------------------------------------------- the primary


def test_differing_runs_coalesce_and_keep_holes() -> None:
    hasher = blocks.Hasher(BLOCK, SALT)
    ours = bytearray(os.urandom(8 * BLOCK))
    theirs_data = bytearray(ours[: 6 * BLOCK])
    theirs_data[BLOCK + 5] ^= 1  # block 1
    theirs_data[2 * BLOCK] ^= 1  # block 2: one run with block 1
    theirs_data[4 * BLOCK + 9] ^= 1  # block 4
    ours[6 * BLOCK : 7 * BLOCK] = bytes(BLOCK)  # past their end, zeros: a hole
    hashes = b"".join(hasher.digest(theirs_data[i : i + BLOCK]) for i in range(0, 6 * BLOCK, BLOCK))
    theirs = FileBlocks(len(theirs_data), 0, hashes)
    runs = blocks.differing_runs(memoryview(bytes(ours)), 0, hasher, theirs)
    assert [(at, len(data)) for at, data in runs] == [
        (BLOCK, 2 * BLOCK),
        (4 * BLOCK, BLOCK),
        (7 * BLOCK, BLOCK),
    ]
    assert runs[0][1] == bytes(ours[BLOCK : 3 * BLOCK])


def test_split_covers_big_and_empty_files() -> None:
    assert blocks.split("e", 0) == [BlockItem("e", 0, 1)]
    items = blocks.split("big", (blocks.ITEM_BLOCKS + 3) * BLOCK - 1)
    assert items == [
        BlockItem("big", 0, blocks.ITEM_BLOCKS),
        BlockItem("big", blocks.ITEM_BLOCKS, 3),
    ]


def test_remote_hashes_batches_ahead_and_in_order() -> None:
    asked: list[tuple[BlockItem, ...]] = []

    def fetch(req: BlockRequest) -> list[FileBlocks | None]:
        asked.append(req.items)
        return [FileBlocks(i.first, i.first, b"") for i in req.items]

    big = blocks.BATCH_BLOCKS // 2
    items = [BlockItem(f"f{i}", 0, big) for i in range(5)]
    source = blocks.RemoteHashes(fetch, items, SALT)
    try:
        for item in items:
            assert source.get(item) == FileBlocks(0, 0, b"")
        lonely = BlockItem("never-announced", 3, 1)
        assert source.get(lonely) == FileBlocks(3, 3, b"")
    finally:
        source.close()
    assert [len(batch) for batch in asked] == [2, 2, 1, 1]
    assert asked[-1] == (lonely,)


# ---------------------------------------------------------------------------- the plan


def file_entry(path: str, size: int = 10, mtime: int = 1, digest: str = "") -> Entry:
    return Entry(path, "file", 0o644, 0, 0, size, mtime, digest=digest)


def test_cheap_manifests_trust_size_and_mtime_only_when_told() -> None:
    root = Entry(".", "dir", 0o755, 0, 0, 0, 1)
    local = {".": root, "same": file_entry("same"), "newer": file_entry("newer", mtime=2)}
    local["empty"] = file_entry("empty", size=0)
    remote = {".": root, "same": file_entry("same"), "newer": file_entry("newer")}
    remote["empty"] = file_entry("empty", size=0)
    assert plan_resync(local, remote, size_mtime_trusted=True).rewrite == {"newer"}
    assert plan_resync(local, remote).rewrite == {"newer", "same"}  # the empty one cannot
    suspects = {"same", "absent"}
    assert plan_resync(local, remote, size_mtime_trusted=True, suspects=suspects).rewrite == {
        "newer",
        "same",
    }
    # Digests on both sides decide, whatever the mtimes.
    local["same"] = file_entry("same", mtime=5, digest="aa")
    remote["same"] = file_entry("same", digest="aa")
    assert "same" not in plan_resync(local, remote).rewrite


def test_cheap_compare_needs_an_exact_replica_and_a_clean_journal() -> None:
    assert cheap_compare_trusted(replica_exact=True, journal_unclean=False)
    assert not cheap_compare_trusted(replica_exact=False, journal_unclean=False)
    assert not cheap_compare_trusted(replica_exact=True, journal_unclean=True)


# ---------------------------------------------------------------------------- the server


def test_replica_answers_block_requests_on_one_connection(server: ReplicaServer) -> None:
    data = os.urandom(3 * BLOCK)
    Path(server.data_dir, "f").write_bytes(data)
    client = wire.BlockClient(server.listen_addr, server.key, 5.0, 5.0)
    try:
        for first in (0, 2):
            (got,) = client.hashes(request(BlockItem("f", first, 1)))
            hasher = blocks.Hasher(BLOCK, SALT)
            chunk = data[first * BLOCK : (first + 1) * BLOCK]
            assert got == FileBlocks(len(data), first, hasher.digest(chunk))
        assert client.exact is False  # a fresh state: never made identical
    finally:
        client.close()
    assert wire.fetch_exact(server.listen_addr, server.key, 5.0) is False


def test_malformed_block_request_closes_only_that_connection(server: ReplicaServer) -> None:
    sock, keys = wire.connect(server.listen_addr, server.key, p.Purpose.VERIFY, 5.0)
    with sock:
        writer = p.FrameWriter(keys.send)
        sock.sendall(b"".join(writer.seal(p.FrameType.BLOCKS_REQ, b'{"block": 3}')))
        sock.settimeout(5.0)
        assert wire.recv_frames(sock, p.FrameReader(keys.recv)) == []  # closed, no reply
    # The server goes on answering.
    assert wire.fetch_exact(server.listen_addr, server.key, 5.0) is False


def test_block_client_reports_a_closed_server(tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        client = wire.BlockClient(listener.getsockname()[:2], b"k" * 32, 1.0, 1.0)

        def hang_up() -> None:
            conn, _ = listener.accept()
            conn.close()

        thread = threading.Thread(target=hang_up)
        thread.start()
        with pytest.raises((p.ProtocolError, OSError)):
            client.hashes(request(BlockItem("f", 0, 1)))
        thread.join()
        client.close()


def test_exactness_follows_the_directory_history(tmp_path: Path) -> None:
    data, state_dir = tmp_path / "data", tmp_path / "state"
    data.mkdir()
    state = StateStore(state_dir)
    srv = ReplicaServer(str(data), ("127.0.0.1", 0), b"k" * 32, state)
    try:
        assert not srv.copy_exact()  # never made identical to a primary's
        state.update(exact=srv.mark_exact())
        assert srv.copy_exact()
        (state_dir / "journal").write_text('{"kind": "data"}\n')  # a mount journaled here
        assert not srv.copy_exact()
        (state_dir / "journal.live").touch()  # a mount died here
        state.update(exact=srv.mark_exact())  # a resync since: the stale sentinel goes
        assert srv.copy_exact() and not (state_dir / "journal.live").exists()
        (state_dir / "journal.live").touch()
        assert not srv.copy_exact()
        (state_dir / "journal.live").unlink()
        state.update(mode="ALONE", generation=state.current.generation + 1)  # went ALONE
        assert not srv.copy_exact()
        state.update(exact=srv.mark_exact(), replica_of="t@x", applying=True)
        assert srv.copy_exact()
    finally:
        srv.listener.close()
        os.close(srv.root_fd)
    # A session cut off unsynced (the process or node crashed): neither exact nor the
    # copy its last session left.
    again = ReplicaServer(str(data), ("127.0.0.1", 0), b"k" * 32, StateStore(state_dir))
    try:
        assert not again.copy_exact()
        assert again.state.current.replica_of == "" and not again.state.current.applying
    finally:
        again.listener.close()
        os.close(again.root_fd)
