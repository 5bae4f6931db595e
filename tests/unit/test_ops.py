"""Unit tests of hafs.ops: the encoding of operations inside OP frames, and entry names."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hafs.ops import FileTimes, Op, OpFrame, check_name, decode, encode
from hafs.protocol import ProtocolError

# (ints, blobs) of each op, written out from the documented shapes in hafs/ops.py rather
# than read from its table, so a change to either side shows up here.
SHAPES: dict[Op, tuple[int, int]] = {
    Op.BIND: (2, 1),
    Op.FORGET: (1, 0),
    Op.CREATE: (5, 1),
    Op.MKDIR: (5, 1),
    Op.MKNOD: (6, 1),
    Op.SYMLINK: (4, 2),
    Op.LINK: (2, 1),
    Op.UNLINK: (1, 1),
    Op.RMDIR: (1, 1),
    Op.RENAME: (3, 2),
    Op.WRITE: (2, 1),
    Op.TRUNCATE: (2, 0),
    Op.CHMOD: (2, 0),
    Op.CHOWN: (3, 0),
    Op.SETXATTR: (2, 2),
    Op.REMOVEXATTR: (1, 1),
    Op.FSYNC: (2, 0),
    Op.TIMES: (0, 0),
}

I64 = st.integers(-(2**63), 2**63 - 1)
times_st = st.builds(FileTimes, st.integers(0, 2**64 - 1), I64, I64)


def _payload(frame: OpFrame) -> memoryview:
    return memoryview(b"".join(encode(frame)))


@st.composite
def op_frames(draw: st.DrawFn, op: Op | None = None) -> OpFrame:
    op = draw(st.sampled_from(list(Op))) if op is None else op
    n_ints, n_blobs = SHAPES[op]
    ints = tuple(draw(st.lists(I64, min_size=n_ints, max_size=n_ints)))
    blobs = tuple(draw(st.lists(st.binary(max_size=600), min_size=n_blobs, max_size=n_blobs)))
    times = tuple(draw(st.lists(times_st, max_size=4)))
    return OpFrame(op, ints, blobs, times)


def test_every_op_has_a_shape() -> None:
    assert set(SHAPES) == set(Op)


@pytest.mark.parametrize("op", list(Op), ids=lambda op: op.name)
@settings(max_examples=40)
@given(data=st.data())
def test_round_trip_each_op(op: Op, data: st.DataObject) -> None:
    frame = data.draw(op_frames(op))
    decoded = decode(_payload(frame))
    assert decoded == frame
    assert all(type(b) is bytes for b in decoded.blobs)


def test_round_trip_examples() -> None:
    big = bytes(range(256)) * 4096  # a 1 MiB write
    frames = [
        OpFrame(Op.WRITE, (7, 2**40), (big,), (FileTimes(7, 1, 2),)),
        OpFrame(Op.TIMES, (), (), (FileTimes(1, -(2**63), 2**63 - 1),)),
        OpFrame(Op.RENAME, (1, 2, 3), (b"a", b"b")),
        OpFrame(Op.SYMLINK, (1, 5, 0, 0), (b"link", b"")),
    ]
    for frame in frames:
        assert decode(_payload(frame)) == frame


def test_encode_passes_write_data_through_without_copy() -> None:
    data = b"x" * 100000
    parts = encode(OpFrame(Op.WRITE, (3, 0), (data,)))
    assert any(part is data for part in parts)


@given(op_frames())
def test_every_truncation_refused(frame: OpFrame) -> None:
    payload = bytes(_payload(frame))
    # Every strict prefix is malformed (the last field is a count or sized data).
    for cut in {0, 1, 2, len(payload) // 2, len(payload) - 1}:
        if 0 <= cut < len(payload):
            with pytest.raises(ProtocolError):
                decode(memoryview(payload[:cut]))


def test_every_truncation_of_one_frame_refused() -> None:
    frame = OpFrame(Op.SETXATTR, (4, 0), (b"user.k", b"value"), (FileTimes(4, 5, 6),))
    payload = bytes(_payload(frame))
    for cut in range(len(payload)):
        with pytest.raises(ProtocolError):
            decode(memoryview(payload[:cut]))


@given(op_frames(), st.binary(min_size=1, max_size=20))
def test_trailing_bytes_refused(frame: OpFrame, extra: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(memoryview(bytes(_payload(frame)) + extra))


@given(st.binary(max_size=300))
def test_random_bytes_decode_or_protocol_error(data: bytes) -> None:
    """Garbage must never raise anything but ProtocolError (the server catches only that)."""
    try:
        frame = decode(memoryview(data))
    except ProtocolError:
        return
    assert SHAPES[frame.op] == (len(frame.ints), len(frame.blobs))


@given(op_frames(), st.data())
def test_mutated_payload_decode_or_protocol_error(frame: OpFrame, data: st.DataObject) -> None:
    payload = bytearray(_payload(frame))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] = data.draw(st.integers(0, 255))
    try:
        decoded = decode(memoryview(bytes(payload)))
    except ProtocolError:
        return
    assert SHAPES[decoded.op] == (len(decoded.ints), len(decoded.blobs))


@pytest.mark.parametrize("op", list(Op), ids=lambda op: op.name)
def test_wrong_arity_refused(op: Op) -> None:
    n_ints, n_blobs = SHAPES[op]
    wrong = [(n_ints + 1, n_blobs), (n_ints, n_blobs + 1)]
    if n_ints:
        wrong.append((n_ints - 1, n_blobs))
    if n_blobs:
        wrong.append((n_ints, n_blobs - 1))
    for ni, nb in wrong:
        frame = OpFrame(op, tuple(range(ni)), tuple(b"n" for _ in range(nb)))
        with pytest.raises(ProtocolError, match="wrong shape"):
            decode(_payload(frame))


def test_unknown_opcode_refused() -> None:
    for code in (0, max(Op) + 1, 255):
        payload = struct.pack("!BBBH", code, 0, 0, 0)
        with pytest.raises(ProtocolError):
            decode(memoryview(payload))


def test_too_many_ints_refused() -> None:
    payload = struct.pack("!BB", Op.TIMES, 200) + bytes(200 * 8) + struct.pack("!BH", 0, 0)
    with pytest.raises(ProtocolError):
        decode(memoryview(payload))


def test_blob_length_past_the_frame_refused() -> None:
    payload = struct.pack("!BBqBI", Op.FORGET, 1, 5, 1, 0xFFFFFFFF) + b"abc"
    with pytest.raises(ProtocolError):
        decode(memoryview(payload))


def test_times_count_past_the_frame_refused() -> None:
    payload = struct.pack("!BBqBH", Op.FORGET, 1, 5, 0, 1000) + bytes(24)
    with pytest.raises(ProtocolError):
        decode(memoryview(payload))


@pytest.mark.parametrize(
    "name",
    [b"", b".", b"..", b"/", b"a/b", b"/etc", b"../x", b"x/", b"a\0b", b"\0", b"x" * 256],
)
def test_check_name_refuses(name: bytes) -> None:
    with pytest.raises(ProtocolError):
        check_name(name)


@pytest.mark.parametrize(
    "name", [b"a", b"...", b".hidden", b"..x", b"caf\xe9", b"x" * 255, b" ", b"a\\b"]
)
def test_check_name_accepts_single_components(name: bytes) -> None:
    assert check_name(name) == name


@given(st.binary(max_size=300))
def test_check_name_property(name: bytes) -> None:
    ok = name not in (b"", b".", b"..") and b"/" not in name and b"\0" not in name
    ok = ok and len(name) <= 255
    if ok:
        assert check_name(name) == name
    else:
        with pytest.raises(ProtocolError):
            check_name(name)
