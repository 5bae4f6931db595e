"""The arbitrating witness (controller/arbiter.py): one lease holder per module, its state
kept across restarts, and only authentic, fresh claims answered; plus a node's client
against a real server on loopback UDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from controller.arbiter import (
    MAX_LEASE,
    Answer,
    Arbiter,
    WitnessClient,
    WitnessServer,
    witness_key,
)
from controller.heartbeat import Datagram, decode_datagram, encode_datagram

KEY = b"k" * 32
SOURCE = ("10.0.0.1", 40000)


def test_one_holder_at_a_time_until_its_lease_runs_out() -> None:
    a = Arbiter(now=0.0)
    assert a.claim("db", "node1", 3.0, now=1.0) == Answer(True, "node1", 3.0)
    assert a.claim("db", "node2", 3.0, now=2.0) == Answer(False, "node1", 0.0)
    assert a.claim("db", "node1", 3.0, now=3.5).granted, "the holder renews"
    assert not a.claim("db", "node2", 3.0, now=6.4).granted, "renewed at 3.5: until 6.5"
    assert a.claim("db", "node2", 3.0, now=6.6) == Answer(True, "node2", 3.0)
    assert a.claim("web", "node1", 3.0, now=6.6).granted, "each module has its own lease"


def test_release_lets_the_peer_claim_at_once_and_leases_are_bounded() -> None:
    a = Arbiter(now=0.0)
    a.claim("db", "node1", 3.0, now=0.0)
    assert a.release("db", "node2") == Answer(False, "node1", 0.0), "only the holder releases"
    assert a.release("db", "node1") == Answer(False, "", 0.0)
    assert a.claim("db", "node2", 1e9, now=0.1).lease == MAX_LEASE


def test_restored_holders_count_as_renewed_when_the_witness_starts() -> None:
    a = Arbiter(now=100.0, restored={"db": ("node1", 3.0)})
    assert a.claim("db", "node2", 3.0, now=102.9) == Answer(False, "node1", 0.0)
    assert a.claim("db", "node2", 3.0, now=103.1).granted
    assert a.holders() == {"db": ("node2", 3.0)}


def claim(
    node: str, counter: int, key: bytes = KEY, boot: bytes = b"b" * 16, **payload: object
) -> bytes:
    body = {"nonce": f"n{counter}", "lease": 3.0, "release": False, **payload}
    d = Datagram(boot, counter, False, "db", node, "witness", "witness", body)
    return encode_datagram(witness_key(key), d)


def answer_of(reply: bytes | None) -> dict[str, object]:
    assert reply is not None
    return decode_datagram(witness_key(KEY), reply).payload


def test_server_answers_authentic_claims_and_saves_holders_before_answering(
    tmp_path: Path,
) -> None:
    state = tmp_path / "witness.json"
    server = WitnessServer(KEY, state, now=0.0)
    reply = answer_of(server.answer(claim("node1", 1), SOURCE, now=1.0))
    assert reply == {"nonce": "n1", "granted": True, "holder": "node1", "lease": 3.0}
    assert json.loads(state.read_text()) == {"db": ["node1", 3.0]}
    refused = answer_of(server.answer(claim("node2", 1), SOURCE, now=2.0))
    assert (refused["granted"], refused["holder"]) == (False, "node1")

    restarted = WitnessServer(KEY, state, now=50.0)  # node1's lease counts from 50 again
    again = answer_of(restarted.answer(claim("node2", 2), SOURCE, now=52.0))
    assert (again["granted"], again["holder"]) == (False, "node1")


@pytest.mark.parametrize(
    "datagram, why",
    [
        (claim("node1", 1, key=b"x" * 32), "another cluster key"),
        (claim("node1", 1)[:-1] + b"\0", "a changed MAC"),
        (claim("node1", 1, lease="long"), "a lease that is not a number"),
        (claim("node1", 1, nonce=7), "a nonce that is not a string"),
        (b"\0" * 20, "garbage"),
    ],
)
def test_server_rejects_and_logs_what_is_not_an_authentic_claim(
    tmp_path: Path, datagram: bytes, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = WitnessServer(KEY, tmp_path / "w.json", now=0.0)
    assert server.answer(datagram, SOURCE, now=1.0) is None, why
    assert "rejected" in caplog.text, why
    assert not (tmp_path / "w.json").exists(), f"{why} changed the holders"


def test_server_rejects_a_replayed_claim(tmp_path: Path) -> None:
    server = WitnessServer(KEY, tmp_path / "w.json", now=0.0)
    first = claim("node1", 5)
    assert server.answer(first, SOURCE, now=1.0) is not None
    assert server.answer(first, SOURCE, now=2.0) is None


def test_an_unreadable_state_file_is_an_error_that_names_it(tmp_path: Path) -> None:
    state = tmp_path / "witness.json"
    state.write_text("{broken")
    with pytest.raises(ValueError, match="witness.json"):
        WitnessServer(KEY, state, now=0.0)


def test_client_and_server_over_loopback_udp(tmp_path: Path) -> None:
    async def main() -> None:
        server = WitnessServer(KEY, tmp_path / "w.json", now=trio.current_time())
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, ("127.0.0.1", 0))
            port = server.port
            node1 = WitnessClient(("127.0.0.1", port), KEY, "db", "node1")
            node2 = WitnessClient(("127.0.0.1", port), KEY, "db", "node2")
            granted = await node1.claim(0.6)
            assert granted is not None and granted.granted
            assert granted.sent <= trio.current_time()
            refused = await node2.claim(0.6)
            assert refused is not None and (refused.granted, refused.holder) == (False, "node1")
            # node1 stops renewing: node2, claiming again, gets it once the lease ran out.
            late = await node2.claim_until(0.6, deadline=trio.current_time() + 3.0, retry=0.1)
            assert late is not None and late.granted
            forged = WitnessClient(("127.0.0.1", port), b"x" * 32, "db", "node1")
            assert await forged.claim(0.6, timeout=0.3) is None
            nursery.cancel_scope.cancel()
        nobody = WitnessClient(("127.0.0.1", port), KEY, "db", "node1")
        assert await nobody.claim(0.6, timeout=0.3) is None, "no witness: no answer"

    trio.run(main)


def test_a_grant_that_cannot_be_saved_is_not_answered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    server = WitnessServer(KEY, state_dir / "witness.json", now=0.0)
    state_dir.rmdir()
    state_dir.write_text("")  # the disk goes wrong: writes below it fail
    assert server.answer(claim("node1", 1), SOURCE, now=1.0) is None
    assert "not saved" in caplog.text
