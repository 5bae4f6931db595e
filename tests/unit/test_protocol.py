"""Unit tests of hafs.protocol (and the handshake in hafs.wire): authentication and frames."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hafs import protocol as p
from hafs import wire

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


# -- handshake ---------------------------------------------------------------------------


def _run_handshake(
    server_key: bytes, client_key: bytes, purpose: p.Purpose = p.Purpose.MIRROR
) -> tuple[Any, Any]:
    """Run both sides over a socketpair; each result is a value or the exception raised."""
    srv, cli = socket.socketpair()
    srv.settimeout(5)
    cli.settimeout(5)
    result: dict[str, Any] = {}

    def server() -> None:
        try:
            result["server"] = wire.server_handshake(srv, server_key)
        except Exception as e:
            result["server"] = e
        finally:
            srv.close()  # what the replica server does after a refusal

    t = threading.Thread(target=server)
    t.start()
    try:
        client: Any = wire.client_handshake(cli, client_key, purpose)
    except Exception as e:
        client = e
    finally:
        cli.close()
        t.join(10)
    assert not t.is_alive()
    return result["server"], client


@pytest.mark.parametrize("purpose", list(p.Purpose))
def test_handshake_same_key_derives_matching_session_keys(purpose: p.Purpose) -> None:
    (server_keys, server_purpose), client_keys = _run_handshake(KEY, KEY, purpose)
    assert server_purpose is purpose
    assert client_keys.send == server_keys.recv
    assert client_keys.recv == server_keys.send
    assert client_keys.send != client_keys.recv  # one key per direction
    assert KEY not in (client_keys.send, client_keys.recv)


def test_handshake_session_keys_differ_between_sessions() -> None:
    (a, _), _ = _run_handshake(KEY, KEY)
    (b, _), _ = _run_handshake(KEY, KEY)
    assert {a.send, a.recv}.isdisjoint({b.send, b.recv})


def test_handshake_wrong_key_fails_on_both_sides() -> None:
    server, client = _run_handshake(KEY, OTHER_KEY)
    assert isinstance(server, p.AuthError)
    # The server closes without proving anything: the client cannot get session keys.
    assert isinstance(client, p.ProtocolError)


def test_protocol_level_auth_wrong_key_both_ways() -> None:
    ns, nc = os.urandom(p.NONCE_LEN), os.urandom(p.NONCE_LEN)
    purpose = p.Purpose.MIRROR
    # Good key: both proofs check out.
    assert p.check_client_auth(KEY, ns, p.client_auth(KEY, ns, nc, purpose)) == (nc, purpose)
    p.check_server_proof(KEY, ns, nc, purpose, p.server_proof(KEY, ns, nc, purpose))
    # A client without the key is refused by the server ...
    with pytest.raises(p.AuthError):
        p.check_client_auth(KEY, ns, p.client_auth(OTHER_KEY, ns, nc, purpose))
    # ... and a server without the key (an impostor) is refused by the client.
    with pytest.raises(p.AuthError):
        p.check_server_proof(KEY, ns, nc, purpose, p.server_proof(OTHER_KEY, ns, nc, purpose))


def test_auth_bound_to_nonces_and_purpose() -> None:
    ns, nc = os.urandom(p.NONCE_LEN), os.urandom(p.NONCE_LEN)
    auth = p.client_auth(KEY, ns, nc, p.Purpose.MIRROR)
    with pytest.raises(p.AuthError):  # replayed into a session with another server nonce
        p.check_client_auth(KEY, os.urandom(p.NONCE_LEN), auth)
    tampered = bytearray(auth)
    tampered[p.NONCE_LEN] = p.Purpose.VERIFY  # purpose byte changed in flight
    with pytest.raises(p.AuthError):
        p.check_client_auth(KEY, ns, bytes(tampered))
    proof = p.server_proof(KEY, ns, nc, p.Purpose.MIRROR)
    with pytest.raises(p.AuthError):
        p.check_server_proof(KEY, ns, nc, p.Purpose.VERIFY, proof)


def test_hello_bad_magic_or_version() -> None:
    ns = os.urandom(p.NONCE_LEN)
    assert p.parse_hello(p.server_hello(ns)) == ns
    with pytest.raises(p.ProtocolError):
        p.parse_hello(p.HELLO.pack(b"HTTP", p.VERSION, ns))
    with pytest.raises(p.ProtocolError):
        p.parse_hello(p.HELLO.pack(p.MAGIC, p.VERSION + 1, ns))


def test_read_key(tmp_path: Any) -> None:
    good = tmp_path / "k"
    good.write_text(KEY.hex() + "\n")
    assert p.read_key(str(good)) == KEY
    for bad in ("not hex\n", "abcd\n"):  # garbage, too short
        path = tmp_path / "bad"
        path.write_text(bad)
        with pytest.raises(p.AuthError):
            p.read_key(str(path))


# -- frames ------------------------------------------------------------------------------


def _frame(writer: p.FrameWriter, ftype: p.FrameType, *parts: bytes) -> bytes:
    return b"".join(writer.seal(ftype, *parts))


def _sealed(key: bytes, version: int, ftype: int, payload: bytes, seq: int) -> bytes:
    """A frame with a valid MAC but arbitrary header fields."""
    header = p.HEADER.pack(version, ftype, len(payload), seq)
    mac = p._keyed_mac(key)
    mac.update(header + payload)
    return header + payload + mac.digest()


PAYLOADS = [b"", b"x", b"hello world", os.urandom(5000), bytes(70000)]


def test_frames_round_trip() -> None:
    w, r = p.FrameWriter(KEY), p.FrameReader(KEY)
    data = b"".join(_frame(w, p.FrameType.OP, pl) for pl in PAYLOADS)
    data += _frame(w, p.FrameType.OP, b"two ", b"parts")
    data += _frame(w, p.FrameType.BYE)
    r.feed(data)
    frames = r.frames()
    assert [bytes(f.payload) for f in frames] == [*PAYLOADS, b"two parts", b""]
    assert [f.seq for f in frames] == list(range(1, len(PAYLOADS) + 3))
    assert [f.ftype for f in frames] == [p.FrameType.OP] * (len(PAYLOADS) + 1) + [p.FrameType.BYE]
    assert r.frames() == []


def test_frames_split_delivery_byte_by_byte() -> None:
    w, r = p.FrameWriter(KEY), p.FrameReader(KEY)
    payloads = [b"", b"abc", os.urandom(300), b"z" * 17]
    data = b"".join(_frame(w, p.FrameType.OP, pl) for pl in payloads)
    got: list[p.Frame] = []
    for i in range(len(data)):
        r.feed(data[i : i + 1])
        got += r.frames()
    assert [bytes(f.payload) for f in got] == payloads
    assert [f.seq for f in got] == [1, 2, 3, 4]


@given(st.lists(st.binary(max_size=300), max_size=6), st.data())
def test_frames_any_split(payloads: list[bytes], data: st.DataObject) -> None:
    w, r = p.FrameWriter(KEY), p.FrameReader(KEY)
    stream = b"".join(_frame(w, p.FrameType.ACK, pl) for pl in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    got: list[p.Frame] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        r.feed(stream[prev:cut])
        got += r.frames()
        prev = cut
    assert [bytes(f.payload) for f in got] == payloads


def test_payload_survives_later_feeds() -> None:
    """A frame's payload must not change when the reader's buffer is reused."""
    w, r = p.FrameWriter(KEY), p.FrameReader(KEY)
    r.feed(_frame(w, p.FrameType.OP, b"first"))
    (first,) = r.frames()
    r.feed(_frame(w, p.FrameType.OP, b"SECOND"))
    r.frames()
    assert bytes(first.payload) == b"first"


def _expect_rejected(reader: p.FrameReader, data: bytes) -> None:
    with pytest.raises(p.ProtocolError):
        reader.feed(data)
        reader.frames()


def _flipped(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


GOOD_PAYLOAD = b"payload bytes"
GOOD = _frame(p.FrameWriter(KEY), p.FrameType.OP, GOOD_PAYLOAD)


@pytest.mark.parametrize("bit", range(p.HEADER.size * 8))
def test_flipped_header_bit_rejected(bit: int) -> None:
    bad = _flipped(GOOD, bit)
    _, _, new_len, _ = p.HEADER.unpack_from(bad)
    r = p.FrameReader(KEY)
    # A larger length makes the reader wait for the rest; give it the bytes it waits for
    # (unless the length is oversize, which must be refused at once).
    pad = b"\0" * max(0, new_len - len(GOOD_PAYLOAD)) if new_len <= p.MAX_PAYLOAD else b""
    with pytest.raises(p.ProtocolError):
        r.feed(bad)
        assert r.frames() == []
        r.feed(pad)
        r.frames()


@pytest.mark.parametrize("where", ["payload", "mac"])
def test_flipped_payload_or_mac_bit_rejected(where: str) -> None:
    start = p.HEADER.size if where == "payload" else len(GOOD) - p.MAC_LEN
    end = len(GOOD) - p.MAC_LEN if where == "payload" else len(GOOD)
    for bit in range(start * 8, end * 8):
        _expect_rejected(p.FrameReader(KEY), _flipped(GOOD, bit))


def test_frame_from_another_key_rejected() -> None:
    _expect_rejected(p.FrameReader(KEY), _frame(p.FrameWriter(OTHER_KEY), p.FrameType.OP, b"x"))


def test_replayed_frame_rejected() -> None:
    w, r = p.FrameWriter(KEY), p.FrameReader(KEY)
    frame = _frame(w, p.FrameType.OP, b"once")
    r.feed(frame)
    assert len(r.frames()) == 1
    _expect_rejected(r, frame)


def test_replay_after_later_frame_rejected() -> None:
    w, r = p.FrameWriter(KEY), p.FrameReader(KEY)
    first = _frame(w, p.FrameType.OP, b"1")
    r.feed(first + _frame(w, p.FrameType.OP, b"2"))
    assert len(r.frames()) == 2
    _expect_rejected(r, first)


def test_skipped_seq_rejected() -> None:
    w, r = p.FrameWriter(KEY), p.FrameReader(KEY)
    _frame(w, p.FrameType.OP, b"dropped in transit")
    _expect_rejected(r, _frame(w, p.FrameType.OP, b"second"))


def test_reordered_frames_rejected() -> None:
    w, r = p.FrameWriter(KEY), p.FrameReader(KEY)
    one, two = _frame(w, p.FrameType.OP, b"1"), _frame(w, p.FrameType.OP, b"2")
    _expect_rejected(r, two + one)


def test_skipped_seq_with_valid_mac_rejected() -> None:
    r = p.FrameReader(KEY)
    r.feed(_sealed(KEY, p.VERSION, p.FrameType.OP, b"a", 1))
    assert len(r.frames()) == 1
    _expect_rejected(r, _sealed(KEY, p.VERSION, p.FrameType.OP, b"c", 3))


def test_oversize_length_rejected_without_waiting_for_the_body() -> None:
    header = p.HEADER.pack(p.VERSION, p.FrameType.OP, p.MAX_PAYLOAD + 1, 1)
    _expect_rejected(p.FrameReader(KEY), header)
    header = p.HEADER.pack(p.VERSION, p.FrameType.OP, 0xFFFFFFFF, 1)
    _expect_rejected(p.FrameReader(KEY), header)


def test_max_payload_accepted() -> None:
    w, r = p.FrameWriter(KEY), p.FrameReader(KEY)
    r.feed(_frame(w, p.FrameType.OP, bytes(p.MAX_PAYLOAD)))
    (f,) = r.frames()
    assert len(f.payload) == p.MAX_PAYLOAD


@pytest.mark.parametrize("version", [0, p.VERSION + 1, 255])
def test_wrong_version_rejected(version: int) -> None:
    # Valid MAC, so only the version check can refuse it.
    _expect_rejected(p.FrameReader(KEY), _sealed(KEY, version, p.FrameType.OP, b"x", 1))


def test_wrong_version_rejected_from_header_alone() -> None:
    header = p.HEADER.pack(p.VERSION + 1, p.FrameType.OP, 100, 1)
    _expect_rejected(p.FrameReader(KEY), header)


@pytest.mark.parametrize("ftype", [0, 9, 200])
def test_unknown_frame_type_rejected(ftype: int) -> None:
    _expect_rejected(p.FrameReader(KEY), _sealed(KEY, p.VERSION, ftype, b"", 1))


def test_good_frames_before_a_bad_one_are_not_returned_as_valid_stream() -> None:
    """A bad frame in a batch raises; the caller drops the whole connection."""
    w, r = p.FrameWriter(KEY), p.FrameReader(KEY)
    good = _frame(w, p.FrameType.OP, b"ok")
    bad = _flipped(_frame(w, p.FrameType.OP, b"bad"), (p.HEADER.size + 1) * 8)
    _expect_rejected(r, good + bad)


@given(st.binary(max_size=200))
def test_random_bytes_never_yield_a_frame(data: bytes) -> None:
    r = p.FrameReader(KEY)
    r.feed(data)
    with contextlib.suppress(p.ProtocolError):
        assert r.frames() == []


def _frame_fields(frame: p.Frame) -> tuple[Any, ...]:
    return (frame.ftype, frame.seq, bytes(frame.payload))


def test_session_directions_do_not_cross() -> None:
    """A frame reflected back at its sender (send key != recv key) is refused."""
    ns, nc = os.urandom(p.NONCE_LEN), os.urandom(p.NONCE_LEN)
    client = p.derive_keys(KEY, ns, nc, is_client=True)
    server = p.derive_keys(KEY, ns, nc, is_client=False)
    frame = _frame(p.FrameWriter(client.send), p.FrameType.OP, b"x")
    r = p.FrameReader(server.recv)
    r.feed(frame)
    assert [_frame_fields(f) for f in r.frames()] == [(p.FrameType.OP, 1, b"x")]
    _expect_rejected(p.FrameReader(client.recv), frame)
