"""The arbitrating witness: a lease on each module's primary role that one node at a time
holds (`<splitbrain exec="arbitrate" arg="ADDR">`, `hafs witness serve` on a third host).

A ping witness only says that the network works; when just the link between the nodes
fails, both reach it and both go ALONE (split brain). The arbiter answers the question a
ping cannot: "may I be primary?". It grants a lease of `lease` seconds to the node that
claims it when nobody else holds an unexpired one; the holder renews it while it serves.
- A SECOND whose heartbeats time out claims; it is refused while the PRIM still renews
  (only the link between them failed: it waits), granted once the lease has run out (the
  PRIM is dead or cut off from the witness too: it takes over).
- A node serving ALONE that cannot renew stops acknowledging changes before its lease can
  have run out on the witness (it renews from the time it sent the claim, which is before
  the witness granted it), then steps down: a second primary can only be granted after.
- The witness writes each module's holder (not each renewal) to its state file before it
  answers; a restarted witness counts every holder's lease as renewed when it starts.

Wire format: the heartbeat datagram of controller/heartbeat.py (magic, version, boot,
counter, JSON body, BLAKE2b MAC), keyed with HMAC-SHA256(cluster key, "hafs witness v1"),
sent from a node to the witness's `network` "witness" and `to` "witness". Claim payload:
{"nonce": hex, "lease": seconds, "release": bool}; answer payload: {"nonce": the claim's,
"granted": bool, "holder": node name or "", "lease": seconds granted}. The witness admits
each (boot, counter) of a node once (heartbeat.ReplayGuard); a node takes only the answer
that echoes its fresh nonce, so neither side can be fooled by a replay.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import secrets
from dataclasses import dataclass
from pathlib import Path

import trio

from controller.heartbeat import (
    MAX_DATAGRAM,
    Datagram,
    Rejected,
    RejectReports,
    ReplayGuard,
    decode_datagram,
    encode_datagram,
    heartbeat_key,
)
from hafs.state import write_json_durably

log = logging.getLogger(__name__)

WITNESS_PORT = 4950
KEY_LABEL = b"hafs witness v1"
WITNESS = "witness"  # the witness's name in datagrams, and their network name
MAX_LEASE = 30.0  # the longest lease granted
MIN_LEASE = 0.5
REJECT_REPORT_INTERVAL = 10.0


def witness_key(cluster_key: bytes) -> bytes:
    return heartbeat_key(cluster_key, KEY_LABEL)


class _Sealer:
    """Numbers and authenticates one process's datagrams (its boot id, its counter)."""

    def __init__(self, cluster_key: bytes) -> None:
        self.key = witness_key(cluster_key)
        self._boot = secrets.token_bytes(16)
        self._counter = 0

    def seal(self, module: str, sender: str, destination: str, payload: dict[str, object]) -> bytes:
        self._counter += 1
        d = Datagram(self._boot, self._counter, False, module, sender, destination, WITNESS,
                     payload)  # fmt: skip
        return encode_datagram(self.key, d)


# ---------------------------------------------------------------- the witness's rule


@dataclass
class Lease:
    holder: str
    length: float
    expires: float


@dataclass(frozen=True)
class Answer:
    granted: bool
    holder: str  # who holds the lease now ("" if nobody)
    lease: float  # seconds granted (0 when refused)
    sent: float = 0.0  # when the claim left the node (trio clock): the lease runs from here


Holders = dict[str, tuple[str, float]]  # module -> (holder, lease length): what is saved


class Arbiter:
    """Who may be primary, per module. Pure: the clock is passed in.

    `restored`: the holders a previous run saved; their leases count as renewed `now`.
    """

    def __init__(self, now: float, restored: Holders | None = None) -> None:
        self.leases = {
            module: Lease(holder, length, now + length)
            for module, (holder, length) in (restored or {}).items()
        }

    def claim(self, module: str, node: str, lease: float, now: float) -> Answer:
        lease = min(max(lease, MIN_LEASE), MAX_LEASE)
        current = self.leases.get(module)
        if current is not None and current.holder != node and now < current.expires:
            return Answer(False, current.holder, 0.0)
        self.leases[module] = Lease(node, lease, now + lease)
        return Answer(True, node, lease)

    def holders(self) -> Holders:
        return {module: (lease.holder, lease.length) for module, lease in self.leases.items()}

    def release(self, module: str, node: str) -> Answer:
        """The holder left the primary role: the peer need not wait for the lease to end."""
        current = self.leases.get(module)
        if current is not None and current.holder == node:
            del self.leases[module]
        holder = self.leases[module].holder if module in self.leases else ""
        return Answer(False, holder, 0.0)


# ---------------------------------------------------------------- the witness server


class WitnessServer:
    """`hafs witness serve`: answers claims on one UDP socket; the holders are saved in
    `state_file` before an answer that changed them leaves."""

    def __init__(self, cluster_key: bytes, state_file: Path, now: float) -> None:
        self._sealer = _Sealer(cluster_key)
        self._state_file = state_file
        self._saved = _load_holders(state_file)
        self._arbiter = Arbiter(now, self._saved)
        self._guards: dict[tuple[str, str], ReplayGuard] = {}
        self._rejects = RejectReports(log.warning, REJECT_REPORT_INTERVAL)
        self.port = 0  # bound to, once serving

    async def serve(
        self, listen: tuple[str, int], task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        family = trio.socket.AF_INET6 if ":" in listen[0] else trio.socket.AF_INET
        with trio.socket.socket(family, trio.socket.SOCK_DGRAM) as sock:
            await sock.bind(listen)
            self.port = sock.getsockname()[1]
            log.info("witness listening on %s:%s", *sock.getsockname()[:2])
            task_status.started()
            while True:
                try:
                    data, source = await sock.recvfrom(MAX_DATAGRAM + 1)
                except OSError as e:  # ICMP errors surface here on UDP: not fatal
                    log.debug("witness: receive error: %s", e)
                    continue
                reply = self.answer(data, source, trio.current_time())
                if reply is not None:
                    try:
                        await sock.sendto(reply, source)
                    except OSError as e:  # a network flap: the node claims again
                        log.warning("witness: answer to %s not sent: %s", source, e)

    def answer(self, data: bytes, source: object, now: float) -> bytes | None:
        """The reply to one datagram, or None (rejected, and logged)."""
        try:
            claim = decode_datagram(self._sealer.key, data)
            nonce, lease, release = _claim_fields(claim)
            guard = self._guards.setdefault((claim.module, claim.sender), ReplayGuard())
            guard.admit(claim.boot, WITNESS, claim.counter)
        except Rejected as e:
            self._rejects.reject(e.kind, f"witness: claim from {source} rejected: {e}", now)
            return None
        if release:
            answer = self._arbiter.release(claim.module, claim.sender)
            log.info("%s: %s released its lease", claim.module, claim.sender)
        else:
            answer = self._arbiter.claim(claim.module, claim.sender, lease, now)
        if not answer.granted and not release:
            log.info("%s: %s refused, %s holds the lease", claim.module, claim.sender,
                     answer.holder)  # fmt: skip
        try:
            self._save()
        except OSError as e:  # no answer: a grant the witness might forget is no grant
            log.error("witness: %s not saved (%s): claim of %s unanswered",
                      self._state_file, e, claim.sender)  # fmt: skip
            return None
        payload = {"nonce": nonce, **_answer_payload(answer)}
        return self._sealer.seal(claim.module, WITNESS, claim.sender, payload)

    def _save(self) -> None:
        holders = self._arbiter.holders()
        if holders != self._saved:
            write_json_durably(self._state_file, holders)
            self._saved = holders


def _load_holders(path: Path) -> Holders:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable witness state ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a witness state (a JSON object)")
    return {str(m): (str(h), float(length)) for m, (h, length) in data.items()}


def _claim_fields(claim: Datagram) -> tuple[str, float, bool]:
    if claim.destination != WITNESS or claim.network != WITNESS:
        raise Rejected("not addressed to the witness", "address")
    p = claim.payload
    nonce, lease, release = p.get("nonce"), p.get("lease"), p.get("release", False)
    if not isinstance(nonce, str) or not isinstance(release, bool):
        raise Rejected("malformed claim: nonce or release", "body")
    if not isinstance(lease, int | float) or isinstance(lease, bool) or not math.isfinite(lease):
        raise Rejected("malformed claim: lease", "body")
    return nonce, float(lease), release


def _answer_payload(a: Answer) -> dict[str, object]:
    return {"granted": a.granted, "holder": a.holder, "lease": a.lease}


# ---------------------------------------------------------------- a node's side


class WitnessClient:
    """A node's claims to the arbitrating witness of one module."""

    def __init__(self, addr: tuple[str, int], cluster_key: bytes, module: str, node: str) -> None:
        self.addr = addr
        self.module = module
        self.node = node
        self._sealer = _Sealer(cluster_key)

    async def claim(
        self, lease: float, timeout: float = 1.0, release: bool = False
    ) -> Answer | None:
        """One claim (or release); the witness's answer, or None if none came in time."""
        nonce = secrets.token_hex(8)
        payload = {"nonce": nonce, "lease": lease, "release": release}
        request = self._sealer.seal(self.module, self.node, WITNESS, payload)
        sent = trio.current_time()
        family = trio.socket.AF_INET6 if ":" in self.addr[0] else trio.socket.AF_INET
        with trio.socket.socket(family, trio.socket.SOCK_DGRAM) as sock:
            with trio.move_on_after(timeout):
                try:
                    await sock.connect(self.addr)
                    await sock.send(request)
                    while True:
                        answer = self._answer(await sock.recv(MAX_DATAGRAM + 1), nonce)
                        if answer is not None:
                            return dataclasses.replace(answer, sent=sent)
                except OSError as e:  # unreachable network, refused port: no answer
                    log.debug("witness %s:%s: %s", *self.addr, e)
        return None

    def _answer(self, data: bytes, nonce: str) -> Answer | None:
        try:
            reply = decode_datagram(self._sealer.key, data)
        except Rejected as e:
            log.warning("witness answer rejected: %s", e)
            return None
        p = reply.payload
        if reply.sender != WITNESS or reply.destination != self.node or p.get("nonce") != nonce:
            return None  # a late answer to an earlier claim, or not for us
        granted, holder, lease = p.get("granted"), p.get("holder"), p.get("lease")
        if not isinstance(granted, bool) or not isinstance(holder, str):
            log.warning("witness answer malformed: %s", p)
            return None
        return Answer(granted, holder, float(lease) if isinstance(lease, int | float) else 0.0)

    async def claim_until(self, lease: float, deadline: float, retry: float = 0.5) -> Answer | None:
        """Claim again every `retry` seconds until granted or `deadline` (trio clock): the
        last answer (None if the witness never answered)."""
        last: Answer | None = None
        while True:
            answer = await self.claim(lease, timeout=min(1.0, retry * 2))
            last = answer or last
            if (answer is not None and answer.granted) or trio.current_time() >= deadline:
                return last
            await trio.sleep(retry)
