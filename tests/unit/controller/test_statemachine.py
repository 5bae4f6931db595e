"""Unit tests of controller.statemachine, the pure module state machine.

1. A transition table derived from SafeKit's documentation (reference/safekit.md, the seed):
   for each row, the state before, the event, and the expected state, effects and reason.
2. Colours, qualifiers and `state -lq` codes; `elect` is symmetric.
3. A hypothesis stateful test running two nodes' state machines against each other through a
   simulated heartbeat channel that can be cut and healed, with crashes, scripts, witness,
   resyncs, checkers, application writes and random operator commands. After every step:
   (1) while the link is up and each node has the other's current heartbeat, the two nodes
       are never both primary (a primary that is stopping its application to hand over or
       step down counts as leaving); with a witness configured, a node cut off from its peer
       goes ALONE only after reaching the witness, and steps down when it cannot (I8);
   (2) a node enters PRIM/ALONE only with an up-to-date copy unless a forced prim was issued
       to it: both by its own flag, and by a data oracle that tracks every acknowledged write
       and refuses promotion of a copy that misses a write it could have known about;
   (3) actions match states: TakeVip/Mount only on entering PRIM/ALONE, ReleaseVip/Unmount
       when leaving, the replica server exactly while SECOND, persist before taking the VIP.
4. Mutant runs: the same simulation against deliberately broken rules, each of which must be
   caught, so that the properties above can fail.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import Phase as HypothesisPhase
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from controller import statemachine as sm
from controller.statemachine import (
    Action,
    ActionFailed,
    AskWitness,
    CheckerFailed,
    Colour,
    Copy,
    Durable,
    Event,
    Goal,
    LeaseLost,
    Log,
    Mount,
    MountMode,
    NodeView,
    PeerInfo,
    PeerLost,
    PeerSeen,
    Persist,
    Phase,
    Policy,
    Prim,
    Qualifier,
    ReleaseVip,
    ReplicationLost,
    Restart,
    ResyncFinished,
    RunScript,
    ScriptResult,
    Second,
    SetMountMode,
    Start,
    StartReplica,
    StartResync,
    State,
    Stop,
    StopReplica,
    StopStart,
    Swap,
    TakeVip,
    Transition,
    Unmount,
    Witness,
    WitnessResult,
    elect,
    step,
)

N1, N2 = "node1", "node2"
STOP, WAIT, ALONE, PRIM, SECOND = (State.STOP, State.WAIT, State.ALONE, State.PRIM, State.SECOND)
SOLE, MIRROR, STALE = Copy.SOLE, Copy.MIRROR, Copy.STALE


def policy(**kw: Any) -> Policy:
    return Policy(node=N1, peer=N2, **kw)


def view(
    state: State = STOP,
    phase: Phase = Phase.READY,
    copy: Copy = STALE,
    term: int = 4,
    prim_term: int = 0,
    peer: PeerInfo | None = None,
    pol: Policy | None = None,
    **kw: Any,
) -> NodeView:
    return NodeView(
        policy=pol or policy(),
        durable=Durable(copy=copy, term=term, prim_term=prim_term),
        state=state,
        phase=phase,
        peer=peer,
        **kw,
    )


def peer(
    state: State,
    phase: Phase = Phase.READY,
    copy: Copy = MIRROR,
    prim_term: int = 0,
    term: int = 4,
    **kw: Any,
) -> PeerInfo:
    return PeerInfo(N2, state, phase, copy, term, prim_term, **kw)


def script(name: str, old: State, new: State, action: str) -> RunScript:
    return RunScript(name, (str(old), str(new), action))


def effects(t: Transition) -> tuple[Action, ...]:
    """The actions other than log lines."""
    return tuple(a for a in t.actions if not isinstance(a, Log))


def enter(old: State, new: State, term: int, copy: Copy = SOLE) -> tuple[Action, ...]:
    """The effects of becoming primary from `old` with a fresh term `term`."""
    mode = MountMode.MIRROR if new is PRIM else MountMode.ALONE
    before: tuple[Action, ...] = ()
    if old is SECOND:
        before = (StopReplica(), script("stop_second", old, new, "stop"))
    return (
        *before,
        Persist(Durable(copy, term, term)),
        Mount(mode),
        TakeVip(),
        script("start_prim", old, new, "start"),
    )


def join(old: State, persist: Durable | None, full: bool = False) -> tuple[Action, ...]:
    """The effects of becoming SECOND (resync) from `old`."""
    p: tuple[Action, ...] = (Persist(persist),) if persist else ()
    return (*p, StartReplica(), StartResync(full), script("start_second", old, SECOND, "start"))


# --------------------------------------------------------------------------- 1. the table


@dataclass(frozen=True)
class Row:
    """One documented transition. `doc` says where SafeKit (or hafs's design) says so."""

    id: str
    doc: str
    before: NodeView
    event: Event
    state: State
    phase: Phase
    effects: tuple[Action, ...]
    reason: str
    copy: Copy | None = None
    refused: bool = False


W = {"witness": True}
synced = Phase.READY
prim_synced = view(PRIM, copy=MIRROR, prim_term=4, peer=peer(SECOND, copy=MIRROR))
second_synced = view(SECOND, copy=MIRROR, peer=peer(PRIM, prim_term=4))
second_resync = view(SECOND, Phase.RESYNCING, STALE, peer=peer(ALONE, prim_term=4, copy=SOLE))

ROWS = [
    # ---- start [UG §5.2: STOP -> WAIT (Transient) -> ALONE | SECOND | WAIT (NotReady)]
    Row(
        "start",
        "§5.2 STOP->WAIT",
        view(),
        Start(),
        WAIT,
        Phase.PEER,
        (script("prestart", STOP, WAIT, "start"),),
        "start requested",
    ),
    Row(
        "start-twice",
        "§9.3",
        view(WAIT, Phase.PEER),
        Start(),
        WAIT,
        Phase.PEER,
        (),
        "already started",
        refused=True,
    ),
    Row(
        "join-alone",
        "§4.2 start while the peer is ALONE -> SECOND after resync",
        view(WAIT, Phase.PEER, MIRROR),
        PeerSeen(peer(ALONE, copy=SOLE, prim_term=4)),
        SECOND,
        Phase.RESYNCING,
        join(WAIT, Durable(STALE, 4, 0)),
        "joining as SECOND",
        copy=STALE,
    ),
    Row(
        "join-prim",
        "§5.2 WAIT -> SECOND",
        view(WAIT, Phase.PEER),
        PeerSeen(peer(PRIM, copy=MIRROR, prim_term=4)),
        SECOND,
        Phase.RESYNCING,
        join(WAIT, None),
        "joining as SECOND",
    ),
    Row(
        "join-forced",
        "§5.9 primforce: the next resync is full",
        view(WAIT, Phase.PEER),
        PeerSeen(peer(ALONE, copy=SOLE, forced=True)),
        SECOND,
        Phase.RESYNCING,
        join(WAIT, None, full=True),
        "joining as SECOND",
    ),
    Row(
        "join-leaving",
        "a primary running stop_prim (stop, swap, step down) is not joined",
        view(WAIT, Phase.PEER),
        PeerSeen(peer(ALONE, Phase.STOPPING, SOLE, leaving=True)),
        WAIT,
        Phase.PEER,
        (),
        "leaving the primary role",
    ),
    Row(
        "never-synced",
        "§4.2/§5.3 first start of both: WAIT (rfs_notuptodate_server)",
        view(WAIT, Phase.PEER),
        PeerSeen(peer(WAIT, Phase.PEER, STALE)),
        WAIT,
        Phase.BLOCKED,
        (),
        "run `hafs prim`",
    ),
    Row(
        "stale-alone",
        "§5.5 stale node started alone waits (rfs.uptodate down)",
        view(WAIT, Phase.PEER),
        PeerLost(),
        WAIT,
        Phase.BLOCKED,
        (),
        "not up to date",
    ),
    Row(
        "mirror-alone",
        "power-outage page: the first node back waits for its peer",
        view(WAIT, Phase.PEER, MIRROR, prim_term=4),
        PeerLost(),
        WAIT,
        Phase.BLOCKED,
        (),
        "may have gone on alone",
    ),
    Row(
        "sole-alone",
        "issue 3: peer absent, copy up to date -> ALONE",
        view(WAIT, Phase.PEER, SOLE, prim_term=4),
        PeerLost(),
        ALONE,
        Phase.STARTING,
        enter(WAIT, ALONE, 5),
        "copy is up to date",
    ),
    Row(
        "sole-alone-witness",
        "§13.18 with a witness: ask it first",
        view(WAIT, Phase.PEER, SOLE, pol=policy(**W)),
        PeerLost(),
        WAIT,
        Phase.PEER,
        (AskWitness(),),
        "asking the witness",
    ),
    Row(
        "witness-yes",
        "§13.18 reaches the witness -> ALONE",
        view(WAIT, Phase.PEER, SOLE, pol=policy(**W), witness=Witness.START),
        WitnessResult(True),
        ALONE,
        Phase.STARTING,
        enter(WAIT, ALONE, 5),
        "witness reachable",
    ),
    Row(
        "witness-no",
        "§13.18 cannot reach the witness -> WAIT (splitbrain_failure)",
        view(WAIT, Phase.PEER, SOLE, pol=policy(**W), witness=Witness.START),
        WitnessResult(False),
        WAIT,
        Phase.BLOCKED,
        (),
        "splitbrain_failure",
    ),
    Row(
        "elect-sole",
        "up-to-date-ness decides: the copy that ran alone wins",
        view(WAIT, Phase.PEER, SOLE, prim_term=3),
        PeerSeen(peer(WAIT, Phase.PEER, MIRROR, prim_term=4)),
        ALONE,
        Phase.STARTING,
        enter(WAIT, ALONE, 5),
        "elected",
    ),
    Row(
        "elect-lose-sole",
        "the peer's copy ran alone since: this one is behind",
        view(WAIT, Phase.PEER, MIRROR, prim_term=4),
        PeerSeen(peer(WAIT, Phase.PEER, SOLE)),
        WAIT,
        Phase.PEER,
        (Persist(Durable(STALE, 4, 4)),),
        "waiting to join",
        copy=STALE,
    ),
    Row(
        "defaultprim-me",
        "§5.8 defaultprim=<node>",
        view(WAIT, Phase.PEER, MIRROR, pol=policy(defaultprim=N1)),
        PeerSeen(peer(WAIT, Phase.PEER, MIRROR, prim_term=4)),
        ALONE,
        Phase.STARTING,
        enter(WAIT, ALONE, 5),
        "defaultprim=node1",
    ),
    Row(
        "defaultprim-peer",
        "§5.8 defaultprim=<node>",
        view(WAIT, Phase.PEER, MIRROR, prim_term=4, pol=policy(defaultprim=N2)),
        PeerSeen(peer(WAIT, Phase.PEER, MIRROR)),
        WAIT,
        Phase.PEER,
        (),
        "defaultprim=node2",
    ),
    Row(
        "lastprim",
        "§5.8 lastprim: the node that was PRIM before",
        view(WAIT, Phase.PEER, MIRROR, prim_term=2, pol=policy(defaultprim="lastprim")),
        PeerSeen(peer(STOP, copy=MIRROR, prim_term=4)),
        WAIT,
        Phase.BLOCKED,
        (),
        "is stopped: start it",
    ),
    Row(
        "lastprim-me",
        "§5.8 lastprim",
        view(WAIT, Phase.PEER, MIRROR, prim_term=4, pol=policy(defaultprim="lastprim")),
        PeerSeen(peer(WAIT, copy=MIRROR, prim_term=2)),
        ALONE,
        Phase.STARTING,
        enter(WAIT, ALONE, 5),
        "primary last",
    ),
    Row(
        "wait-for-second",
        "a SECOND of an earlier primary takes over first",
        view(WAIT, Phase.PEER, MIRROR),
        PeerSeen(peer(SECOND, copy=MIRROR)),
        WAIT,
        Phase.PEER,
        (),
        "SECOND of an earlier primary",
    ),
    # ---- failover [§4.2, §4.2.9, §5.7, §13.18]
    Row(
        "remote-stop",
        "§4.2 PRIM stopped: 'Action alone called by heart: remote stop'",
        second_synced,
        PeerSeen(peer(STOP, copy=MIRROR, prim_term=4)),
        ALONE,
        Phase.STARTING,
        enter(SECOND, ALONE, 5),
        "remote stop",
    ),
    Row(
        "remote-stop-after-alone",
        "I7: the PRIM ran ALONE, crashed, came back STOP; the heartbeat saying ALONE was lost",
        second_synced,
        PeerSeen(peer(STOP, copy=SOLE, prim_term=4)),
        WAIT,
        Phase.PEER,
        (
            Persist(Durable(STALE, 4, 0)),
            StopReplica(),
            script("stop_second", SECOND, WAIT, "stopwait"),
        ),
        "with changes this copy lacks",
        copy=STALE,
    ),
    Row(
        "remote-unknown",
        "§4.2.9 every heartbeat lost: 'Remote state UNKNOWN' -> ALONE",
        second_synced,
        PeerLost(),
        ALONE,
        Phase.STARTING,
        enter(SECOND, ALONE, 5),
        "Remote state UNKNOWN",
    ),
    Row(
        "failover-witness",
        "§13.18 witness pinged only when every heartbeat is lost",
        replace(second_synced, policy=policy(**W)),
        PeerLost(),
        SECOND,
        synced,
        (AskWitness(),),
        "asking the witness",
    ),
    Row(
        "failover-witness-no",
        "§13.18 the isolated node goes WAIT (splitbrain_failure)",
        replace(second_synced, policy=policy(**W), witness=Witness.FAILOVER, peer=None),
        WitnessResult(False),
        WAIT,
        Phase.BLOCKED,
        (StopReplica(), script("stop_second", SECOND, WAIT, "stopwait")),
        "splitbrain_failure",
    ),
    Row(
        "failover-witness-yes",
        "§13.18 reaches the witness -> ALONE",
        replace(second_synced, policy=policy(**W), witness=Witness.FAILOVER, peer=None),
        WitnessResult(True),
        ALONE,
        Phase.STARTING,
        enter(SECOND, ALONE, 5),
        "failover",
    ),
    Row(
        "announced-no-witness",
        "a heartbeat saying STOP is no split: no witness needed",
        replace(second_synced, policy=policy(**W)),
        PeerSeen(peer(STOP, copy=MIRROR)),
        ALONE,
        Phase.STARTING,
        enter(SECOND, ALONE, 5),
        "remote stop",
    ),
    Row(
        "resync-no-failover",
        "I7: a resynchronising SECOND (not up to date) cannot take over",
        second_resync,
        PeerLost(),
        WAIT,
        Phase.BLOCKED,
        (StopReplica(), script("stop_second", SECOND, WAIT, "stopwait")),
        "not up to date",
    ),
    Row(
        "failover-off",
        "§5.7 failover=off: the SECOND waits for `prim`",
        replace(second_synced, policy=policy(failover=False)),
        PeerLost(),
        WAIT,
        Phase.BLOCKED,
        (StopReplica(), script("stop_second", SECOND, WAIT, "stopwait")),
        "failover is off",
    ),
    Row(
        "second-sees-alone",
        "§5.4 the primary went on ALONE: resync, not up to date",
        second_synced,
        PeerSeen(peer(ALONE, copy=SOLE, prim_term=4)),
        SECOND,
        Phase.RESYNCING,
        (Persist(Durable(STALE, 4, 0)), StartResync(False)),
        "behind",
        copy=STALE,
    ),
    Row(
        "resync-done",
        "§4.2.7 SECOND magenta -> green when the resync ends",
        second_resync,
        ResyncFinished(True),
        SECOND,
        synced,
        (Persist(Durable(MIRROR, 4, 0)),),
        "synchronised",
        copy=MIRROR,
    ),
    Row(
        "resync-failed",
        "a failed resync is retried as a stopstart (counted by maxloop)",
        second_resync,
        ResyncFinished(False, now=1.0, detail="EIO"),
        WAIT,
        Phase.PEER,
        (
            StopReplica(),
            script("stop_second", SECOND, STOP, "stop"),
            script("poststop", SECOND, STOP, "stop"),
            script("prestart", STOP, WAIT, "start"),
        ),
        "resync failed: EIO",
    ),
    # ---- PRIM <-> ALONE [§5.2 automaton, I5]
    Row(
        "prim-peer-stops",
        "§5.2 ALONE <-> PRIM when the peer's SECOND stops",
        prim_synced,
        PeerSeen(peer(STOP, copy=MIRROR)),
        ALONE,
        synced,
        (Persist(Durable(SOLE, 4, 4)), SetMountMode(MountMode.ALONE)),
        "keeps running",
        copy=SOLE,
    ),
    Row(
        "prim-peer-lost",
        "issue 3: PRIM losing SECOND -> ALONE, keeps running",
        prim_synced,
        PeerLost(),
        ALONE,
        synced,
        (Persist(Durable(SOLE, 4, 4)), SetMountMode(MountMode.ALONE)),
        "Remote state UNKNOWN",
    ),
    Row(
        "prim-replication-lost",
        "I5 the SECOND does not acknowledge: ALONE, journaling",
        prim_synced,
        ReplicationLost("ack timeout"),
        ALONE,
        synced,
        (Persist(Durable(SOLE, 4, 4)), SetMountMode(MountMode.ALONE)),
        "ack timeout",
    ),
    Row(
        "prim-lost-witness",
        "I8 with a witness, a PRIM cut off asks before going on alone",
        replace(prim_synced, policy=policy(**W)),
        PeerLost(),
        PRIM,
        synced,
        (AskWitness(),),
        "asking the witness",
    ),
    Row(
        "prim-lost-again",
        "I8 a second loss while the witness question is pending must wait for the answer",
        replace(prim_synced, policy=policy(**W), witness=Witness.KEEP, peer=None),
        PeerLost(),
        PRIM,
        Phase.READY,
        (),
        "waiting for the witness",
    ),
    Row(
        "prim-witness-no",
        "I8 cut off from peer and witness: fence the mount, stop the application",
        replace(prim_synced, policy=policy(**W), witness=Witness.KEEP, peer=None),
        WitnessResult(False),
        PRIM,
        Phase.STOPPING,
        (SetMountMode(MountMode.FENCED), script("stop_prim", PRIM, WAIT, "stopwait")),
        "splitbrain_failure",
    ),
    Row(
        "prim-held",
        "I1/I8 with a witness, a mount that lost its SECOND holds the calls: the PRIM waits",
        replace(prim_synced, policy=policy(**W)),
        ReplicationLost("ack timeout"),
        PRIM,
        synced,
        (),
        "holding writes",
    ),
    Row(
        "prim-held-peer-alive",
        "I5 held, then a heartbeat: the SECOND is alive, ALONE releases the calls",
        replace(prim_synced, policy=policy(**W), held=True),
        PeerSeen(peer(SECOND, copy=MIRROR)),
        ALONE,
        synced,
        (Persist(Durable(SOLE, 4, 4)), SetMountMode(MountMode.ALONE)),
        "alive",
    ),
    Row(
        "prim-held-witness-yes",
        "I5 held, peer lost, witness reachable: ALONE releases the calls",
        replace(prim_synced, policy=policy(**W), held=True, witness=Witness.KEEP, peer=None),
        WitnessResult(True),
        ALONE,
        synced,
        (Persist(Durable(SOLE, 4, 4)), SetMountMode(MountMode.ALONE)),
        "witness reachable",
    ),
    Row(
        "prim-held-witness-no",
        "I8 held, peer and witness unreachable: the held calls fail, the application stops",
        replace(prim_synced, policy=policy(**W), held=True, witness=Witness.KEEP, peer=None),
        WitnessResult(False),
        PRIM,
        Phase.STOPPING,
        (SetMountMode(MountMode.FENCED), script("stop_prim", PRIM, WAIT, "stopwait")),
        "splitbrain_failure",
    ),
    Row(
        "alone-lease-lost",
        "I8 ALONE without the arbitrating witness's lease: fenced, then it steps down",
        view(ALONE, copy=SOLE, prim_term=4, pol=policy(**W)),
        LeaseLost("no answer"),
        ALONE,
        Phase.STOPPING,
        (SetMountMode(MountMode.FENCED), script("stop_prim", ALONE, WAIT, "stopwait")),
        "witness lease lost",
    ),
    Row(
        "prim-lease-lost",
        "a PRIM's writes wait for its SECOND: a lost lease changes nothing",
        replace(prim_synced, policy=policy(**W)),
        LeaseLost("no answer"),
        PRIM,
        synced,
        (),
        "nothing to do",
    ),
    Row(
        "prim-held-stop",
        "I1 an operator's stop while held fences first (stop_prim would hang on the calls)",
        replace(prim_synced, policy=policy(**W), held=True),
        Stop(),
        PRIM,
        Phase.STOPPING,
        (SetMountMode(MountMode.FENCED), script("stop_prim", PRIM, STOP, "stop")),
        "",
    ),
    Row(
        "step-down-done",
        "I8 ... then release and WAIT",
        view(PRIM, Phase.STOPPING, MIRROR, prim_term=4, goal=Goal.STEP_DOWN, why="lost"),
        ScriptResult("stop_prim", True),
        WAIT,
        Phase.BLOCKED,
        (ReleaseVip(), Unmount()),
        "lost",
    ),
    Row(
        "alone-sees-second",
        "§5.2 ALONE -> PRIM when the peer's SECOND starts",
        view(ALONE, copy=SOLE, prim_term=4),
        PeerSeen(peer(SECOND, Phase.RESYNCING, STALE)),
        PRIM,
        synced,
        (SetMountMode(MountMode.MIRROR),),
        "mirroring",
    ),
    Row(
        "alone-stale-second",
        "a SECOND claiming sync with an ALONE primary is behind",
        view(ALONE, copy=SOLE, prim_term=4),
        PeerSeen(peer(SECOND, copy=MIRROR)),
        ALONE,
        synced,
        (),
        "to resynchronise",
    ),
    Row(
        "prim-second-synced",
        "PRIM's copy is MIRROR once the SECOND is synchronised",
        view(PRIM, copy=SOLE, prim_term=4, forced=True, peer=peer(SECOND, Phase.RESYNCING, STALE)),
        PeerSeen(peer(SECOND, copy=MIRROR)),
        PRIM,
        synced,
        (Persist(Durable(MIRROR, 4, 4)),),
        "synchronised SECOND",
        copy=MIRROR,
    ),
    # ---- split brain [§5: the node that was PRIM before the isolation stays]
    Row(
        "split-stay",
        "§5 split brain: the older primary stays",
        view(ALONE, copy=SOLE, term=5, prim_term=4),
        PeerSeen(peer(ALONE, copy=SOLE, prim_term=5, term=5)),
        ALONE,
        synced,
        (),
        "staying primary",
    ),
    Row(
        "split-exit",
        "§5 'Split brain recovery: exiting alone'",
        view(ALONE, copy=SOLE, term=5, prim_term=5),
        PeerSeen(peer(ALONE, copy=SOLE, prim_term=4, term=5)),
        ALONE,
        Phase.STOPPING,
        (Persist(Durable(STALE, 5, 5)), script("stop_prim", ALONE, WAIT, "stopwait")),
        "Split brain recovery",
        copy=STALE,
    ),
    Row(
        "split-prim-stays",
        "a PRIM meeting another primary is not mirroring any more",
        view(PRIM, copy=SOLE, term=5, prim_term=4),
        PeerSeen(peer(ALONE, copy=SOLE, prim_term=5, term=5)),
        ALONE,
        synced,
        (SetMountMode(MountMode.ALONE),),
        "staying primary",
    ),
    # ---- commands [§9.3, issue 3]
    Row(
        "stop-prim",
        "issue 3: stop on PRIM runs stop_prim, the peer takes over",
        prim_synced,
        Stop(),
        PRIM,
        Phase.STOPPING,
        (script("stop_prim", PRIM, STOP, "stop"),),
        "stop requested",
    ),
    Row(
        "stop-prim-done",
        "... then releases the VIP and unmounts",
        replace(prim_synced, phase=Phase.STOPPING, goal=Goal.STOP),
        ScriptResult("stop_prim", True),
        STOP,
        synced,
        (ReleaseVip(), Unmount(), script("poststop", PRIM, STOP, "stop")),
        "",
    ),
    Row(
        "stop-second",
        "§14 stop_second on leaving SECOND",
        second_synced,
        Stop(),
        STOP,
        synced,
        (
            StopReplica(),
            script("stop_second", SECOND, STOP, "stop"),
            script("poststop", SECOND, STOP, "stop"),
        ),
        "stop requested",
    ),
    Row("stop-stopped", "stop is idempotent", view(), Stop(), STOP, synced, (), "already stopped"),
    Row(
        "swap",
        "§9.3 swap: PRIM hands over",
        prim_synced,
        Swap(),
        PRIM,
        Phase.STOPPING,
        (script("stop_prim", PRIM, SECOND, "stop"),),
        "swap",
    ),
    Row(
        "swap-release",
        "... becomes SECOND with no resync",
        replace(prim_synced, phase=Phase.STOPPING, goal=Goal.HANDOVER),
        ScriptResult("stop_prim", True),
        SECOND,
        Phase.HANDOVER,
        (ReleaseVip(), Unmount(), StartReplica(), script("start_second", PRIM, SECOND, "start")),
        "swap",
    ),
    Row(
        "swap-take",
        "... and the synchronised SECOND becomes PRIM directly",
        second_synced,
        PeerSeen(peer(SECOND, Phase.HANDOVER, MIRROR, prim_term=4)),
        PRIM,
        Phase.STARTING,
        enter(SECOND, PRIM, 5, MIRROR),
        "handed over",
    ),
    Row(
        "swap-done",
        "... then the old PRIM is a synchronised SECOND",
        view(SECOND, Phase.HANDOVER, MIRROR, prim_term=4),
        PeerSeen(peer(PRIM, prim_term=5)),
        SECOND,
        synced,
        (),
        "swap done",
    ),
    Row(
        "swap-alone",
        "swap needs a SECOND",
        view(ALONE, copy=SOLE),
        Swap(),
        ALONE,
        synced,
        (),
        "needs a running PRIM",
        refused=True,
    ),
    Row(
        "swap-resyncing",
        "swap needs a synchronised SECOND",
        view(PRIM, copy=SOLE, peer=peer(SECOND, Phase.RESYNCING, STALE)),
        Swap(),
        PRIM,
        synced,
        (),
        "not a synchronised SECOND",
        refused=True,
    ),
    Row(
        "swap-on-second",
        "swap is carried out by the PRIM",
        second_synced,
        Swap(),
        SECOND,
        synced,
        (),
        "PRIM node",
        refused=True,
    ),
    Row(
        "prim-stale-refused",
        "issue 3: prim needs a confirmation when not up to date",
        view(),
        Prim(),
        STOP,
        synced,
        (),
        "not up to date",
        refused=True,
    ),
    Row(
        "prim-forced",
        "§5.3 bootstrap: prim on the node with the good data",
        view(),
        Prim(force=True),
        ALONE,
        Phase.STARTING,
        (script("prestart", STOP, ALONE, "start"), *enter(STOP, ALONE, 5)),
        "forced",
    ),
    Row(
        "prim-peer-primary",
        "§9.3 prim fails if the peer is already primary",
        view(peer=peer(ALONE, copy=SOLE)),
        Prim(force=True),
        STOP,
        synced,
        (),
        "already ALONE",
        refused=True,
    ),
    Row(
        "prim-peer-would-fail-over",
        "prim would race a synchronised SECOND's failover",
        view(copy=MIRROR, peer=peer(SECOND, copy=MIRROR)),
        Prim(),
        STOP,
        synced,
        (),
        "would become primary",
        refused=True,
    ),
    Row(
        "prim-failover-off",
        "§5.7 failover=off: `prim` promotes the waiting SECOND",
        view(WAIT, Phase.BLOCKED, MIRROR, pol=policy(failover=False)),
        Prim(),
        ALONE,
        Phase.STARTING,
        enter(WAIT, ALONE, 5),
        "prim requested",
    ),
    Row(
        "second",
        "§5.3 then `second` on the other node",
        view(peer=peer(ALONE, copy=SOLE)),
        Second(),
        SECOND,
        Phase.RESYNCING,
        (script("prestart", STOP, SECOND, "start"), *join(STOP, None)),
        "second",
    ),
    Row(
        "second-fullsync",
        "§9.3 second fullsync",
        view(WAIT, peer=peer(PRIM)),
        Second(fullsync=True),
        SECOND,
        Phase.RESYNCING,
        join(WAIT, None, full=True),
        "second",
    ),
    Row(
        "second-no-primary",
        "§9.3 second fails if the peer is not primary",
        view(peer=peer(WAIT)),
        Second(),
        STOP,
        synced,
        (),
        "not PRIM or ALONE",
        refused=True,
    ),
    Row(
        "restart",
        "§9.3 restart: stop_prim + start_prim, no failover",
        prim_synced,
        Restart(),
        PRIM,
        Phase.STOPPING,
        (script("stop_prim", PRIM, PRIM, "stopstart"),),
        "restart",
    ),
    Row(
        "restart-start",
        "... then start_prim again, keeping the VIP",
        replace(prim_synced, phase=Phase.STOPPING, goal=Goal.RESTART),
        ScriptResult("stop_prim", True),
        PRIM,
        Phase.STARTING,
        (script("start_prim", PRIM, PRIM, "start"),),
        "starting the application again",
    ),
    Row(
        "started",
        "ALONE orange -> green once start_prim ran",
        view(ALONE, Phase.STARTING, SOLE),
        ScriptResult("start_prim", True),
        ALONE,
        synced,
        (),
        "start_prim done",
    ),
    Row(
        "start-prim-failed",
        "template start_prim: on failure `safekit stop`",
        view(ALONE, Phase.STARTING, SOLE),
        ScriptResult("start_prim", False),
        ALONE,
        Phase.STOPPING,
        (script("stop_prim", ALONE, STOP, "stop"),),
        "start_prim failed",
    ),
    Row(
        "stopstart-prim",
        "§9.3 stopstart on PRIM causes a failover",
        replace(prim_synced, phase=Phase.STOPPING, goal=Goal.STOP, stopstart=True),
        ScriptResult("stop_prim", True),
        WAIT,
        Phase.PEER,
        (
            ReleaseVip(),
            Unmount(),
            script("poststop", PRIM, STOP, "stop"),
            script("prestart", STOP, WAIT, "start"),
        ),
        "",
    ),
    Row(
        "stopstart",
        "§9.3 stopstart: stop first (the SECOND takes over), then start",
        prim_synced,
        StopStart(),
        PRIM,
        Phase.STOPPING,
        (script("stop_prim", PRIM, STOP, "stop"),),
        "stopstart requested",
    ),
    Row(
        "checker-restart",
        "§13.10 errd action=restart",
        prim_synced,
        CheckerFailed("mysqld", "restart", now=10.0),
        PRIM,
        Phase.STOPPING,
        (script("stop_prim", PRIM, PRIM, "stopstart"),),
        "checker mysqld",
    ),
    Row(
        "maxloop",
        "§13.3.3 the 4th detection within loop_interval stops the module",
        replace(prim_synced, loops=(1.0, 2.0, 3.0)),
        CheckerFailed("mysqld", "restart", 4.0),
        PRIM,
        Phase.STOPPING,
        (script("stop_prim", PRIM, STOP, "stop"),),
        "Action stop called by maxloop",
    ),
    Row(
        "maxloop-window",
        "§13.3.3 older actions fall out of the window",
        replace(prim_synced, loops=(1.0, 2.0, 3.0), policy=policy(loop_interval=10.0)),
        CheckerFailed("mysqld", "restart", 12.5),
        PRIM,
        Phase.STOPPING,
        (script("stop_prim", PRIM, PRIM, "stopstart"),),
        "checker mysqld",
    ),
    Row(
        "maxloop-off",
        "§13.3 loop_interval=0 disables the limit",
        replace(prim_synced, loops=(1.0, 2.0, 3.0), policy=policy(loop_interval=0)),
        CheckerFailed("mysqld", "stopstart", 4.0),
        PRIM,
        Phase.STOPPING,
        (script("stop_prim", PRIM, STOP, "stop"),),
        "checker mysqld",
    ),
    Row(
        "defaultprim-swap",
        "§5.8 'Transition SWAP from defaultprim' after reintegration",
        replace(
            prim_synced, policy=policy(defaultprim=N2), peer=peer(SECOND, Phase.RESYNCING, STALE)
        ),
        PeerSeen(peer(SECOND, copy=MIRROR)),
        PRIM,
        Phase.STOPPING,
        (script("stop_prim", PRIM, SECOND, "stop"),),
        "Transition SWAP from defaultprim",
    ),
    Row(
        "stop-learns-stale",
        "seed: 'STOP (red) not uptodate' once the peer runs without it",
        view(copy=MIRROR),
        PeerSeen(peer(ALONE, copy=SOLE)),
        STOP,
        synced,
        (Persist(Durable(STALE, 4, 0)),),
        "",
        copy=STALE,
    ),
    Row(
        "stop-split-loser",
        "§5 two copies that ran alone (split brain): the one elect drops is STALE",
        view(copy=SOLE, prim_term=5),
        PeerSeen(peer(STOP, copy=SOLE, prim_term=4)),
        STOP,
        Phase.READY,
        (Persist(Durable(STALE, 4, 5)),),
        "",
        copy=STALE,
    ),
    Row(
        "stop-split-winner",
        "§5 ... and the one it keeps stays up to date",
        view(copy=SOLE, prim_term=4),
        PeerSeen(peer(STOP, copy=SOLE, prim_term=5)),
        STOP,
        Phase.READY,
        (),
        "",
        copy=SOLE,
    ),
    Row(
        "action-failed",
        "a failed mount stops the module",
        view(ALONE, Phase.STARTING, SOLE),
        ActionFailed("Mount", "EBUSY"),
        ALONE,
        Phase.STOPPING,
        (script("stop_prim", ALONE, STOP, "stop"),),
        "Mount failed: EBUSY",
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_transition_table(row: Row) -> None:
    t = step(row.before, row.event)
    assert (t.new_state.state, t.new_state.phase) == (row.state, row.phase), row.doc
    assert effects(t) == row.effects, row.doc
    assert row.reason in t.reason, (t.reason, row.doc)
    assert t.refused == row.refused
    if row.refused:
        assert t.new_state == row.before
    if row.copy is not None:
        assert t.new_state.copy is row.copy
    if t.new_state.state is not row.before.state:  # every state change is logged with why
        assert any(isinstance(a, Log) and t.reason in a.message for a in t.actions)


def test_table_covers_every_event_and_state() -> None:
    kinds = {type(r.event) for r in ROWS}
    missing = set(Event.__args__) - kinds  # type: ignore[attr-defined]
    assert missing <= {sm.SetFailover}, missing
    assert {r.state for r in ROWS} == set(State)


def test_set_failover_changes_policy() -> None:
    t = step(second_synced, sm.SetFailover(False))
    assert t.new_state.policy.failover is False
    assert step(t.new_state, PeerLost()).new_state.state is WAIT


def test_admin_command_resets_maxloop() -> None:
    v = replace(prim_synced, loops=(1.0, 2.0, 3.0))
    assert step(v, Restart()).new_state.loops == ()
    assert step(v, CheckerFailed("c", "restart", 3.5)).new_state.goal is Goal.STOP


def test_no_witness_is_logged_at_start() -> None:
    warn = [a for a in step(view(), Start()).actions if isinstance(a, Log)]
    assert any("no splitbrain witness" in a.message for a in warn)
    quiet = step(view(pol=policy(witness=True)), Start()).actions
    assert not any(isinstance(a, Log) and "witness" in a.message for a in quiet)


def test_second_full_walkthrough_of_the_seed() -> None:
    """Seed steps 6-10 on one pair: prim on node1, start node2, stop node1 -> failover."""
    n1 = NodeView(Policy(N1, N2))
    n2 = NodeView(Policy(N2, N1))
    n1 = step(n1, Prim(force=True)).new_state  # step 6-7: WAIT (red) not uptodate -> prim
    n1 = step(n1, ScriptResult("start_prim", True)).new_state
    assert (n1.state, n1.colour) == (ALONE, Colour.GREEN)
    n2 = step(n2, Start()).new_state  # step 8
    n2 = step(n2, PeerSeen(n1.announce())).new_state
    assert (n2.state, n2.colour) == (SECOND, Colour.MAGENTA)
    n1 = step(n1, PeerSeen(n2.announce())).new_state
    assert n1.state is PRIM
    n2 = step(n2, ResyncFinished(True)).new_state
    n1 = step(n1, PeerSeen(n2.announce())).new_state
    assert (n1.colour, n2.colour) == (Colour.GREEN, Colour.GREEN)  # step 9: green/green
    n1 = step(n1, Stop()).new_state  # step 10: stop the PRIM
    n1 = step(n1, ScriptResult("stop_prim", True)).new_state
    t = step(n2, PeerSeen(n1.announce()))
    assert t.new_state.state is ALONE and "remote stop" in t.reason


# --------------------------------------------------------------------------- 2. colours


@pytest.mark.parametrize(
    ("state", "phase", "witness", "colour", "qualifier"),
    [
        (STOP, Phase.READY, None, Colour.RED, Qualifier.NOT_READY),
        (WAIT, Phase.PEER, None, Colour.ORANGE, Qualifier.TRANSIENT),
        (WAIT, Phase.BLOCKED, None, Colour.RED, Qualifier.NOT_READY),
        (WAIT, Phase.PEER, Witness.START, Colour.ORANGE, Qualifier.TRANSIENT),
        (ALONE, Phase.STARTING, None, Colour.ORANGE, Qualifier.TRANSIENT),
        (ALONE, Phase.READY, None, Colour.GREEN, Qualifier.READY),
        (PRIM, Phase.STOPPING, None, Colour.ORANGE, Qualifier.TRANSIENT),
        (PRIM, Phase.READY, None, Colour.GREEN, Qualifier.READY),
        (PRIM, Phase.READY, Witness.KEEP, Colour.ORANGE, Qualifier.TRANSIENT),
        (SECOND, Phase.RESYNCING, None, Colour.MAGENTA, Qualifier.TRANSIENT),
        (SECOND, Phase.READY, None, Colour.GREEN, Qualifier.READY),
        (SECOND, Phase.HANDOVER, None, Colour.ORANGE, Qualifier.TRANSIENT),
    ],
)
def test_colours(
    state: State, phase: Phase, witness: Witness | None, colour: Colour, qualifier: Qualifier
) -> None:
    v = view(state, phase, witness=witness)
    assert (v.colour, v.qualifier) == (colour, qualifier)
    assert v.announce().colour is colour


def test_state_codes_are_safekits() -> None:
    assert [s.code for s in (STOP, WAIT, ALONE, PRIM, SECOND)] == [0, 1, 2, 3, 4]


infos = st.builds(
    PeerInfo,
    name=st.sampled_from([N1, N2]),
    state=st.sampled_from(list(State)),
    copy=st.sampled_from(list(Copy)),
    prim_term=st.integers(0, 3),
)


@given(a=infos, b=infos, defaultprim=st.sampled_from(["alone", "lastprim", N1, N2]))
def test_elect_is_symmetric(a: PeerInfo, b: PeerInfo, defaultprim: str) -> None:
    b = replace(b, name=N2 if a.name == N1 else N1)
    winner, _ = elect(a, b, defaultprim)
    assert winner == elect(b, a, defaultprim)[0]
    if winner is None:
        assert not a.copy.uptodate and not b.copy.uptodate
    else:
        assert {a.name: a, b.name: b}[winner].copy.uptodate


# --------------------------------------------------------------------------- 3. two nodes


@dataclass
class SimNode:
    """One node of the simulation: its view plus what the daemon would have done."""

    view: NodeView
    persisted: Durable
    data: int | None  # version of its copy of the replicated directories; None: mid-resync
    running: bool = True
    vip: bool = False
    mounted: MountMode | None = None
    replica: bool = False
    resyncing: bool = False
    scripts: list[str] = field(default_factory=list)  # awaited scripts, in order
    asked_witness: bool = False
    witness_ok: bool = True
    heard: bool = False  # has processed a heartbeat from the peer since the link/peer came up
    last_heard: int = -1  # send time of the last heartbeat processed from the peer


def claims_primary(v: NodeView) -> bool:
    """Primary and not stopping its application to hand over, step down or stop."""
    leaving = v.phase is Phase.STOPPING and v.goal is not Goal.RESTART
    return v.state.primary and not leaving


def synced_second(v: NodeView) -> bool:
    """The simulation's own definition (not the state machine's, which mutants change)."""
    ready = v.phase in (Phase.READY, Phase.HANDOVER)
    return v.state is SECOND and ready and v.copy is MIRROR


ENTERING = (TakeVip, Mount)
COMMANDS = [
    Start(),
    Stop(),
    Prim(),
    Prim(force=True),
    Second(),
    Second(fullsync=True),
    Swap(),
    Restart(),
    StopStart(),
]
NAMES = st.sampled_from([N1, N2])


class TwoNodes(RuleBasedStateMachine):
    """Two state machines joined by a heartbeat channel. Heartbeats are UDP: the channel
    keeps only each node's latest unread heartbeat, which a rule delivers later, so every
    interleaving of decisions and stale views is explored."""

    step_fn: Callable[[NodeView, Event], Transition] = staticmethod(step)

    def __init__(self) -> None:
        super().__init__()
        self.clock = 0
        self.link_up = True
        # heartbeats in flight from each node, oldest first (sequence numbers keep order)
        self.inflight: dict[str, deque[tuple[PeerInfo, int]]] = {N1: deque(), N2: deque()}
        self.nodes: dict[str, SimNode] = {}
        self.parent: dict[int, int | None] = {}
        self.written: dict[int, int] = {}
        self.discarded: set[int] = set()  # abandoned by a forced prim (the operator's choice)

    # ---------------------------------------------------------------- set up

    @initialize(
        defaultprim=st.sampled_from(["alone", "lastprim", N1, N2]),
        witness=st.booleans(),
        failover=st.sampled_from([True, True, False]),
        history=st.sampled_from(["fresh", "node1-alone", "mirrored", "established"]),
        started=st.booleans(),
        reachable=st.tuples(st.booleans(), st.booleans()),
    )
    def setup(
        self,
        defaultprim: str,
        witness: bool,
        failover: bool,
        history: str,
        started: bool,
        reachable: tuple[bool, bool],
    ) -> None:
        def pol(me: str, other: str) -> Policy:
            return Policy(me, other, defaultprim, failover, witness, 2, 40.0)

        base = self.new_version(None, -10)
        if history == "fresh":  # never synchronised: two unrelated trees
            d1, d2 = self.new_version(None, -10), base
            r1 = r2 = Durable()
        elif history == "node1-alone":  # node1 went on ALONE after node2 stopped
            d1, d2 = self.new_version(base, -10), base
            r1, r2 = Durable(SOLE, 2, 2), Durable(STALE, 1, 0)
        else:  # power loss of both while mirroring
            d1 = d2 = base
            r1, r2 = Durable(MIRROR, 2, 2), Durable(MIRROR, 2, 1)
        self.nodes = {
            N1: SimNode(NodeView(pol(N1, N2), r1), r1, d1),
            N2: SimNode(NodeView(pol(N2, N1), r2), r2, d2),
        }
        self.nodes[N1].witness_ok, self.nodes[N2].witness_ok = reachable
        for n in (N1, N2):
            self.publish(n)
        if history == "established":  # seed steps 6-9: prim on node1, start node2
            self.apply(N1, Prim(force=True))
            self.quiesce()
            self.apply(N2, Start())
            self.quiesce()  # checks PRIM + synchronised SECOND (node2 PRIM if defaultprim)
        elif started:
            for n in (N1, N2):
                self.apply(n, Start())

    # ---------------------------------------------------------------- plumbing

    def new_version(self, parent: int | None, when: int) -> int:
        vid = len(self.parent)
        self.parent[vid] = parent
        self.written[vid] = when
        return vid

    def other(self, n: str) -> str:
        return N2 if n == N1 else N1

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def publish(self, n: str) -> None:
        if self.link_up and self.nodes[n].running:
            self.inflight[n].append((self.nodes[n].view.announce(), self.tick()))
            while len(self.inflight[n]) > 4:
                self.inflight[n].popleft()  # lost

    def views_current(self) -> bool:
        a, b = self.nodes[N1], self.nodes[N2]
        return (
            self.link_up
            and a.running
            and b.running
            and a.view.peer == b.view.announce()
            and b.view.peer == a.view.announce()
        )

    def apply(self, n: str, event: Event) -> Transition:
        node = self.nodes[n]
        assert node.running
        old = node.view
        t = self.step_fn(old, event)
        assert self.step_fn(old, event) == t, "step must be deterministic"
        self.check_transition(n, old, event, t)
        self.execute(n, event, t)
        node.view = t.new_state
        self.check_resources(n)
        if t.new_state.announce() != old.announce():
            self.publish(n)  # a change is sent at once; unchanged states at each `pulse`
        self.single_primary_while_connected()  # also between the rules' inner steps
        return t

    # ---------------------------------------------------------------- properties

    def check_transition(self, n: str, old: NodeView, event: Event, t: Transition) -> None:
        """Properties (2) and (3) of one transition. Messages are tagged with the property
        they check, so that the mutant tests can tell which one caught a broken rule."""
        new = t.new_state
        kinds = [type(a) for a in t.actions]
        if t.refused:
            assert new == old and set(kinds) <= {Log}, f"[actions] refusal changed things: {t}"
        entering = not old.state.primary and new.state.primary
        leaving = old.state.primary and not new.state.primary
        forced = isinstance(event, Prim) and event.force
        # (3) actions are consistent with the change of state
        vip = (
            kinds.count(TakeVip),
            kinds.count(Mount),
            kinds.count(ReleaseVip),
            kinds.count(Unmount),
        )
        assert vip == (int(entering), int(entering), int(leaving), int(leaving)), (
            f"[actions] {old.state}->{new.state} with VIP/mount actions {vip}: {t}"
        )
        if SetMountMode in kinds:
            assert old.state.primary and new.state.primary, f"[actions] {t}"
        entering_second = new.state is SECOND and old.state is not SECOND
        leaving_second = old.state is SECOND and new.state is not SECOND
        replica = (kinds.count(StartReplica), kinds.count(StopReplica))
        assert replica == (int(entering_second), int(leaving_second)), f"[actions] {t}"
        if AskWitness in kinds:
            assert new.policy.witness, f"[actions] witness asked, none configured: {t}"
        if entering:
            assert Persist in kinds, f"[actions] entering {new.state} without Persist: {t}"
            persist = kinds.index(Persist)
            assert persist < kinds.index(Mount) < kinds.index(TakeVip), f"[actions] {t}"
            record = t.actions[persist]
            assert isinstance(record, Persist) and record.durable.copy.uptodate, t
            assert record.durable.prim_term == record.durable.term > old.durable.term, t
        # (1') I8 with a witness: a node cut off from its peer goes ALONE only if it reached
        # the witness (or the operator says so, or the peer's daemon said goodbye, or the
        # peer's copy is STALE: no second primary then); a mount that lost its SECOND holds
        # its calls meanwhile (fencing), so ReplicationLost alone never makes it ALONE
        cut_off = not self.link_up or not self.up(self.other(n))
        became_alone = new.state is ALONE and old.state is not ALONE
        peer_may_promote = self.durable(self.other(n)).copy.uptodate
        if new.policy.witness and cut_off and became_alone and peer_may_promote:
            told = event in (WitnessResult(True), PeerLost(announced=True))
            allowed = told or isinstance(event, Prim)
            assert allowed, f"[I8] {n} went ALONE cut off, without the witness: {t}"
        if event == WitnessResult(False) and old.witness is not None:
            assert not claims_primary(new), f"[I8] {n} stays primary, witness unreachable: {t}"
        # (2) never primary from a copy that is not up to date, unless forced
        if entering and not forced:
            assert old.copy.uptodate, f"[I7] {n} became {new.state} from a {old.copy} copy: {t}"
            assert not any(
                isinstance(a, Persist) and not a.durable.copy.uptodate for a in t.actions
            ), f"[I7] {n} became {new.state} while learning its copy is stale: {t}"
            self.check_data_uptodate(n, t)

    def live(self, vid: int) -> bool:
        """A version some node still holds (or holds a successor of) in a copy that counts:
        not STALE, since a STALE copy is never promoted without force; not the losing side
        of a split brain; and not abandoned by a forced prim."""
        if vid in self.discarded:
            return False
        for n, node in self.nodes.items():
            copy = self.durable(n).copy
            if not copy.uptodate or self.split_loser(n) or node.data is None:
                continue
            if self.descends(node.data, vid):
                return True
        return False

    def durable(self, n: str) -> Durable:
        node = self.nodes[n]
        return node.view.durable if node.running else node.persisted

    def split_loser(self, n: str) -> bool:
        """The documented split-brain rule, restated here rather than taken from `elect`:
        of two copies that both ran alone, the one whose primary period started first is
        kept (SafeKit keeps the node that was primary before the isolation); equal terms:
        defaultprim, then the first name. The other's changes since the split are lost."""
        mine, theirs = self.durable(n), self.durable(self.other(n))
        if not (mine.copy is SOLE and theirs.copy is SOLE):
            return False
        if mine.prim_term != theirs.prim_term:
            return mine.prim_term > theirs.prim_term
        preferred = self.nodes[n].view.policy.defaultprim
        if preferred in (N1, N2):
            return preferred != n
        return n > self.other(n)

    def descends(self, vid: int | None, ancestor: int) -> bool:
        while vid is not None:
            if vid == ancestor:
                return True
            vid = self.parent[vid]
        return False

    def check_data_uptodate(self, n: str, t: Transition) -> None:
        """The data oracle for (2), independent of the state machine's own flag: the copy
        must be complete, and no live write that this node could have known of (written
        before the last heartbeat it read) may be missing. Writes made during a partition it
        could not know of are the split-brain risk, which the witness addresses, not I7."""
        node = self.nodes[n]
        assert node.data is not None, f"[I7] {n} became primary with a half-resynced copy"
        for vid, when in self.written.items():
            newer = vid != node.data and self.descends(vid, node.data)
            if newer and when <= node.last_heard and self.live(vid):
                raise AssertionError(f"[I7] {n} became primary without write {vid}: {t}")

    def check_resources(self, n: str) -> None:
        node, v = self.nodes[n], self.nodes[n].view
        expected = {ALONE: MountMode.ALONE, PRIM: MountMode.MIRROR}.get(v.state)
        if node.mounted is MountMode.FENCED and v.state.primary:
            # Fenced only on the way out of the primary role, never to serve again.
            assert v.phase is Phase.STOPPING and v.goal is not Goal.RESTART, "[actions] fenced"
            expected = MountMode.FENCED
        held = (node.vip, node.mounted, node.replica)
        assert held == (v.state.primary, expected, v.state is SECOND), (
            f"[actions] {n} in {v.state} holds vip/mount/replica {held}"
        )
        assert (v.state is SECOND and v.phase is Phase.RESYNCING) <= node.resyncing, "[actions]"
        assert (v.witness is not None) <= node.asked_witness, "[actions] witness not asked"
        awaited = {Phase.STARTING: "start_prim", Phase.STOPPING: "stop_prim"}.get(v.phase)
        if awaited and v.state.primary:
            assert awaited in node.scripts, f"[actions] {n} waits for {awaited}, not running"
        assert v.copy is node.persisted.copy, f"[actions] {n}: copy changed without Persist"

    @invariant()
    def single_primary_while_connected(self) -> None:
        """(1) I8: with the link up and current heartbeats, at most one primary."""
        if self.nodes and self.views_current():
            a, b = self.nodes[N1].view, self.nodes[N2].view
            both = claims_primary(a) and claims_primary(b)
            assert not both, f"[I8] both primary while connected: {a} / {b}"

    @invariant()
    def synced_second_holds_primarys_data(self) -> None:
        if not self.nodes or not self.views_current():
            return
        for n in (N1, N2):
            me, other = self.nodes[n], self.nodes[self.other(n)]
            if synced_second(me.view):
                assert other.view.state is PRIM, f"[data] {me.view} / {other.view}"
                assert me.data == other.data, f"[data] {n} is a synced SECOND with other data"

    def execute(self, n: str, event: Event, t: Transition) -> None:
        node = self.nodes[n]
        for a in t.actions:
            match a:
                case TakeVip():
                    assert not node.vip, "[actions] TakeVip twice"
                    node.vip = True
                case ReleaseVip():
                    assert node.vip, "[actions] ReleaseVip without the VIP"
                    node.vip = False
                case Mount(mode=mode):
                    assert node.mounted is None, "[actions] Mount twice"
                    node.mounted = mode
                case SetMountMode(mode=mode):
                    assert node.mounted is not None, "[actions] SetMountMode unmounted"
                    if node.mounted is not MountMode.FENCED:  # as hafs.mount: final
                        node.mounted = mode
                case Unmount():
                    assert node.mounted is not None, "[actions] Unmount unmounted"
                    node.mounted = None
                case StartReplica():
                    assert not node.replica, "[actions] StartReplica twice"
                    node.replica = True
                case StopReplica():
                    assert node.replica, "[actions] StopReplica without replica"
                    node.replica = node.resyncing = False
                case StartResync():
                    assert node.replica, "[actions] StartResync without replica"
                    node.resyncing = True
                    node.data = None
                case RunScript(script=name) if name in ("start_prim", "stop_prim"):
                    node.scripts.append(name)
                case Persist(durable=durable):
                    node.persisted = durable
                case AskWitness():
                    node.asked_witness = True
                case _:
                    pass
        if isinstance(event, Prim) and event.force and t.new_state.state.primary:
            if node.data is None:  # the operator takes a half-copied tree as it is
                node.data = self.new_version(None, self.clock)
            kept = node.data
            self.discarded |= {v for v in self.parent if not self.descends(kept, v)}

    # ---------------------------------------------------------------- rule helpers
    # Rules only run when some node can act (preconditions), and a rule drawn for a node
    # that cannot act falls to the other one, so that every step does something.

    def pick(self, n: str, can: Callable[[str], bool]) -> str:
        return n if can(n) else self.other(n)

    def some(self, can: Callable[[str], bool]) -> bool:
        return bool(self.nodes) and (can(N1) or can(N2))

    def up(self, n: str) -> bool:
        return self.nodes[n].running

    def can_deliver(self, n: str) -> bool:
        m = self.other(n)
        return self.link_up and self.up(m) and bool(self.inflight[n])

    def can_time_out(self, n: str) -> bool:
        """No heartbeat for `timeout`: when the link is down, the peer's daemon is dead, or
        nothing got through yet since the link or a daemon came (back) up."""
        node = self.nodes[n]
        lonely = not self.link_up or not self.up(self.other(n)) or not node.heard
        return node.running and lonely

    def can_end_resync(self, n: str, ok: bool) -> bool:
        node, src = self.nodes[n], self.nodes[self.other(n)]
        if not (node.running and node.resyncing):
            return False
        # a resync completes only against a mount mirroring to this node (PRIM)
        serving = self.link_up and src.running and src.mounted is MountMode.MIRROR
        return not ok or (serving and src.data is not None)

    def is_primary(self, n: str) -> bool:
        return self.up(n) and self.nodes[n].view.state.primary

    def do_deliver(self, n: str) -> None:
        """The peer reads n's latest heartbeat."""
        m = self.other(n)
        info, sent = self.inflight[n].popleft()
        self.nodes[m].heard = True
        self.nodes[m].last_heard = sent
        self.apply(m, PeerSeen(info))

    def do_end_resync(self, n: str, ok: bool) -> None:
        node = self.nodes[n]
        if ok:
            node.data = self.nodes[self.other(n)].data
        node.resyncing = False
        self.apply(n, ResyncFinished(ok, now=float(self.tick()), detail="sim"))

    def do_answer_witness(self, n: str) -> None:
        node = self.nodes[n]
        node.asked_witness = False
        self.apply(n, WitnessResult(node.witness_ok))

    def do_crash(self, n: str) -> None:
        node = self.nodes[n]
        node.running = False
        node.vip, node.mounted, node.replica, node.resyncing = False, None, False, False
        node.scripts.clear()
        node.asked_witness = False
        self.inflight[n].clear()
        self.nodes[self.other(n)].heard = False

    # ---------------------------------------------------------------- rules: heartbeats

    @precondition(lambda self: self.some(self.can_deliver))
    @rule(n=NAMES)
    def deliver(self, n: str) -> None:
        self.do_deliver(self.pick(n, self.can_deliver))

    @precondition(lambda self: self.some(self.can_deliver))
    @rule(n=NAMES)
    def lose(self, n: str) -> None:
        """The oldest heartbeat in flight from a node is lost."""
        self.inflight[self.pick(n, self.can_deliver)].popleft()

    @precondition(lambda self: self.link_up and self.some(self.up))
    @rule(n=NAMES)
    def pulse(self, n: str) -> None:
        """A node sends its periodic heartbeat."""
        self.publish(self.pick(n, self.up))

    @precondition(lambda self: self.some(self.can_time_out))
    @rule(n=NAMES)
    def timeout(self, n: str) -> None:
        self.apply(self.pick(n, self.can_time_out), PeerLost())

    @precondition(lambda self: bool(self.nodes) and self.link_up)
    @rule()
    def cut(self) -> None:
        self.link_up = False
        for n in (N1, N2):
            self.inflight[n].clear()

    @precondition(lambda self: bool(self.nodes) and not self.link_up)
    @rule()
    def heal(self) -> None:
        self.link_up = True
        for n in (N1, N2):
            self.nodes[n].heard = False
            self.publish(n)

    @precondition(lambda self: bool(self.nodes) and self.link_up)
    @rule()
    def partition(self) -> None:
        """Every heartbeat network fails for longer than `timeout`, then comes back: both
        sides act alone (failover, witness), then their heartbeats meet again."""
        self.cut()
        self.quiesce()
        self.heal()

    @precondition(lambda self: bool(self.nodes))
    @rule()
    def quiesce(self) -> None:
        """Let time pass with no new fault: heartbeats flow, scripts and resyncs succeed,
        the witness answers, timeouts fire. It must converge, and with the link up and both
        modules started on a pair with an up-to-date copy, to one primary and a SECOND."""
        for _ in range(60):
            if not self.quiet_step():
                break
        else:
            raise AssertionError("[liveness] the two nodes never settle")
        a, b = self.nodes[N1], self.nodes[N2]
        both = self.link_up and a.running and b.running
        started = STOP not in (a.view.state, b.view.state)
        if both and started and (a.view.uptodate or b.view.uptodate):
            roles = sorted([str(a.view.state), str(b.view.state)])
            mirrored = roles == ["PRIM", "SECOND"] and (
                synced_second(a.view) or synced_second(b.view)
            )
            assert mirrored, f"[liveness] settled as {roles}: {a.view} / {b.view}"

    def quiet_step(self) -> bool:
        """One round of `quiesce` (one heartbeat period); whether anything changed."""

        def snapshot() -> tuple[object, ...]:
            return tuple(
                (x.running, x.view, tuple(x.scripts), x.asked_witness, x.resyncing)
                for x in self.nodes.values()
            )

        before = snapshot()
        both = self.link_up and self.up(N1) and self.up(N2)
        if both:
            for n in (N1, N2):
                self.publish(n)  # the periodic heartbeat
            for n in (N1, N2):
                while self.can_deliver(n):
                    self.do_deliver(n)
        for n in (N1, N2):
            node = self.nodes[n]
            if not node.running:
                continue
            v = node.view
            waiting = v.state is WAIT and v.witness is None and v.phase is Phase.PEER
            if node.scripts:
                self.apply(n, ScriptResult(node.scripts.pop(0), True))
            elif node.asked_witness:
                self.do_answer_witness(n)
            elif self.can_end_resync(n, True):
                self.do_end_resync(n, True)
            elif not both and (v.peer is not None or waiting):
                self.apply(n, PeerLost())
        return snapshot() != before

    # ---------------------------------------------------------------- rules: nodes

    @precondition(lambda self: self.some(self.up))
    @rule(n=NAMES)
    def crash(self, n: str) -> None:
        self.do_crash(self.pick(n, self.up))

    def stopped(self, n: str) -> bool:
        return self.up(n) and self.nodes[n].view.state is STOP

    @precondition(lambda self: self.some(self.stopped))
    @rule(n=NAMES)
    def shutdown(self, n: str) -> None:
        """A daemon whose module is stopped exits cleanly and says goodbye."""
        n = self.pick(n, self.stopped)
        m = self.other(n)
        self.do_crash(n)
        if self.link_up and self.up(m):
            self.apply(m, PeerLost(announced=True))

    @precondition(lambda self: self.some(lambda n: not self.up(n)))
    @rule(n=NAMES, start=st.booleans())
    def boot(self, n: str, start: bool) -> None:
        """The daemon comes back, from what it persisted; with boot="on" it starts the
        module."""
        n = self.pick(n, lambda x: not self.up(x))
        node = self.nodes[n]
        node.running = True
        node.heard = False
        node.view = NodeView(node.view.policy, node.persisted)
        self.nodes[self.other(n)].heard = False
        self.publish(n)
        if start:
            self.apply(n, Start())

    @precondition(lambda self: self.some(self.stopped))
    @rule(n=NAMES)
    def start(self, n: str) -> None:
        self.apply(self.pick(n, self.stopped), Start())

    @precondition(lambda self: self.some(self.up))
    @rule(n=NAMES, cmd=st.sampled_from(COMMANDS))
    def command(self, n: str, cmd: Event) -> None:
        n = self.pick(n, self.up)
        node, other = self.nodes[n], self.nodes[self.other(n)]
        # an operator acts on what `hafs state` shows: the peer's current state
        peer_shown = node.view.peer == other.view.announce()
        if isinstance(cmd, Prim) and self.link_up and other.running and not peer_shown:
            return
        self.apply(n, cmd)

    @precondition(lambda self: self.some(self.is_primary))
    @rule(n=NAMES, cmd=st.sampled_from([Swap(), Stop(), Restart(), StopStart()]))
    def operate_primary(self, n: str, cmd: Event) -> None:
        """The commands that matter most, on the node that is PRIM/ALONE."""
        self.apply(self.pick(n, self.is_primary), cmd)

    def starting(self, n: str) -> bool:
        return self.is_primary(n) and self.nodes[n].view.phase is Phase.STARTING

    @precondition(lambda self: self.some(self.starting))
    @rule(n=NAMES)
    def action_fails(self, n: str) -> None:
        """Taking the VIP or mounting failed on a node that just became primary."""
        self.apply(self.pick(n, self.starting), ActionFailed("TakeVip", "sim"))

    def has_script(self, n: str) -> bool:
        return self.up(n) and bool(self.nodes[n].scripts)

    @precondition(lambda self: self.some(self.has_script))
    @rule(n=NAMES, ok=st.sampled_from([True, True, True, False]))
    def script_ends(self, n: str, ok: bool) -> None:
        n = self.pick(n, self.has_script)
        self.apply(n, ScriptResult(self.nodes[n].scripts.pop(0), ok))

    def asked(self, n: str) -> bool:
        return self.up(n) and self.nodes[n].asked_witness

    @precondition(lambda self: self.some(self.asked))
    @rule(n=NAMES)
    def witness_answers(self, n: str) -> None:
        self.do_answer_witness(self.pick(n, self.asked))

    @precondition(lambda self: bool(self.nodes))
    @rule(n=NAMES)
    def witness_toggles(self, n: str) -> None:
        self.nodes[n].witness_ok = not self.nodes[n].witness_ok

    @precondition(lambda self: self.some(lambda n: self.can_end_resync(n, False)))
    @rule(n=NAMES, ok=st.booleans())
    def resync_ends(self, n: str, ok: bool) -> None:
        n = self.pick(n, lambda x: self.can_end_resync(x, False))
        self.do_end_resync(n, ok and self.can_end_resync(n, True))

    def started(self, n: str) -> bool:
        return self.up(n) and self.nodes[n].view.state is not STOP

    @precondition(lambda self: self.some(self.started))
    @rule(n=NAMES, action=st.sampled_from(["restart", "stopstart"]))
    def checker_fails(self, n: str, action: Any) -> None:
        n = self.pick(n, self.started)
        self.apply(n, CheckerFailed("proc", action, now=float(self.tick())))

    @precondition(lambda self: self.some(self.up))
    @rule(n=NAMES, enabled=st.booleans())
    def failover_switch(self, n: str, enabled: bool) -> None:
        self.apply(self.pick(n, self.up), sm.SetFailover(enabled))

    def is_prim(self, n: str) -> bool:
        return self.up(n) and self.nodes[n].view.state is PRIM

    @precondition(lambda self: self.some(self.is_prim))
    @rule(n=NAMES)
    def replica_breaks(self, n: str) -> None:
        """The replication stream breaks while heartbeats still flow (I5)."""
        self.apply(self.pick(n, self.is_prim), ReplicationLost("sim"))

    def writable(self, n: str) -> bool:
        node = self.nodes[n]
        app_runs = node.view.phase in (Phase.READY, Phase.STARTING)
        return self.is_primary(n) and node.data is not None and app_runs

    @precondition(lambda self: self.some(self.writable))
    @rule(n=NAMES)
    def write(self, n: str) -> None:
        """The application changes a file on a primary; it returns once acknowledged."""
        n = self.pick(n, self.writable)
        node, peer_node = self.nodes[n], self.nodes[self.other(n)]
        if node.view.state is PRIM:
            mirrored = self.link_up and peer_node.running and peer_node.replica
            if not mirrored or node.view.held:  # the SECOND cannot acknowledge (I5)
                self.apply(n, ReplicationLost("no acknowledgement"))
            if node.view.held or node.view.phase is Phase.STOPPING:
                return  # held until the node decides, or fenced: never acknowledged
        assert node.data is not None
        new = self.new_version(node.data, self.tick())
        if node.view.state is PRIM:
            assert peer_node.data in (None, node.data), "[data] mirroring onto another copy"
            if peer_node.data is not None:
                peer_node.data = new
        node.data = new


TwoNodes.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_two_nodes = TwoNodes.TestCase


# --------------------------------------------------------------------------- 4. mutants


MUTANT_SETTINGS = settings(
    max_examples=400,
    stateful_step_count=60,
    deadline=None,
    database=None,
    derandomize=True,
    report_multiple_bugs=False,
    phases=[HypothesisPhase.generate],
    suppress_health_check=list(HealthCheck),
)


def run_mutant(
    step_fn: Callable[[NodeView, Event], Transition], max_examples: int | None = None
) -> str:
    """Run the simulation against a broken step; return the message of what caught it."""

    class Mutant(TwoNodes):
        pass

    Mutant.step_fn = staticmethod(step_fn)  # type: ignore[method-assign]
    chosen = MUTANT_SETTINGS
    if max_examples is not None:
        chosen = settings(MUTANT_SETTINGS, max_examples=max_examples)
    with pytest.raises(AssertionError) as caught:
        run_state_machine_as_test(Mutant, settings=chosen)
    return str(caught.value)


@contextmanager
def patched(monkeypatch: pytest.MonkeyPatch, name: str, value: object) -> Iterator[None]:
    with monkeypatch.context() as m:
        m.setattr(sm, name, value)
        yield


def test_mutant_greedy_election_breaks_single_primary(monkeypatch: pytest.MonkeyPatch) -> None:
    """(1): a node with an up-to-date copy that wins every election."""
    real = sm.elect

    def greedy(a: PeerInfo, b: PeerInfo, defaultprim: str) -> tuple[str | None, str]:
        return (a.name, "mutant: I win") if a.copy.uptodate else real(a, b, defaultprim)

    with patched(monkeypatch, "elect", greedy):
        assert "[I8]" in run_mutant(step)


def test_mutant_stale_start_breaks_uptodate(monkeypatch: pytest.MonkeyPatch) -> None:
    """(2) by the node's flag: a node that starts ALONE from a STALE copy (no witness)."""
    real = sm._absent

    def absent(v: NodeView, announced: bool, why: str) -> Transition:
        if v.copy is STALE and not v.policy.witness:
            return sm._enter_primary(v, ALONE, "mutant: peer absent")
        return real(v, announced, why)

    with patched(monkeypatch, "_absent", absent):
        assert "[I7]" in run_mutant(step)


def test_mutant_failed_resync_counted_as_done_breaks_data() -> None:
    """(2) by the data checks, not by any flag: a SECOND that takes a failed resync for a
    finished one. Its flag says MIRROR; only the simulated data shows the half copy."""

    def optimistic(v: NodeView, e: Event) -> Transition:
        if isinstance(e, ResyncFinished):
            e = replace(e, ok=True)
        return step(v, e)

    # Rarer since held writes are never acknowledged (fencing): a longer search.
    message = run_mutant(optimistic, max_examples=2000)
    assert "[data]" in message or "half-resynced" in message, message


def test_mutant_resyncing_failover_breaks_uptodate(monkeypatch: pytest.MonkeyPatch) -> None:
    """(2): a resynchronising SECOND that takes over."""
    with monkeypatch.context() as m:
        m.setattr(sm.NodeView, "synced", property(lambda self: self.state is SECOND))
        assert "[I7]" in run_mutant(step)


def test_mutant_no_resync_after_alone_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SECOND that does not notice that its primary went on alone never gets back in
    sync (and would take over from a stale copy)."""

    def no_resync(v: NodeView, reason: str) -> Transition:
        return sm._stay(v, "mutant: still synced")

    with patched(monkeypatch, "_resync", no_resync):
        message = run_mutant(step)
    assert any(tag in message for tag in ("[liveness]", "[data]", "[I7]")), message


def test_mutant_kept_vip_breaks_action_consistency() -> None:
    """(3): a primary that forgets to release the virtual IP when it leaves."""

    def forgetful(v: NodeView, e: Event) -> Transition:
        t = step(v, e)
        return replace(t, actions=tuple(a for a in t.actions if not isinstance(a, ReleaseVip)))

    assert "[actions]" in run_mutant(forgetful)


def test_mutant_unpersisted_copy_breaks_action_consistency() -> None:
    """(3): changes of the up-to-date record that are not persisted (I7 needs them durable)."""

    def amnesic(v: NodeView, e: Event) -> Transition:
        t = step(v, e)
        return replace(t, actions=tuple(a for a in t.actions if not isinstance(a, Persist)))

    assert "without Persist" in run_mutant(amnesic)
