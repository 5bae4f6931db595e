"""Heartbeats between the two nodes of a module: authenticated UDP on every heartbeat network.

Each node sends a datagram to its peer on every configured network (a `<lan>` of
cluster.xml) every `pulse` seconds, and at once when the daemon announces a new state. The
peer counts as alive while ANY network carries a valid heartbeat: it is lost when no valid
one arrived on any network for `timeout` seconds. A daemon that shuts down sends a goodbye,
so its peer knows at once that the stop was announced (no failure, no split brain possible).

Wire format, version 1 (all integers big-endian; one datagram is one heartbeat):

    offset  size  field
    0       4     magic    b"HAHB": tells a hafs heartbeat from stray traffic on the port
    4       1     version  1: a node upgraded first rejects what it cannot read, by name
    5       1     flags    bit 0 = goodbye (the sender's daemon is shutting down);
                           other bits must be 0
    6       16    boot     random per sender process: a restarted peer is told from a
                           replay of the previous run's datagrams
    22      8     counter  1, 2, 3 ... per sender process: a replayed datagram of the
                           current run is told from a fresh one
    30      n     body     UTF-8 JSON object:
                             "module"   the module: a beat of another module is rejected
                             "from"     the sender's node name: must be this node's peer
                             "to"       the destination node name: must be this node, so
                                        a node's own beats looped back (or a beat meant
                                        for another cluster's node) are rejected
                             "network"  the network it was sent on: a beat captured on one
                                        network cannot be replayed on another to fake it
                             "payload"  the daemon's announcement (its state ...)
    30+n    16    MAC      keyed BLAKE2b-128 over everything before it (header included,
                           so no field can be changed), keyed with the heartbeat key

The heartbeat key is HMAC-SHA256(cluster key, b"hafs heartbeat v1"): a key of its own, so a
heartbeat MAC can never be confused with a MAC the replication protocol computes.

Replay protection without clocks (a clock step must never cause a false failover): the
receiver accepts a datagram only if (boot, counter) is new. Same boot: the counter must be
greater than the last one accepted on that network (per network, because the two networks
may deliver in a different order). A new boot: accepted (the peer restarted) unless that boot
was seen before in this receiver's lifetime (a replay of an older run); the receiver keeps
the last PAST_BOOTS_KEPT past boots.

What this cannot stop: after THIS node restarts, it has forgotten the peer's past boots, so an
attacker who recorded a whole earlier run of the peer can replay it once (it could make a
dead peer look alive, delaying a failover; it can never cause one).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import secrets
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

log = logging.getLogger(__name__)

MAGIC = b"HAHB"
VERSION = 1
MAC_LEN = 16
MAX_DATAGRAM = 8192  # fits one jumbo frame, and keeps the receiver's buffer bounded
PAST_BOOTS_KEPT = 64
# The daemon is told of rejected datagrams at most once per kind in this many seconds (with
# a count of the others): an unauthenticated sender must not write a module log line each.
REJECT_REPORT_INTERVAL = 10.0
KEY_LABEL = b"hafs heartbeat v1"

_HEADER = struct.Struct(">4sBB16sQ")
_FLAG_GOODBYE = 0x01
_BOOT_LEN = 16
_MAX_COUNTER = 2**64 - 1
# A goodbye is sent while the daemon is shutting down, often from an already cancelled
# scope: it is shielded, but must never hold the shutdown up for long.
_GOODBYE_SEND_TIME = 1.0

UdpSocket = trio.socket.SocketType


class HeartbeatError(Exception):
    """A heartbeat network cannot be used (its local address cannot be bound)."""


class Rejected(Exception):
    """A datagram that is not a valid heartbeat for this node; str() is the reason.

    `kind` names the class of reason with a fixed string, never with anything the sender
    chose: the daemon is told of rejections at most once per kind per interval.
    """

    def __init__(self, reason: str, kind: str = "other") -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass(frozen=True)
class Network:
    """One heartbeat network (a `<lan>` of cluster.xml)."""

    name: str
    local_addr: str  # IP to bind on this node
    peer_addr: str  # the peer's IP on that network


@dataclass(frozen=True)
class PeerBeat:
    """A valid heartbeat, as handed to the daemon."""

    node: str  # sender's node name
    payload: dict[str, Any]  # JSON object the sender announced
    network: str  # the network it came on
    goodbye: bool  # the sender's daemon is shutting down


# ---------------------------------------------------------------- wire format


@dataclass(frozen=True)
class Datagram:
    """One heartbeat as it travels (see the module docstring)."""

    boot: bytes
    counter: int
    goodbye: bool
    module: str
    sender: str
    destination: str
    network: str
    payload: dict[str, Any]


def heartbeat_key(cluster_key: bytes, label: bytes = KEY_LABEL) -> bytes:
    """The key that MACs heartbeats (or, with another label, the witness's datagrams),
    derived from the cluster key."""
    return hmac.new(cluster_key, label, hashlib.sha256).digest()


def _mac(hb_key: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(data, key=hb_key, digest_size=MAC_LEN).digest()


def encode_datagram(hb_key: bytes, d: Datagram) -> bytes:
    flags = _FLAG_GOODBYE if d.goodbye else 0
    header = _HEADER.pack(MAGIC, VERSION, flags, d.boot, d.counter)
    body = {
        "module": d.module,
        "from": d.sender,
        "to": d.destination,
        "network": d.network,
        "payload": d.payload,
    }
    signed = header + json.dumps(body, separators=(",", ":")).encode()
    return signed + _mac(hb_key, signed)


def decode_datagram(hb_key: bytes, data: bytes) -> Datagram:
    """The datagram in `data` if it is whole and authentic; raises Rejected otherwise."""
    if len(data) > MAX_DATAGRAM:
        raise Rejected(f"oversize datagram ({len(data)} bytes)", "oversize")
    if len(data) < _HEADER.size + MAC_LEN:
        raise Rejected(f"truncated datagram ({len(data)} bytes)", "truncated")
    magic, version, flags, boot, counter = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise Rejected("not a hafs heartbeat (bad magic)", "magic")
    if version != VERSION:
        raise Rejected(f"unsupported heartbeat version {version}", "version")
    signed, mac = data[:-MAC_LEN], data[-MAC_LEN:]
    if not hmac.compare_digest(mac, _mac(hb_key, signed)):
        raise Rejected("bad MAC (forged, or another cluster key)", "mac")
    if flags & ~_FLAG_GOODBYE:
        raise Rejected(f"unknown flags {flags:#x}", "flags")
    body = _decode_body(signed[_HEADER.size :])
    return Datagram(
        boot=boot,
        counter=counter,
        goodbye=bool(flags & _FLAG_GOODBYE),
        module=body["module"],
        sender=body["from"],
        destination=body["to"],
        network=body["network"],
        payload=body["payload"],
    )


def _decode_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw.decode())
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise Rejected(f"malformed body: {e}", "body") from None
    if not isinstance(body, dict):
        raise Rejected("malformed body: not a JSON object", "body")
    for name in ("module", "from", "to", "network"):
        if not isinstance(body.get(name), str):
            raise Rejected(f"malformed body: {name!r} missing or not a string", "body")
    if not isinstance(body.get("payload"), dict):
        raise Rejected("malformed body: 'payload' missing or not an object", "body")
    return body


class ReplayGuard:
    """Admits each (boot, counter) at most once; see the module docstring for the rule."""

    def __init__(self, past_boots_kept: int = PAST_BOOTS_KEPT) -> None:
        self._boot: bytes | None = None
        self._last_counter: dict[str, int] = {}  # network -> last counter admitted there
        self._past_boots: collections.deque[bytes] = collections.deque(maxlen=past_boots_kept)

    def admit(self, boot: bytes, network: str, counter: int) -> None:
        """Records the datagram as seen; raises Rejected if it was, or belongs to an old boot."""
        if boot != self._boot:
            if boot in self._past_boots:
                raise Rejected("replay of an earlier run of the peer (old boot id)", "old run")
            self._new_boot(boot)
        last = self._last_counter.get(network, 0)
        if counter <= last:
            raise Rejected(f"replay (counter {counter}, last accepted {last})", "replay")
        self._last_counter[network] = counter

    @property
    def boot(self) -> bytes | None:
        return self._boot

    def _new_boot(self, boot: bytes) -> None:
        if self._boot is not None:
            self._past_boots.append(self._boot)
        self._boot = boot
        self._last_counter.clear()


@dataclass
class _Window:
    """The rejections of one kind since the last one reported."""

    ends: float
    suppressed: int = 0
    last_reason: str = ""


class RejectReports:
    """Passes rejections on at most once per `interval` per kind; no I/O, no clock.

    The first rejection of a kind is reported at once and opens a window of `interval`
    seconds; the ones inside it are counted. flush() at the window's end reports the last of
    them with the count ("... (and 57 more rejected in the last 10 s)") and opens a new window;
    a window that counted none just closes, so the next rejection is reported at once.
    """

    def __init__(self, report: Callable[[str], None], interval: float) -> None:
        self._report = report
        self._interval = interval
        self._windows: dict[str, _Window] = {}

    def reject(self, kind: str, reason: str, now: float) -> None:
        self.flush(now)
        window = self._windows.get(kind)
        if window is None:
            self._windows[kind] = _Window(now + self._interval)
            self._report(reason)
        else:
            window.suppressed += 1
            window.last_reason = reason

    def flush(self, now: float) -> None:
        """Report what the windows ended by `now` counted (math.inf: every window)."""
        for kind, window in list(self._windows.items()):
            if now < window.ends:
                continue
            del self._windows[kind]
            if window.suppressed:
                more = window.suppressed - 1
                suffix = f" (and {more} more rejected in the last {self._interval:g} s)"
                self._report(window.last_reason + (suffix if more else ""))
                if now != math.inf:
                    self._windows[kind] = _Window(now + self._interval)

    def next_flush(self) -> float:
        """When the first open window ends (math.inf: none is open)."""
        return min((w.ends for w in self._windows.values()), default=math.inf)


# ---------------------------------------------------------------- sockets


async def _bound_socket(network: Network, port: int) -> UdpSocket:
    family = trio.socket.AF_INET
    if ipaddress.ip_address(network.local_addr).version == 6:
        family = trio.socket.AF_INET6
    sock = trio.socket.socket(family, trio.socket.SOCK_DGRAM)
    try:
        # No SO_REUSEADDR: UDP has no TIME_WAIT, so a restarted daemon rebinds at once
        # without it, and with it two modules given the same port would both bind while
        # unicast beats reach only one of them. A clash must fail here, by name.
        await sock.bind((network.local_addr, port))
    except OSError as e:
        sock.close()
        raise HeartbeatError(
            f"heartbeat network {network.name}: cannot bind {network.local_addr}:{port}: {e}"
        ) from e
    return sock


# ---------------------------------------------------------------- heartbeats


class Heartbeats:
    """This node's heartbeats with its peer, for one module.

    Nothing is sent before the first announce(), so the peer never sees a beat without the
    daemon's state. goodbye() is final: no beat follows it; a daemon that comes back makes
    a new Heartbeats (a new boot id, which the peer accepts as a restart). on_lost is for a
    peer that was alive: a peer never heard from is not "lost" (the daemon's own start-up
    wait decides about it, with peer_alive). on_reject gets the first rejected datagram of a
    kind, then at most one line per REJECT_REPORT_INTERVAL with the count of the others (each
    one is logged at debug level). Times are trio's clock: call from trio.
    """

    def __init__(
        self,
        *,
        key: bytes,
        module: str,
        node: str,
        peer: str,
        networks: Sequence[Network],
        port: int,
        pulse: float,
        timeout: float,
        on_beat: Callable[[PeerBeat], None],
        on_lost: Callable[[], None],
        on_reject: Callable[[str], None],
    ) -> None:
        _check_settings(node, peer, networks, pulse, timeout)
        self._key = heartbeat_key(key)
        self._module = module
        self._node = node
        self._peer = peer
        self._networks = tuple(networks)
        self._port = port
        self._pulse = pulse
        self._timeout = timeout
        self._on_beat = on_beat
        self._on_lost = on_lost
        self._rejects = RejectReports(on_reject, REJECT_REPORT_INTERVAL)
        self._reject_window_opened = trio.Event()
        # sending
        self._boot = secrets.token_bytes(_BOOT_LEN)
        self._counter = 0
        self._payload: dict[str, Any] | None = None
        self._said_goodbye = False
        self._wake_sender = trio.Event()
        self._sockets: list[tuple[Network, UdpSocket]] = []
        # receiving
        self._guard = ReplayGuard()
        self._last_beat: dict[str, float] = {}  # network -> trio time of its last valid beat
        self._alive = False
        self._departed_boot: bytes | None = None  # the peer boot that said goodbye
        self._peer_back = trio.Event()

    # ------------------------------------------------------------ the daemon's side

    def announce(self, payload: dict[str, Any]) -> None:
        """Sets what the heartbeats carry and sends it at once, then every pulse.

        Raises TypeError/ValueError if the payload is not JSON or does not fit a datagram:
        a daemon bug, better seen here than in the sender task.
        """
        # A JSON round trip copies the payload (the caller may mutate its dict) and gives
        # exactly what the peer will see.
        copy = json.loads(json.dumps(payload))
        self._check_fits(copy)
        self._payload = copy
        self._wake_sender.set()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Binds one socket per network, then sends and receives until cancelled."""
        sockets: list[tuple[Network, UdpSocket]] = []
        try:
            for network in self._networks:
                sockets.append((network, await _bound_socket(network, self._port)))
            self._sockets = sockets
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_pulses)
                for network, sock in sockets:
                    nursery.start_soon(self._receive, network, sock)
                nursery.start_soon(self._watch_for_loss)
                nursery.start_soon(self._flush_rejects)
                task_status.started()
        finally:
            self._rejects.flush(math.inf)  # the counts of the windows still open
            self._sockets = []
            for _, sock in sockets:
                sock.close()

    async def goodbye(self) -> None:
        """Tells the peer this daemon is shutting down: one datagram per network, best effort.

        Works from a cancelled scope (shutdown), with or without run() going.
        """
        self._said_goodbye = True
        with trio.move_on_after(_GOODBYE_SEND_TIME, shield=True):
            if self._sockets:
                for network, sock in list(self._sockets):
                    await self._send(network, sock, goodbye=True)
            else:
                await self._send_goodbye_unbound()

    def alive_networks(self) -> dict[str, float]:
        """Network name -> seconds since its last valid beat (networks that carried one)."""
        now = trio.current_time()
        return {name: now - at for name, at in self._last_beat.items()}

    @property
    def peer_alive(self) -> bool:
        return self._alive and trio.current_time() < self._newest_beat() + self._timeout

    # ------------------------------------------------------------ sending

    async def _send_pulses(self) -> None:
        while not self._said_goodbye:
            # A fresh event before sending: an announce() during the sends wakes us again.
            self._wake_sender = trio.Event()
            for network, sock in self._sockets:
                if self._payload is None or self._said_goodbye:
                    break  # nothing to say yet; or nothing more, ever
                await self._send(network, sock, goodbye=False)
            with trio.move_on_after(self._pulse):
                await self._wake_sender.wait()

    async def _send(self, network: Network, sock: UdpSocket, *, goodbye: bool) -> None:
        self._counter += 1
        payload = self._payload if self._payload is not None else {}
        beat = self._datagram(network, goodbye=goodbye, counter=self._counter, payload=payload)
        data = encode_datagram(self._key, beat)
        try:
            await sock.sendto(data, (network.peer_addr, self._port))
        except (OSError, trio.ClosedResourceError) as e:
            # A link that is down (ENETUNREACH ...) is what the other networks are for.
            log.debug("heartbeat not sent on %s to %s: %s", network.name, network.peer_addr, e)

    async def _send_goodbye_unbound(self) -> None:
        # run() is not going: send from an ephemeral port on the network's own address.
        for network in self._networks:
            try:
                sock = await _bound_socket(network, 0)
            except HeartbeatError as e:
                log.debug("goodbye not sent: %s", e)
                continue
            with sock:
                await self._send(network, sock, goodbye=True)

    def _datagram(
        self, network: Network, *, goodbye: bool, counter: int, payload: dict[str, Any]
    ) -> Datagram:
        return Datagram(
            boot=self._boot,
            counter=counter,
            goodbye=goodbye,
            module=self._module,
            sender=self._node,
            destination=self._peer,
            network=network.name,
            payload=payload,
        )

    def _check_fits(self, payload: dict[str, Any]) -> None:
        longest = max(self._networks, key=lambda n: len(n.name.encode()))
        probe = self._datagram(longest, goodbye=True, counter=_MAX_COUNTER, payload=payload)
        size = len(encode_datagram(self._key, probe))
        if size > MAX_DATAGRAM:
            raise ValueError(f"heartbeat payload too large: {size} > {MAX_DATAGRAM} bytes")

    # ------------------------------------------------------------ receiving

    async def _receive(self, network: Network, sock: UdpSocket) -> None:
        while True:
            try:
                # One byte more than allowed: an oversize datagram shows as such, not cut.
                data, source = await sock.recvfrom(MAX_DATAGRAM + 1)
            except OSError as e:
                log.debug("heartbeat receive error on %s: %s", network.name, e)
                await trio.sleep(self._pulse)  # no busy loop on a persistent error
                continue
            self._on_datagram(network, data, source)

    def _on_datagram(self, network: Network, data: bytes, source: Any) -> None:
        try:
            beat = decode_datagram(self._key, data)
            self._check_addressed_to_us(network, beat)
            self._guard.admit(beat.boot, network.name, beat.counter)
        except Rejected as e:
            reason = f"heartbeat rejected on {network.name} from {_address(source)}: {e}"
            log.debug("%s", reason)
            self._rejects.reject(e.kind, reason, trio.current_time())
            self._reject_window_opened.set()
            return
        self._accept(network, beat)

    async def _flush_rejects(self) -> None:
        while True:
            deadline = self._rejects.next_flush()
            if deadline == math.inf:
                self._reject_window_opened = trio.Event()
                await self._reject_window_opened.wait()
            else:
                await trio.sleep_until(deadline)
                self._rejects.flush(trio.current_time())

    def _check_addressed_to_us(self, network: Network, beat: Datagram) -> None:
        if beat.module != self._module:
            raise Rejected(f"wrong module {beat.module!r} (this is {self._module!r})", "module")
        if beat.sender == self._node:
            raise Rejected(f"sender claims to be this node ({beat.sender!r})", "sender")
        if beat.sender != self._peer:
            raise Rejected(f"unknown sender {beat.sender!r} (the peer is {self._peer!r})", "sender")
        if beat.destination != self._node:
            raise Rejected(f"addressed to {beat.destination!r}, not to this node", "destination")
        if beat.network != network.name:
            raise Rejected(
                f"sent on network {beat.network!r}, arrived on {network.name!r}", "network"
            )

    def _accept(self, network: Network, beat: Datagram) -> None:
        if beat.boot == self._departed_boot and not beat.goodbye:
            # Sent before the goodbye, arrived after it (another network was faster): the
            # peer is gone, this beat must not bring it back for a timeout.
            log.debug("late heartbeat of %s on %s after its goodbye", self._peer, network.name)
            return
        self._last_beat[network.name] = trio.current_time()
        if beat.goodbye:
            self._peer_left(beat.boot)
        elif not self._alive:
            self._peer_came(network)
        self._on_beat(PeerBeat(self._peer, beat.payload, network.name, beat.goodbye))

    def _peer_came(self, network: Network) -> None:
        log.info("peer %s alive (heartbeat on %s)", self._peer, network.name)
        self._alive = True
        self._departed_boot = None
        self._peer_back.set()

    def _peer_left(self, boot: bytes) -> None:
        if self._departed_boot != boot:
            log.info("peer %s said goodbye", self._peer)
        self._alive = False
        self._departed_boot = boot

    # ------------------------------------------------------------ loss

    async def _watch_for_loss(self) -> None:
        while True:
            if not self._alive:
                self._peer_back = trio.Event()
                await self._peer_back.wait()
                continue
            deadline = self._newest_beat() + self._timeout
            if trio.current_time() >= deadline:
                self._peer_lost()
            else:
                await trio.sleep_until(deadline)

    def _peer_lost(self) -> None:
        log.warning(
            "peer %s lost: no heartbeat on any network for %.3g s", self._peer, self._timeout
        )
        self._alive = False
        self._on_lost()

    def _newest_beat(self) -> float:
        return max(self._last_beat.values(), default=-math.inf)


def _check_settings(
    node: str, peer: str, networks: Sequence[Network], pulse: float, timeout: float
) -> None:
    if node == peer:
        raise ValueError(f"node and peer are both {node!r}")
    if not networks:
        raise ValueError("no heartbeat network")
    names = [n.name for n in networks]
    if len(set(names)) != len(names):
        raise ValueError(f"heartbeat network names repeat: {names}")
    for network in networks:
        # Addresses only: a failover must never wait on a name lookup.
        ipaddress.ip_address(network.local_addr)
        ipaddress.ip_address(network.peer_addr)
    if not 0 < pulse < timeout:
        raise ValueError(f"need 0 < pulse < timeout, got pulse={pulse} timeout={timeout}")


def _address(source: Any) -> str:
    if isinstance(source, tuple) and len(source) >= 2:
        return f"{source[0]}:{source[1]}"
    return str(source)
