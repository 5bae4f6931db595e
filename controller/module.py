"""One module running on this node: the thin shell around the pure state machine.

Events (operator commands, heartbeats, script results, checker failures, the data path's
reports) go through one queue; `statemachine.step` decides; this shell executes the actions
in order and announces the new state in its heartbeats. Long activities (scripts, the
witness question, waiting for a resync) run as tasks of the module's nursery and report back
as events, so the queue never waits on them (style.md: decisions out of effect code).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import trio

from controller import statemachine as sm
from controller.arbiter import WitnessClient
from controller.checkers import Checker, poll_once
from controller.checkers.interface import InterfaceChecker
from controller.checkers.process import process_checkers
from controller.config import ClusterConfig, ModuleConfig, UserScripts
from controller.datapath import DataPath, DataPathError, Replicated
from controller.heartbeat import Heartbeats, Network, PeerBeat
from controller.modulelog import ModuleLog
from controller.paths import Layout
from controller.vip import (
    MAX_TICKLED,
    Connection,
    VipError,
    VirtualIp,
    client_connections,
    connections_from_wire,
    import_scapy,
    send_tickles,
    virtual_ips,
)
from hafs.state import write_json_durably

log = logging.getLogger(__name__)

DEFAULT_HEART_PORT = 4800
REPLICATION_PORT_OFFSET = 100  # directory i replicates on heart port + 100 + i
LEASE_SHARE = 0.8  # the witness's lease, as a share of <heart timeout>
RENEW_EVERY = 1 / 8  # of the lease: the renewal's period and its answer's timeout
WATCH_INTERVAL = 0.5  # how often the data path's own state is polled
PROGRESS_INTERVAL = 5.0  # how often a running resync's progress is logged
# After one of these failed, the rest of its transition (taking the VIP, starting the
# application) must not happen; releasing actions go on even when one of them fails.
ACQUIRING = (sm.Mount, sm.TakeVip, sm.StartReplica)
LEVEL_LETTER = {sm.LogLevel.INFO: "I", sm.LogLevel.WARNING: "W", sm.LogLevel.ERROR: "E"}


@dataclass
class _Command:
    """An operator command waiting for its transition."""

    event: sm.Event
    done: trio.Event
    transition: sm.Transition | None = None


@dataclass(frozen=True)
class Record:
    """What the module persists: the state machine's record (I7), whether the operator
    wants the module running (boot="ignore"), and whether this node may hold the VIP, a
    mount or the application (serving): a daemon that finds it set after a crash cleans up
    before it announces anything the peer could take over on."""

    durable: sm.Durable = sm.Durable()
    started: bool = False
    serving: bool = False


class DurableStore:
    def __init__(self, directory: Path) -> None:
        self.path = directory / "durable.json"
        directory.mkdir(parents=True, exist_ok=True)

    def load(self) -> Record:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return Record()
        durable = sm.Durable(
            copy=sm.Copy(data["copy"]), term=int(data["term"]), prim_term=int(data["prim_term"])
        )
        return Record(durable, bool(data.get("started")), bool(data.get("serving")))

    def save(self, record: Record) -> None:
        d = record.durable
        data = {**asdict(d), "copy": d.copy.value, "started": record.started,
                "serving": record.serving}  # fmt: skip
        write_json_durably(self.path, data)


def peer_info_to_wire(info: sm.PeerInfo) -> dict[str, Any]:
    return {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(info).items()}


def peer_info_from_wire(data: dict[str, Any]) -> sm.PeerInfo:
    """Raise ValueError/KeyError/TypeError on a payload that is not a PeerInfo."""
    return sm.PeerInfo(
        name=str(data["name"]),
        state=sm.State(data["state"]),
        phase=sm.Phase(data["phase"]),
        copy=sm.Copy(data["copy"]),
        term=int(data["term"]),
        prim_term=int(data["prim_term"]),
        leaving=bool(data["leaving"]),
        forced=bool(data["forced"]),
        colour=sm.Colour(data["colour"]),
    )


class Module:
    """A module's state machine, heartbeats, data path, VIP, scripts and checkers."""

    def __init__(
        self,
        layout: Layout,
        cluster: ClusterConfig,
        config: ModuleConfig,
        node: str,
        key: bytes,
    ) -> None:
        self.layout = layout
        self.cluster = cluster
        self.config = config
        self.name = config.name
        self.node = node
        self.peer = cluster.peer(node)
        self.modlog = ModuleLog(layout.module_log(self.name), node)
        self.store = DurableStore(layout.module_state(self.name))
        self.record = self.store.load()
        self.view = sm.NodeView(self._policy(), durable=self.record.durable)
        # Unbounded: dropping a ScriptResult or an ActionFailed would leave the module stuck
        # in a transient phase; the producers are bounded by the events they react to.
        self._send, self._receive = trio.open_memory_channel[sm.Event | _Command](math.inf)
        self._scripts: deque[sm.RunScript] = deque()
        self._script_queued = trio.Event()
        self._mirroring = False  # a SetMountMode(MIRROR) copy is running
        self._mirror_backoff = 0.0
        self.resync_progress = ""  # while this primary resyncs its peer, where it is
        self._verifying = False  # `hafs verify` runs (one at a time)
        self._nursery: trio.Nursery | None = None
        self._running_script: tuple[str, trio.CancelScope] | None = None
        self._last_beat: float | None = None
        heart_port = config.heart.port or DEFAULT_HEART_PORT
        self.networks = self._networks()
        self.heartbeats = Heartbeats(
            key=key,
            module=self.name,
            node=node,
            peer=self.peer,
            networks=self.networks,
            port=heart_port,
            pulse=config.heart.pulse,
            timeout=config.heart.timeout,
            on_beat=self._on_beat,
            on_lost=lambda: self.post(sm.PeerLost(announced=False)),
            on_reject=lambda why: self.modlog.warning(f"heartbeat rejected: {why}"),
        )
        self.datapath = DataPath(
            self._replicated(heart_port + REPLICATION_PORT_OFFSET),
            layout.cluster_key,
            layout.logs / self.name,
            timeout=min(config.heart.timeout, 30.0),
            maxrate=config.rfs.reiallowedbw * 1000 if config.rfs else 0,
            workers=config.rfs.nbrei if config.rfs else 4,
            ack=config.rfs.ack if config.rfs else "applied",
            xattrs=config.rfs.xattrs if config.rfs else True,
        )
        self.vips = virtual_ips(config.vip) if config.vip is not None else []
        self.checkers = _checkers(config, self.vips)
        self.arbiter = self._arbiter(key)
        self._clients: list[Connection] = []  # ours, while primary: in our heartbeats
        self.peer_clients: list[Connection] = []  # the peer's, while it was primary
        self._lease_until = 0.0  # trio clock: when the witness may give our lease away
        self._lease_trouble = ""  # why the last renewal failed ("" once one succeeded)
        self._lease_lost_posted = False  # LeaseLost posted in this ALONE period

    def _arbiter(self, key: bytes) -> WitnessClient | None:
        sb = self.config.check.splitbrain
        if sb is None or not sb.arbitrate:
            return None
        return WitnessClient((str(sb.witnesses[0]), sb.port), key, self.name, self.node)

    # ------------------------------------------------------------------ configuration

    def _policy(self) -> sm.Policy:
        s = self.config.service
        return sm.Policy(
            node=self.node,
            peer=self.cluster.peer(self.node),
            defaultprim=s.defaultprim,
            failover=s.failover,
            witness=self.config.check.splitbrain is not None,
            maxloop=s.maxloop,
            loop_interval=s.loop_interval,
        )

    def _networks(self) -> list[Network]:
        nets = []
        for hb in self.config.heart.heartbeats:
            lan = self.cluster.lan(hb.name)
            me, other = lan.node(self.node), lan.node(self.peer)
            nets.append(Network(hb.name, str(me.local_addr), str(other.addr)))
        return nets

    def _replication_lan(self) -> Network:
        flow = [hb.name for hb in self.config.heart.heartbeats if hb.carries_replication]
        for net in self.networks:
            if not flow or net.name == flow[0]:
                return net
        return self.networks[0]

    def _replicated(self, base_port: int) -> list[Replicated]:
        net = self._replication_lan()
        rfs = self.config.rfs
        dirs = rfs.replicated if rfs else ()
        return [
            Replicated(
                dir=Path(d.dir),
                state_dir=self.layout.module_state(self.name) / f"dir{i}",
                local=(net.local_addr, base_port + i),
                peer=(net.peer_addr, base_port + i),
            )
            for i, d in enumerate(dirs)
        ]

    # ------------------------------------------------------------------ events in

    def post(self, event: sm.Event) -> None:
        """Queue an event from any task (or a heartbeat callback)."""
        self._send.send_nowait(event)

    def _save(self, **changes: Any) -> None:
        """Persist the record with `changes` (fsync'ed before anything else happens)."""
        record = replace(self.record, **changes)
        if record != self.record:
            self.store.save(record)
            self.record = record

    async def command(self, event: sm.Event) -> sm.Transition:
        """Run an operator command through the queue and return its transition."""
        cmd = _Command(event, trio.Event())
        await self._send.send(cmd)
        await cmd.done.wait()
        assert cmd.transition is not None
        return cmd.transition

    def _on_beat(self, beat: PeerBeat) -> None:
        try:
            info = peer_info_from_wire(beat.payload)
        except (KeyError, ValueError, TypeError) as e:
            self.modlog.warning(f"heartbeat from {beat.node} rejected: bad state payload: {e}")
            return
        if info.name != self.peer:
            self.modlog.warning(f"heartbeat names {info.name}, expected {self.peer}: ignored")
            return
        self._last_beat = time.monotonic()
        self._note_peer_clients(info, beat.payload.get("clients", []))
        self.post(sm.PeerSeen(info))
        if beat.goodbye:
            self.post(sm.PeerLost(announced=True))

    # ------------------------------------------------------------------ the loop

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self._warn_at_start()
        await self.datapath.stop_orphan_replicas()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.heartbeats.run)
            nursery.start_soon(self._script_worker)
            nursery.start_soon(self._watch_data_path)
            for checker in self.checkers:
                nursery.start_soon(self._run_checker, checker)
            if self.arbiter is not None:
                nursery.start_soon(self._keep_lease, self.arbiter)
            if self.vips:  # half a second a failover's TakeVip would otherwise wait
                nursery.start_soon(trio.to_thread.run_sync, import_scapy)
                nursery.start_soon(self._list_clients)
            if self._left_serving():
                self._clean_up_after_crash()
            elif self._boot_starts():
                self.post(sm.Start())
            self._announce()
            task_status.started()
            await self._event_loop()

    def _left_serving(self) -> bool:
        """Did an earlier daemon leave a VIP, a mount or the application behind?"""
        held = [vip for vip in self.vips if vip.held()]
        return self.record.serving or bool(held) or self.datapath.mounted_dirs() != []

    def _clean_up_after_crash(self) -> None:
        """Stop what an earlier daemon left running before announcing anything else: the
        module starts as a primary that is stopping (the peer waits for it, I8), runs
        stop_prim, releases the VIP, unmounts, and only then reaches STOP (and starts again
        when the module is to start at boot)."""
        state = sm.State.PRIM if self.view.copy is sm.Copy.MIRROR else sm.State.ALONE
        why = "the previous daemon stopped while primary: stopping what it left running"
        self.modlog.warning(why)
        self.view = replace(
            self.view,
            state=state,
            phase=sm.Phase.STOPPING,
            goal=sm.Goal.STOP,
            stopstart=self._boot_starts(),
            why=why,
        )
        self._queue_script(sm.RunScript("stop_prim", (str(state), "STOP", "stop")))

    def _warn_at_start(self) -> None:
        v = self.view
        self.modlog.info(
            f"module {self.name} loaded on {self.node} (peer {self.peer}): copy {v.copy}, "
            f"term {v.durable.term}"
        )
        if self.config.check.splitbrain is None:
            self.modlog.warning(
                "no <splitbrain> witness configured: if every heartbeat network fails, both "
                "nodes go ALONE and one side's changes are lost when they meet again"
            )

    def _boot_starts(self) -> bool:
        boot = self.config.service.boot
        return boot == "on" or (boot == "ignore" and self.record.started)

    async def _event_loop(self) -> None:
        async for item in self._receive:
            if isinstance(item, _Command):
                item.transition = await self._apply(item.event)
                item.done.set()
            else:
                await self._apply(item)

    async def _apply(self, event: sm.Event) -> sm.Transition:
        old = self.view
        t = sm.step(old, event)
        self.view = t.new_state
        self._note_started(event, t)
        for action in t.actions:
            ok = await self._execute(action)
            if not ok and isinstance(action, ACQUIRING | sm.Persist):
                break  # no VIP or application without the data: ActionFailed decides next
        self._note_released()
        if t.new_state.state is not old.state or t.new_state.phase is not old.phase:
            log.info("%s: %s/%s -> %s/%s: %s", self.name, old.state, old.phase,
                     self.view.state, self.view.phase, t.reason)  # fmt: skip
        self._announce()
        if self._waiting_for_peer(old) and self._nursery is not None:
            self._nursery.start_soon(self._peer_absent_after_timeout)
        return t

    def _waiting_for_peer(self, old: sm.NodeView) -> bool:
        v = self.view
        waiting = v.state is sm.State.WAIT and v.phase is sm.Phase.PEER
        was = old.state is sm.State.WAIT and old.phase is sm.Phase.PEER
        return waiting and not was

    async def _peer_absent_after_timeout(self) -> None:
        """A started node that hears no heartbeat within `timeout` learns the peer is absent
        (the heartbeat layer only reports the loss of a peer it has heard)."""
        await trio.sleep(self.config.heart.timeout)
        v = self.view
        if v.state is sm.State.WAIT and v.peer is None and not self.heartbeats.peer_alive:
            self.post(sm.PeerLost(announced=False))

    def _note_started(self, event: sm.Event, t: sm.Transition) -> None:
        """Remember whether the operator wants the module running (boot="ignore")."""
        if t.refused:
            return
        if isinstance(event, sm.Start | sm.Prim | sm.Second | sm.StopStart):
            self._save(started=True)
        elif isinstance(event, sm.Stop):
            self._save(started=False)

    def _note_released(self) -> None:
        """Clear `serving` once a node that left the primary role holds nothing any more."""
        v = self.view
        if not self.record.serving or v.state.primary or self.datapath.mounts:
            return
        if not any(vip.held() for vip in self.vips):
            self._save(serving=False)

    def _announce(self) -> None:
        payload = peer_info_to_wire(self.view.announce())
        if self.view.state.primary and self._clients:
            payload["clients"] = [list(c) for c in self._clients]
        self.heartbeats.announce(payload)

    def _note_peer_clients(self, info: sm.PeerInfo, clients: object) -> None:
        """Keep the client connections of a peer that serves, for tickle ACKs should this
        node take its VIP over (controller/vip.py)."""
        if not info.state.primary:
            return
        try:
            self.peer_clients = connections_from_wire(clients)
        except ValueError as e:
            self.modlog.warning(f"heartbeat from {info.name}: bad client list ignored: {e}")

    async def _list_clients(self) -> None:
        """While primary, the clients connected to the VIPs, in the heartbeats."""
        while True:
            await trio.sleep(self.config.heart.pulse)
            found: list[Connection] = []
            try:
                if self.view.state.primary:
                    for vip in self.vips:
                        found += await trio.to_thread.run_sync(client_connections, vip.addr)
            except Exception:  # psutil: an optimisation must never stop the daemon
                log.exception("%s: listing the clients of the VIP", self.name)
                continue
            if found != self._clients:
                self._clients = found[:MAX_TICKLED]
                self._announce()

    async def _tickle_clients(self) -> None:
        """After taking the VIP over: reset the peer's clients' connections at once."""
        clients, self.peer_clients = self.peer_clients, []
        if not clients:
            return
        try:
            await trio.to_thread.run_sync(send_tickles, clients)
        except VipError as e:  # the clients find out at their next retransmission
            self._log("W", str(e))
            return
        self._log("I", f"tickle ACKs sent to {len(clients)} client connections of {self.peer}")

    # ------------------------------------------------------------------ actions out

    async def _execute(self, action: sm.Action) -> bool:
        """Carry out one action; False if it failed (and ActionFailed was queued). Any
        exception is a failed action: the daemon must outlive a broken disk or script."""
        name = type(action).__name__
        try:
            if isinstance(action, sm.Log):
                self._log(LEVEL_LETTER[action.level], action.message)
            elif isinstance(action, sm.Persist):
                self._save(durable=action.durable)
            elif isinstance(action, sm.RunScript):
                self._queue_script(action)
            else:
                if isinstance(action, ACQUIRING):
                    self._save(serving=True)  # before: a crash after it must clean up
                await self._effect(action)
                if not isinstance(action, sm.AskWitness | sm.StartResync):
                    self._log("I", f"action {_describe(action)}: done")
        except Exception as e:
            log.exception("%s: action %s failed", self.name, name)
            self._log("E", f"action {name} failed: {e}")
            self.post(sm.ActionFailed(name, str(e)))
            return False
        return True

    def _log(self, level: str, message: str) -> None:
        """The module log; a full disk must not stop the daemon, so failures go to stderr."""
        try:
            self.modlog.write(level, message)
        except OSError as e:
            log.error("%s: module log unwritable (%s): %s", self.name, e, message)

    async def _effect(self, action: sm.Action) -> None:
        nursery = self._nursery
        assert nursery is not None
        match action:
            case sm.TakeVip():
                for vip in self.vips:
                    await vip.take()
                    await nursery.start(vip.announce)
                await self._tickle_clients()
            case sm.ReleaseVip():
                errors = []
                for vip in self.vips:  # every one, even when one fails
                    try:
                        await vip.release()
                    except VipError as e:
                        errors.append(str(e))
                if errors:
                    raise VipError("; ".join(errors))
            case sm.Mount(mode=mode):
                await self.datapath.mount(alone=mode is sm.MountMode.ALONE)
            case sm.SetMountMode(mode=sm.MountMode.ALONE):
                await self.datapath.alone(f"{self.peer} lost")
            case sm.SetMountMode(mode=sm.MountMode.FENCED):
                await self.datapath.fence(f"stepping down: {self.view.why}")
            case sm.SetMountMode(mode=sm.MountMode.MIRROR):
                nursery.start_soon(self._mirror)
            case sm.Unmount():
                await self.datapath.unmount()
            case sm.StartReplica():
                await self.datapath.start_replicas(stale=not self.view.uptodate)
            case sm.StopReplica():
                await self.datapath.stop_replicas()
            case sm.StartResync(full=full):
                self.modlog.info(f"resync from {self.peer} started ({'full' if full else 'delta'})")
                nursery.start_soon(self._await_resync)
            case sm.AskWitness():
                nursery.start_soon(self._ask_witness)
            case _:
                raise RuntimeError(f"unknown action {action!r}")

    async def _mirror(self) -> None:
        """The primary's side of a SECOND joining: copy what differs, then mirror. A failed
        copy is retried by the SECOND's next heartbeat; back off so a link that carries
        heartbeats but not the stream does not make the primary flap every pulse."""
        await trio.sleep(self._mirror_backoff)
        started = time.monotonic()
        self._mirroring = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._report_progress)
                totals = await self.datapath.mirror()
                nursery.cancel_scope.cancel()
        except Exception as e:
            self._mirror_backoff = min(max(2 * self._mirror_backoff, 1.0), 30.0)
            self._log("E", f"resync to {self.peer} failed: {e}")
            self.post(sm.ReplicationLost(f"resync failed: {e}"))
            return
        finally:
            self._mirroring = False
            self.resync_progress = ""
        self._mirror_backoff = 0.0
        self._log(
            "I",
            f"resync to {self.peer} done in {time.monotonic() - started:.1f} s: "
            f"{totals['files_copied']} files, {totals['bytes_sent']} bytes copied; mirroring",
        )

    async def _report_progress(self) -> None:
        """While the copy runs: where it is, in the module log and in `hafs state`."""
        while True:
            await trio.sleep(PROGRESS_INTERVAL)
            self.resync_progress = await self.datapath.resync_progress()
            if self.resync_progress:
                self._log("I", f"resync to {self.peer}: {self.resync_progress}")

    async def verify(self, repair: bool) -> dict[str, Any]:
        """`hafs verify -m`: compare each replicated directory with the SECOND's copy while
        the application writes; `repair`: send what differs again (docs/daemon.md)."""
        refused = self._verify_refused()
        if refused:
            return {"ok": False, "message": refused}
        self._verifying = True
        try:
            self._log("I", f"verify against {self.peer}{' with repair' if repair else ''}")
            try:
                dirs = await self.datapath.verify(repair)
            except (OSError, DataPathError) as e:
                return {"ok": False, "message": f"verify: {e}"}
        finally:
            self._verifying = False
        outcome = [_verify_outcome(d) for d in dirs]
        for line in outcome:
            self._log("I" if line.endswith(": identical") else "W", f"verify {line}")
        return {"ok": True, "message": "; ".join(outcome), "dirs": dirs}

    def _verify_refused(self) -> str:
        v = self.view
        if v.state is not sm.State.PRIM:
            return (
                f"verify runs on the PRIM (only a PRIM has a peer's replica to compare "
                f"with): {self.node} is {v.state}"
            )
        if v.phase is not sm.Phase.READY or self._mirroring:
            return f"{self.node} is PRIM but not settled ({v.phase}): try again when green"
        if v.peer is None or v.peer.colour is not sm.Colour.GREEN:
            colour = "unknown" if v.peer is None else v.peer.colour
            return f"the SECOND {self.peer} is not synchronised yet ({colour}): nothing to verify"
        if self._verifying:
            return "a verify is already running"
        return ""

    async def _await_resync(self) -> None:
        """The SECOND's side: the copy is up to date once every replica says synced (it
        must first be seen not synced, so an earlier session's state is not taken for it)."""
        seen_unsynced = False
        while self.view.phase is sm.Phase.RESYNCING:
            synced = await self.datapath.replicas_synced()
            if synced is None:
                self.post(sm.ResyncFinished(False, time.monotonic(), "replica server died"))
                return
            if synced and seen_unsynced:
                self.post(sm.ResyncFinished(True, time.monotonic()))
                return
            seen_unsynced = seen_unsynced or not synced
            await trio.sleep(WATCH_INTERVAL)

    async def _ask_witness(self) -> None:
        from controller.checkers.witness import reachable

        sb = self.config.check.splitbrain
        witnesses = [str(w) for w in sb.witnesses] if sb else []
        try:
            if self.arbiter is not None:
                ok, answer = await self._claim_primary(self.arbiter)
            else:
                ok = await reachable(witnesses)
                answer = "reachable" if ok else "unreachable"
        except Exception as e:  # no ping binary, no socket: the witness was not reached
            log.exception("%s: witness check failed", self.name)
            self._log("E", f"splitbrain witness check failed: {e}")
            ok, answer = False, "unreachable"
        self._log("I", f"splitbrain witness {' '.join(witnesses)}: {answer}")
        self.post(sm.WitnessResult(ok))

    async def _claim_primary(self, arbiter: WitnessClient) -> tuple[bool, str]:
        """Ask the arbitrating witness for the primary role, for up to one lease and a
        second: a peer that is gone (or cut off from the witness) has lost its lease by
        then."""
        lease = self._lease_length()
        deadline = trio.current_time() + lease + 1.0
        answer = await arbiter.claim_until(lease, deadline, retry=lease * RENEW_EVERY)
        if answer is None:
            return False, "unreachable"
        if not answer.granted:
            return False, f"refused: {answer.holder or 'it just started'} holds the primary role"
        self._lease_until = answer.sent + answer.lease
        return True, "granted the primary role"

    def _lease_length(self) -> float:
        """Shorter than the heart timeout: a dead primary's lease has run out on the witness
        by the time its peer notices and claims it."""
        return self.config.heart.timeout * LEASE_SHARE

    async def _keep_lease(self, arbiter: WitnessClient) -> None:
        """While serving, renew the witness's lease every eighth of it; release it after."""
        tick = self._lease_length() * RENEW_EVERY
        serving = False
        while True:
            next_tick = trio.current_time() + tick
            try:
                serving = await self._renew_or_release(arbiter, serving)
            except Exception as e:  # the daemon must outlive a witness it cannot reach
                log.exception("%s: witness lease", self.name)
                self._log("E", f"witness lease: {e}")
            await trio.sleep_until(next_tick)

    async def _renew_or_release(self, arbiter: WitnessClient, serving: bool) -> bool:
        """One renewal (or, having left the role, the release); whether serving now."""
        lease = self._lease_length()
        v = self.view
        if v.state is not sm.State.ALONE:
            self._lease_lost_posted = False  # a later ALONE period reports again
        if not (v.state.primary and not v.leaving):
            if serving:
                await arbiter.claim(lease, timeout=lease * RENEW_EVERY, release=True)
            return False
        now = trio.current_time()
        if not serving and v.state is sm.State.ALONE and self._lease_until < now:
            # ALONE without a grant: the peer stopped (announced), lost an election, or the
            # operator said prim; a leftover lease of the peer's may still run meanwhile.
            self._lease_until = now + 2 * lease
        answer = await arbiter.claim(lease, timeout=lease * RENEW_EVERY)
        if answer is not None and answer.granted:
            self._lease_until = answer.sent + answer.lease
            self._lease_trouble = ""
            return True
        why = "no answer" if answer is None else f"{answer.holder or 'nobody'} holds it"
        if not self._lease_trouble:
            self._log("W", f"witness lease not renewed ({why})")
        self._lease_trouble = why
        if self._lease_lapsing(lease) and not self._lease_lost_posted:
            self._lease_lost_posted = True
            self.post(sm.LeaseLost(why))
        return True

    def _lease_lapsing(self, lease: float) -> bool:
        """ALONE acknowledges on its own word: without a lease it must stop before the
        witness can have given the role away, a quarter lease before our last claim's
        lease ends, after about six renewals failed in a row (LeaseLost: fenced, then
        stepping down). Not when the peer, seen in its heartbeats, cannot take over (it
        is not a synchronised SECOND); nor for a PRIM, whose writes wait for its SECOND."""
        v = self.view
        if v.state is not sm.State.ALONE:
            return False
        if v.peer is not None and not v.peer.synced_second:
            return False
        return trio.current_time() > self._lease_until - lease / 4

    async def _script_worker(self) -> None:
        """Run scripts one at a time, in order. A stop script arriving while a start script
        runs cancels it (start scripts have no time limit: a hung one must not block the
        stop). Without `<user>`, SafeKit runs no scripts, and neither does hafs."""
        from controller.scripts import ScriptContext, run_script

        user = self.config.user
        ctx = ScriptContext(self.layout, self.name, self.node, user or UserScripts())
        while True:
            while not self._scripts:
                self._script_queued = trio.Event()
                await self._script_queued.wait()
            script = self._scripts.popleft()
            ok = True
            if user is not None:
                ok = False
                with trio.CancelScope() as scope:
                    self._running_script = (script.script, scope)
                    try:
                        outcome = await run_script(ctx, script.script, script.args)
                        ok = outcome.ok
                    except Exception as e:
                        log.exception("%s: script %s", self.name, script.script)
                        self._log("E", f"script {script.script} could not run: {e}")
                self._running_script = None
                ok = ok and not scope.cancelled_caught
            self.post(sm.ScriptResult(script.script, ok))

    def _queue_script(self, script: sm.RunScript) -> None:
        """A stop script cancels the start scripts that run or wait (start scripts have no
        time limit: a hung one must not hold the stop back); each cancelled one reports
        failure, as the state machine expects one result per script."""
        if script.script.startswith("stop"):
            running = self._running_script
            if running is not None and running[0].startswith("start"):
                self._log("W", f"{running[0]} still running: cancelled for {script.script}")
                running[1].cancel()
            for queued in [q for q in self._scripts if q.script.startswith("start")]:
                self._scripts.remove(queued)
                self._log("W", f"{queued.script} not run: {script.script} came first")
                self.post(sm.ScriptResult(queued.script, False))
        self._scripts.append(script)
        self._script_queued.set()

    async def _watch_data_path(self) -> None:
        """Report a mount that stopped replicating (HELD, or ALONE by itself) or died."""
        reported = False
        while True:
            await trio.sleep(WATCH_INTERVAL)
            v = self.view
            if not v.state.primary or not self.datapath.mounts or self._mirroring:
                reported = False
                continue
            alive = all(proc.alive for proc in self.datapath.mounts)
            if reported or (not alive and v.phase is not sm.Phase.READY):
                continue  # mounts come and go while the application starts or stops
            if not alive:
                reported = True
                dead = next(p for p in self.datapath.mounts if not p.alive)
                self.post(sm.ActionFailed("mount", dead.exit_detail()))
            elif v.state is sm.State.PRIM:
                # In every phase: a mount HELD while start_prim or stop_prim runs would
                # hold the script too (it waits on the application's writes).
                why = await self.datapath.replication_lost()
                if why is not None:
                    reported = True
                    self.post(sm.ReplicationLost(why))

    async def _run_checker(self, watch: Watch) -> None:
        """Poll one checker while the module is in the states its class covers; never
        during a transition, when processes come and go (SafeKit switches errd off then)."""
        while True:
            await trio.sleep(watch.checker.interval)
            if not watch.covers(self.view):
                continue
            result = await poll_once(watch.checker)
            if result.ok or not watch.covers(self.view):
                continue
            self.modlog.warning(f"checker {watch.checker.name}: {result.detail}")
            if watch.action == "stop":
                self.post(sm.Stop())
            elif watch.action in ("restart", "stopstart"):
                action: Literal["restart", "stopstart"] = (
                    "restart" if watch.action == "restart" else "stopstart"
                )
                self.post(sm.CheckerFailed(watch.checker.name, action, time.monotonic()))

    # ------------------------------------------------------------------ shutdown and state

    def stop_time_limit(self) -> float:
        """How long a stop may take: both runs of stop_prim, poststop, and a margin."""
        user = self.config.user or UserScripts()
        return 2 * user.nicestoptimeout + user.forcestoptimeout + 30.0

    async def shutdown(self) -> None:
        """Stop the module (a failover when primary), then say goodbye to the peer."""
        timeout = self.stop_time_limit()
        if self.view.state is not sm.State.STOP:
            started = self.record.started
            await self.command(sm.Stop())
            self._save(started=started)  # a daemon stop is not an operator's stop: boot again
            with trio.move_on_after(timeout):
                while self.view.state is not sm.State.STOP:
                    await trio.sleep(0.1)
        if self.view.state is not sm.State.STOP:
            # Still holding the role: a goodbye would let the peer take over at once (I8);
            # it learns from the heartbeat timeout instead, and asks the witness.
            self._log("E", f"daemon stopping with the module still {self.view.state}")
            return
        await self.datapath.stop_all()
        await self.heartbeats.goodbye()

    def snapshot(self) -> dict[str, Any]:
        v = self.view
        peer = v.peer
        return {
            "module": self.name,
            "node": self.node,
            "state": v.state.value,
            "colour": v.colour.value,
            "phase": v.phase.value,
            "why": v.why,
            "copy": v.copy.value,
            "uptodate": v.uptodate,
            "code": v.state.code,
            "peer": None
            if peer is None
            else {
                "node": peer.name,
                "state": peer.state.value,
                "colour": peer.colour.value,
                "phase": peer.phase.value,
                "copy": peer.copy.value,
            },
            "peer_name": self.peer,
            "heartbeats": self.heartbeats.alive_networks(),
            "vip": [str(vip.addr) for vip in self.vips],
            "resync": self.resync_progress,
        }


def _verify_outcome(result: dict[str, Any]) -> str:
    """One directory's verify, for the module log: `DIR: identical`, or what differs."""
    where = result["dir"]
    if "error" in result:
        return f"{where}: {result['error']}"
    verdict, repaired = result["verdict"], ""
    if "repair" in result:
        repaired = f"repair: {result['repair'].get('message', '')}; then "
    if verdict["identical"]:
        return f"{where}: {repaired}identical"
    paths = verdict["differing"]
    shown = ", ".join(paths[:5]) + (", ..." if len(paths) > 5 else "")
    return f"{where}: {repaired}{len(paths)} paths differ: {shown}"


def _describe(action: sm.Action) -> str:
    fields = ", ".join(f"{k}={v}" for k, v in asdict(action).items())  # type: ignore[call-overload]
    return f"{type(action).__name__}({fields})"


@dataclass(frozen=True)
class Watch:
    """A checker, what to do when it fails, and in which states it runs (SafeKit's class:
    "prim" a running primary, "second" a running SECOND, "both" either)."""

    checker: Checker
    action: str
    monitor_class: str = "prim"

    def covers(self, view: sm.NodeView) -> bool:
        if view.phase is not sm.Phase.READY:
            return False
        if self.monitor_class == "prim":
            return view.state.primary
        if self.monitor_class == "second":
            return view.state is sm.State.SECOND
        return view.state.primary or view.state is sm.State.SECOND


def _checkers(config: ModuleConfig, vips: list[VirtualIp]) -> list[Watch]:
    """errd's process checkers, and a link checker under each checked virtual IP."""
    watches: list[Watch] = []
    if config.errd is not None:
        for checker in process_checkers(config.errd):
            watches.append(Watch(checker, checker.proc.action, checker.proc.monitor_class))
    if config.vip is not None:
        for interface in config.vip.interfaces:
            if not interface.check:
                continue
            names = {interface.name} if interface.name else set()
            for vip in vips if interface.name is None else ():
                with contextlib.suppress(VipError):  # take() will say why, with the context
                    names.add(vip.placement()[0])
            for name in sorted(names):
                watches.append(Watch(InterfaceChecker(name), "stopstart"))
    return watches
