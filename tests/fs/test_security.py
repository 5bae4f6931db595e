"""Security of a real replica server process over TCP (I4 and the authenticated wire).

Every test runs `hafs fs replica` on 127.0.0.1 and attacks it from this process: a wrong key,
garbage, forged frames, and authenticated streams that try to leave the replicated root.
Each must be refused and logged, nothing may appear outside the root, and the server must
keep serving a good primary afterwards.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hafs import ops, wire
from hafs import protocol as p
from hafs.ops import ROOT_INO, Op, OpFrame
from tests.support import cluster

TIMEOUT = 10.0
REG = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


@dataclass
class Target:
    proc: cluster.ReplicaProc
    addr: tuple[str, int]
    key: bytes
    root: Path  # the replicated directory
    outside: Path  # a directory next to it that nothing may touch
    base: Path  # the parent of both


def _tree(path: Path) -> dict[str, tuple[int, int, bytes]]:
    out: dict[str, tuple[int, int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            f = Path(dirpath) / name
            st_ = f.lstat()
            content = f.read_bytes() if stat.S_ISREG(st_.st_mode) else b""
            out[str(f.relative_to(path))] = (st_.st_mode, st_.st_mtime_ns, content)
    return out


@pytest.fixture
def target(tmp_path: Path, cluster_key: Path, hafs_bin: Path) -> Iterator[Target]:
    root, outside, state = tmp_path / "replica", tmp_path / "outside", tmp_path / "rs"
    for d in (root, outside, state):
        d.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (outside / "sub").mkdir()
    port = cluster.free_port()
    with cluster.replica(
        root, listen=f"127.0.0.1:{port}", key=cluster_key, state_dir=state, hafs_bin=hafs_bin
    ) as proc:
        yield Target(
            proc, ("127.0.0.1", port), p.read_key(str(cluster_key)), root, outside, tmp_path
        )
        assert proc.running(), f"replica died:\n{proc.log_tail()}"


@pytest.fixture
def untouched(target: Target) -> Iterator[Callable[[], None]]:
    """Asserts (now when called, and at the end) that nothing outside the root changed."""
    outside_before = _tree(target.outside)
    base_before = sorted(os.listdir(target.base))

    def check() -> None:
        assert _tree(target.outside) == outside_before
        # Only the server's own state dir may change; no new entry next to the root.
        assert sorted(os.listdir(target.base)) == base_before

    yield check
    check()


class Primary:
    """A hand-driven primary: authenticated with hafs.wire, frames sealed by FrameWriter."""

    def __init__(self, target: Target, key: bytes | None = None) -> None:
        self.sock, keys = wire.connect(
            target.addr, target.key if key is None else key, p.Purpose.MIRROR, TIMEOUT
        )
        self.writer = p.FrameWriter(keys.send)
        self.reader = p.FrameReader(keys.recv)

    def send(self, frame: OpFrame) -> int:
        self.sock.sendall(b"".join(self.writer.seal(p.FrameType.OP, *ops.encode(frame))))
        return self.writer.seq

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def bye(self) -> int:
        self.sock.sendall(b"".join(self.writer.seal(p.FrameType.BYE)))
        return self.writer.seq

    def replies_until_close(self) -> list[p.Frame]:
        """Every frame the replica sends until it closes the connection."""
        frames: list[p.Frame] = []
        while True:
            try:
                got = wire.recv_frames(self.sock, self.reader)
            except ConnectionResetError:
                return frames
            if not got:
                return frames
            frames += got

    def wait_ack(self, seq: int) -> None:
        while True:
            frames = wire.recv_frames(self.sock, self.reader)
            assert frames, "replica closed instead of acknowledging"
            for f in frames:
                assert f.ftype is p.FrameType.ACK, f
                if p.ACK_BODY.unpack(f.payload)[0] >= seq:
                    return

    def close(self) -> None:
        self.sock.close()


def _wait_log(proc: cluster.ReplicaProc, *needles: str) -> str:
    """Wait until the replica's log holds every needle (it logs from another thread)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        text = proc.log_path.read_text(errors="replace")
        if all(n in text for n in needles):
            return text
        if time.monotonic() > deadline:
            pytest.fail(f"replica log lacks {needles}:\n{proc.log_tail()}")
        time.sleep(0.05)


def _assert_still_serves(target: Target, name: bytes = b"good") -> None:
    """A correct primary can still connect and have its ops applied."""
    prim = Primary(target)
    try:
        prim.send(OpFrame(Op.CREATE, (ROOT_INO, 100, REG, 0, 0), (name,)))
        prim.send(OpFrame(Op.WRITE, (100, 0), (b"still alive",)))
        prim.wait_ack(prim.bye())
    finally:
        prim.close()
    assert (target.root / name.decode()).read_bytes() == b"still alive"
    assert target.proc.running()
    assert target.proc.status()["role"] == "replica"


def _failed_seqs(frames: list[p.Frame]) -> list[int]:
    return [p.FAILED_BODY.unpack(f.payload)[0] for f in frames if f.ftype is p.FrameType.FAILED]


# -- authentication -----------------------------------------------------------------------


def test_wrong_key_refused(target: Target, untouched: Callable[[], None]) -> None:
    with pytest.raises((p.ProtocolError, OSError)):
        Primary(target, key=os.urandom(32))
    _wait_log(target.proc, "refused connection from", "failed to prove")
    assert os.listdir(target.root) == []
    _assert_still_serves(target)


def test_wrong_key_cannot_send_ops(target: Target, untouched: Callable[[], None]) -> None:
    """Even pushing frames after a failed proof (without waiting for AUTH_OK) does nothing."""
    with socket.create_connection(target.addr, timeout=TIMEOUT) as s:
        ns = p.parse_hello(wire.recv_exact(s, p.HELLO.size))
        nc = os.urandom(p.NONCE_LEN)
        bad_key = os.urandom(32)
        s.sendall(p.client_auth(bad_key, ns, nc, p.Purpose.MIRROR))
        w = p.FrameWriter(p.derive_keys(bad_key, ns, nc, is_client=True).send)
        frame = OpFrame(Op.CREATE, (ROOT_INO, 2, REG, 0, 0), (b"pwned",))
        rest = b""
        with contextlib.suppress(OSError):  # reset by the server: closed all the same
            s.sendall(b"".join(w.seal(p.FrameType.OP, *ops.encode(frame))))
            rest = s.recv(100)
        assert rest == b""  # closed without AUTH_OK
    _wait_log(target.proc, "refused connection from")
    assert os.listdir(target.root) == []
    _assert_still_serves(target)


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(100),
        os.urandom(p.AUTH.size),
        os.urandom(5000),
        b"\x00",  # then close: a truncated handshake
    ],
    ids=["http", "auth-sized", "large", "short"],
)
def test_garbage_refused(target: Target, untouched: Callable[[], None], garbage: bytes) -> None:
    with socket.create_connection(target.addr, timeout=TIMEOUT) as s:
        p.parse_hello(wire.recv_exact(s, p.HELLO.size))
        rest = b""
        # The server may reset the connection as soon as it has read a bad AUTH.
        with contextlib.suppress(ConnectionError, OSError):
            s.sendall(garbage)
            s.shutdown(socket.SHUT_WR)
            rest = s.recv(100)
        assert rest == b""  # no AUTH_OK, just closed
    _wait_log(target.proc, "refused connection from")
    assert os.listdir(target.root) == []
    _assert_still_serves(target)


def test_verify_purpose_cannot_apply_ops(target: Target, untouched: Callable[[], None]) -> None:
    sock, keys = wire.connect(target.addr, target.key, p.Purpose.VERIFY, TIMEOUT)
    with sock:
        w = p.FrameWriter(keys.send)
        frame = OpFrame(Op.CREATE, (ROOT_INO, 2, REG, 0, 0), (b"pwned",))
        sock.sendall(b"".join(w.seal(p.FrameType.OP, *ops.encode(frame))))
        while sock.recv(1 << 16):
            pass
    _wait_log(target.proc, "expected a manifest request")
    assert os.listdir(target.root) == []
    _assert_still_serves(target)


# -- forged frames after a valid handshake -------------------------------------------------


def test_bad_mac_refused(target: Target, untouched: Callable[[], None]) -> None:
    prim = Primary(target)
    frame = OpFrame(Op.CREATE, (ROOT_INO, 2, REG, 0, 0), (b"forged",))
    data = bytearray(b"".join(prim.writer.seal(p.FrameType.OP, *ops.encode(frame))))
    data[-1] ^= 0x01
    prim.send_raw(bytes(data))
    assert prim.replies_until_close() == []
    prim.close()
    _wait_log(target.proc, "refused", "bad MAC")
    assert os.listdir(target.root) == []
    _assert_still_serves(target)


def test_frame_sealed_with_cluster_key_refused(
    target: Target, untouched: Callable[[], None]
) -> None:
    """Frames must be sealed with the session key, not the long-term key."""
    prim = Primary(target)
    frame = OpFrame(Op.CREATE, (ROOT_INO, 2, REG, 0, 0), (b"forged",))
    prim.send_raw(b"".join(p.FrameWriter(target.key).seal(p.FrameType.OP, *ops.encode(frame))))
    assert prim.replies_until_close() == []
    prim.close()
    _wait_log(target.proc, "bad MAC")
    assert os.listdir(target.root) == []
    _assert_still_serves(target)


def test_frame_replayed_from_another_session_refused(
    target: Target, untouched: Callable[[], None]
) -> None:
    first = Primary(target)
    frame = OpFrame(Op.CREATE, (ROOT_INO, 2, REG, 0, 0), (b"once",))
    recorded = b"".join(first.writer.seal(p.FrameType.OP, *ops.encode(frame)))
    first.send_raw(recorded)
    first.wait_ack(first.bye())
    first.close()
    (target.root / "once").unlink()  # so a replay would show
    second = Primary(target)
    second.send_raw(recorded)
    assert second.replies_until_close() == []
    second.close()
    _wait_log(target.proc, "bad MAC")
    assert os.listdir(target.root) == []
    _assert_still_serves(target)


def test_frame_replayed_within_session_refused(
    target: Target, untouched: Callable[[], None]
) -> None:
    prim = Primary(target)
    frame = OpFrame(Op.MKDIR, (ROOT_INO, 2, DIR, 0, 0), (b"d",))
    recorded = b"".join(prim.writer.seal(p.FrameType.OP, *ops.encode(frame)))
    prim.send_raw(recorded)
    prim.wait_ack(1)
    os.rmdir(target.root / "d")
    prim.send_raw(recorded)
    assert prim.replies_until_close() == []
    prim.close()
    _wait_log(target.proc, "expected sequence 2")
    assert os.listdir(target.root) == []
    _assert_still_serves(target)


def test_malformed_op_payload_refused(target: Target, untouched: Callable[[], None]) -> None:
    prim = Primary(target)
    prim.send_raw(b"".join(prim.writer.seal(p.FrameType.OP, b"\x03\x05garbage")))
    prim.replies_until_close()
    prim.close()
    _wait_log(target.proc, "refused", "malformed op frame")
    assert os.listdir(target.root) == []
    _assert_still_serves(target)


# -- authenticated streams that try to leave the root --------------------------------------


def _escape_names(target: Target) -> list[bytes]:
    return [
        b"../escape",
        b"/tmp/abs",
        str(target.outside / "abs").encode(),
        b"sub/../../escape",
    ]


def _attempts(target: Target, name: bytes) -> list[OpFrame]:
    """Ops that would create or move something to NAME."""
    return [
        OpFrame(Op.CREATE, (ROOT_INO, 2, REG, 0, 0), (name,)),
        OpFrame(Op.MKDIR, (ROOT_INO, 2, DIR, 0, 0), (name,)),
        OpFrame(Op.SYMLINK, (ROOT_INO, 2, 0, 0), (name, b"x")),
        OpFrame(Op.MKNOD, (ROOT_INO, 2, stat.S_IFIFO | 0o644, 0, 0, 0), (name,)),
    ]


def _refused_stream(target: Target, setup: list[OpFrame], attack: OpFrame) -> None:
    """Send SETUP (must be applied) then ATTACK: expect FAILED for it, then close."""
    prim = Primary(target)
    try:
        for frame in setup:
            prim.send(frame)
        if setup:
            prim.wait_ack(len(setup))
        seq = prim.send(attack)
        frames = prim.replies_until_close()
    finally:
        prim.close()
    assert _failed_seqs(frames) == [seq], frames
    _wait_log(target.proc, f"op {seq}: refused {attack.op.name}")


@pytest.mark.parametrize("which", range(4), ids=["CREATE", "MKDIR", "SYMLINK", "MKNOD"])
def test_escaping_names_refused(target: Target, untouched: Callable[[], None], which: int) -> None:
    tmp_abs = Path("/tmp/abs")
    existed = tmp_abs.exists() or tmp_abs.is_symlink()
    for name in _escape_names(target):
        _refused_stream(target, [], _attempts(target, name)[which])
        untouched()
        assert os.listdir(target.root) == []
        assert not (target.base / "escape").exists()
        assert not (target.root.parent.parent / "escape").exists()
        assert (tmp_abs.exists() or tmp_abs.is_symlink()) == existed
    log = target.proc.log_path.read_text()
    assert "refused entry name b'../escape'" in log
    assert "refused entry name b'/tmp/abs'" in log
    _assert_still_serves(target)


def test_rename_and_link_out_of_root_refused(target: Target, untouched: Callable[[], None]) -> None:
    setup = [
        OpFrame(Op.CREATE, (ROOT_INO, 2, REG, 0, 0), (b"f",)),
        OpFrame(Op.WRITE, (2, 0), (b"data",)),
    ]
    for name in _escape_names(target):
        for attack in (
            OpFrame(Op.RENAME, (ROOT_INO, ROOT_INO, 0), (b"f", name)),
            OpFrame(Op.LINK, (2, ROOT_INO), (name,)),
        ):
            if (target.root / "f").exists():
                (target.root / "f").unlink()
            _refused_stream(target, setup, attack)
            untouched()
            assert os.listdir(target.root) == ["f"]
    _assert_still_serves(target)


@pytest.fixture
def planted(target: Target) -> Target:
    """Symlinks inside the root to the outside dir and file, as a local attacker would plant."""
    (target.root / "evil").symlink_to(target.outside)
    (target.root / "sl").symlink_to(target.outside / "secret")
    return target


BIND_EVIL = OpFrame(Op.BIND, (10, ROOT_INO), (b"evil",))
BIND_SL = OpFrame(Op.BIND, (20, ROOT_INO), (b"sl",))
THROUGH_SYMLINK = {
    "CREATE": ([BIND_EVIL], OpFrame(Op.CREATE, (10, 11, REG, 0, 0), (b"pwned",))),
    "MKDIR": ([BIND_EVIL], OpFrame(Op.MKDIR, (10, 11, DIR, 0, 0), (b"pwned",))),
    "SYMLINK": ([BIND_EVIL], OpFrame(Op.SYMLINK, (10, 11, 0, 0), (b"pwned", b"x"))),
    "UNLINK": ([BIND_EVIL], OpFrame(Op.UNLINK, (10,), (b"secret",))),
    "RMDIR": ([BIND_EVIL], OpFrame(Op.RMDIR, (10,), (b"sub",))),
    "RENAME_OUT": ([BIND_EVIL], OpFrame(Op.RENAME, (10, ROOT_INO, 0), (b"secret", b"got"))),
    "BIND_UNDER": ([BIND_EVIL], OpFrame(Op.BIND, (12, 10), (b"secret",))),
    "WRITE": ([BIND_SL], OpFrame(Op.WRITE, (20, 0), (b"PWNED",))),
    "TRUNCATE": ([BIND_SL], OpFrame(Op.TRUNCATE, (20, 0))),
    "CHMOD": ([BIND_SL], OpFrame(Op.CHMOD, (20, 0o777))),
    "SETXATTR": ([BIND_SL], OpFrame(Op.SETXATTR, (20, 0), (b"user.pwned", b"1"))),
    "FSYNC": ([BIND_SL], OpFrame(Op.FSYNC, (20, 0))),
}


@pytest.mark.parametrize("name", list(THROUGH_SYMLINK))
def test_symlink_to_outside_not_followed(
    planted: Target, untouched: Callable[[], None], name: str
) -> None:
    setup, attack = THROUGH_SYMLINK[name]
    _refused_stream(planted, setup, attack)
    untouched()
    assert sorted(os.listdir(planted.root)) == ["evil", "sl"]
    assert (planted.outside / "secret").read_bytes() == b"secret"
    assert stat.S_IMODE((planted.outside / "secret").stat().st_mode) != 0o777
    _assert_still_serves(planted)


def test_fsync_on_planted_fifo_refused_without_hanging(
    target: Target, untouched: Callable[[], None]
) -> None:
    """Opening a FIFO to fsync it would block the stream (and every later one) for good."""
    os.mkfifo(target.root / "fifo")
    bind = OpFrame(Op.BIND, (30, ROOT_INO), (b"fifo",))
    _refused_stream(target, [bind], OpFrame(Op.FSYNC, (30, 0)))
    _assert_still_serves(target)


def test_refusal_marks_replica_not_uptodate(target: Target) -> None:
    assert target.proc.status()["uptodate"] is True
    _refused_stream(target, [], OpFrame(Op.CREATE, (ROOT_INO, 2, REG, 0, 0), (b"../escape",)))
    status = target.proc.status()
    assert status["uptodate"] is False
    assert status["refused"] >= 1
    _assert_still_serves(target)


def test_many_attacks_in_a_row_server_survives(
    planted: Target, untouched: Callable[[], None]
) -> None:
    for i in range(20):
        setup, attack = list(THROUGH_SYMLINK.values())[i % len(THROUGH_SYMLINK)]
        _refused_stream(planted, setup, attack)
    untouched()
    _assert_still_serves(planted)
