"""The module state machine: SafeKit's mirror automaton as a pure function.

    step(view, event) -> Transition(new_state, actions, reason)

No I/O, no clock, no trio (style.md, after etcd-io/raft): the daemon feeds events in and
executes the actions that come out. Everything a decision depends on is in the `NodeView`
or in the event, so every rule is testable from a table, and two nodes can be simulated
against each other (tests/unit/controller/test_statemachine.py).

States and colours
------------------
SafeKit's console shows a state with a colour for its qualifier: red = NotReady,
orange = Transient, green = Ready [UG §3.4.2]. The seed's walkthrough adds that a SECOND
"stays in the SECOND (magenta) state while resynchronizing" (seed step 8), where the User's
Guide says orange (Transient). Both are right about different things: the qualifier of a
resynchronising SECOND is Transient, and its colour is the mirror console's magenta, so
`NodeView.qualifier` says TRANSIENT and `NodeView.colour` says MAGENTA for it, and orange for
every other transient state.

- STOP (red): the module is stopped. The daemon still exchanges heartbeats, so both nodes'
  states can be shown and a stopped node learns when its copy falls behind.
- WAIT: orange while it waits for something that will come by itself (the peer's first
  heartbeat after a start, the witness's answer); red when it cannot go on by itself (its
  copy is not up to date, the witness is unreachable, failover is off, the peer has the
  better claim but is stopped). `NodeView.why` says which, in words for the operator.
- ALONE: primary without a secondary: virtual IP set, replicated directories mounted in
  ALONE mode (every change journaled for the later resync), application started by
  start_prim. Orange while start_prim or stop_prim runs, green once it is running.
- PRIM: primary with a SECOND (mounted in MIRROR mode: every change is acknowledged by the
  SECOND before the call returns). Orange/green as ALONE.
- SECOND: replica of the primary's directories. Magenta while resynchronising (its copy is
  not up to date: it cannot take over), green once synchronised (it can). Orange while it
  hands the primary role over in a swap or asks the witness.

Up to date (I7)
---------------
Each node persists a `Durable` record; its `copy` is one of
- SOLE: this node was primary without a mirror (ALONE) when it last ran: its copy is the
  newest there is, and the peer's is behind.
- MIRROR: the copy was identical to the peer's when this node last ran (PRIM with a
  synchronised SECOND, or a synchronised SECOND). Up to date, but the peer may have gone on
  alone since, so a node that starts with a MIRROR copy and no peer in sight waits for it
  (SafeKit after a power loss: "the first node back waits in WAIT for its peer") instead of
  going ALONE; `prim` (without --force) starts it anyway.
- STALE: not up to date: never synchronised, a resync did not finish, the peer went on as
  primary without it, or it lost a split brain. Only a forced `prim` makes such a node
  primary (I7).
Two values of "up to date" are needed where SafeKit has one flag because a node that crashed
as SECOND and reboots cut off from its peer cannot tell whether the peer went on alone;
treating MIRROR as good enough to start ALONE would lose the peer's writes.

The rules
---------
- start: WAIT, then on the peer's heartbeat: the peer is PRIM/ALONE -> SECOND (resync); the
  peer is STOP/WAIT -> `elect` decides (copy SOLE > MIRROR > STALE; between two SOLE copies
  the older primary term, as SafeKit keeps the node that was primary before a split; then
  defaultprim=<node>; then the most recent primary (lastprim, also the default for
  defaultprim=alone, which only says that a running ALONE node stays primary); then the
  smaller node name). The winner goes ALONE, the loser waits and joins it as SECOND. Both
  STALE: both wait (SafeKit's rfs_notuptodate_server) and the reason says to run `prim`.
  No heartbeat within `timeout`: SOLE -> ALONE (after asking the witness when one is
  configured), MIRROR/STALE -> WAIT.
- failover: a synchronised SECOND that loses its primary becomes ALONE: at once when the
  primary announced that it left (its heartbeat says STOP/WAIT: "Action alone called by
  heart: remote stop"), after a positive witness answer when every heartbeat timed out and a
  witness is configured, at once without one. A resynchronising SECOND goes to WAIT instead.
  `failover="off"`: WAIT, and only `prim` promotes it.
- PRIM losing its SECOND becomes ALONE and keeps running; when the SECOND could have taken
  over (it was synchronised, its heartbeats timed out) and a witness is configured, it stays
  ALONE only if the witness answers, and otherwise stops the application and waits (I8).
- Fencing. The mount does not go ALONE by itself: when the SECOND stops acknowledging, it
  holds the calls (HELD) and reports `ReplicationLost`. Without a witness the PRIM goes ALONE
  at once (the held calls complete, journaled). With one it stays PRIM, `held`, until it
  knows whether the SECOND may take over: a heartbeat from the peer after the loss (it is
  alive: ALONE) or, once the heartbeats time out, the witness (reachable: ALONE; not: the
  calls fail, `SetMountMode(FENCED)`, and the application stops). So a PRIM cut off from its
  peer and the witness acknowledges nothing the SECOND taking over lacks. Leaving the
  primary role while held fences too.
- Split brain: when two primaries see each other, `elect` picks the one that stays; the
  other logs "Split brain recovery: exiting alone", runs stop_prim, marks its copy STALE
  (its writes since the split are lost, as in SafeKit) and rejoins as SECOND. A stopped or
  waiting node that sees that the peer's copy also ran alone applies the same rule at once,
  so a later `prim` without force cannot bring back the copy that lost.
- A node that is not running a role and sees the peer serving as primary (or sees a peer
  copy that ran alone while its own is only MIRROR) marks its copy STALE: SafeKit's
  "STOP (red) not uptodate".
- An ALONE node becomes PRIM when its peer is a SECOND that is resynchronising from it. A
  SECOND that says it is synchronised while the primary is ALONE has not yet seen that the
  primary went on alone; the primary waits for it to start its resync. A synchronised
  SECOND that sees its primary ALONE (even while that one is stopping) resynchronises.
- stop on PRIM/ALONE runs stop_prim, then releases the VIP and unmounts; the synchronised
  SECOND sees the STOP and takes over. swap: PRIM runs stop_prim, releases the VIP, unmounts,
  becomes SECOND (HANDOVER) without resync, and the synchronised SECOND becomes PRIM directly.
  restart: stop_prim + start_prim locally. stopstart: stop, then start (a failover on PRIM).
  prim: refused when the peer is primary or would become primary by itself; needs `force`
  when the copy is STALE. second: only when the peer is PRIM/ALONE. defaultprim=<node>: the
  PRIM hands the role to that node once it finished its resync ("Transition SWAP from
  defaultprim").
- maxloop/loop_interval: restarts and stopstarts asked by checkers (and failed resyncs) are
  counted in a sliding window; the action after `maxloop` of them within `loop_interval`
  seconds stops the module instead ("Action stop called by maxloop"). Operator commands reset
  the count.

What the daemon must do
-----------------------
- Feed one event at a time; execute the transition's actions in order; then announce
  `new_state.announce()` in every heartbeat. Leaving a primary role is in two steps (stop_prim
  first, then release), so the peer never sees a state that lets it take over before the VIP
  is released and the directories unmounted.
- `RunScript` starts a script and returns; its outcome comes back as `ScriptResult`. The
  state machine waits for start_prim and stop_prim (transient phases); the daemon runs one
  script at a time, a stop script a second time with `force` first, and kills a hung one
  after `nicestoptimeout`/`forcestoptimeout` before reporting it.
- Feed `PeerSeen` for each authenticated heartbeat (also while the module is STOP) and
  `PeerLost` once no heartbeat arrived on any network for `timeout`, including after a
  `Start`, which decides nothing before one of the two comes. A daemon shutting down says
  so (`PeerLost(announced=True)` on the peer). Heartbeats are sent periodically and at once
  when `announce()` changes.
- The data path keeps the contract of `SetMountMode` and `StartResync`: a resync completes
  only against a mount in MIRROR mode, which then acknowledges each change only once the
  SECOND has it; otherwise a SECOND would count as synchronised while the primary journals.
- `AskWitness` pings the splitbrain witnesses and reports `WitnessResult`; `StartResync`
  reports `ResyncFinished`; a mount that stops replicating (I5) reports `ReplicationLost`;
  checkers report `CheckerFailed`; a failed action reports `ActionFailed`.
- Persist `Persist.durable` durably (fsync) before executing the next action, and start the
  machine from the last persisted record: `NodeView(policy, durable=loaded)`.

Limits (known, as in SafeKit)
-----------------------------
- Without a witness, a failure of every heartbeat network makes both nodes ALONE; when they
  meet again, the changes made on the one `elect` drops are lost. With SafeKit's kind of
  witness (a router both nodes can ping) both may still reach it.
- With an arbitrating witness (`exec="arbitrate"`, controller/arbiter.py) the witness's
  answer is a lease only one node holds: the one that serves renews it, and an ALONE node
  that loses it (`LeaseLost`) is fenced and steps down before the peer can be granted it.
- Fencing (above) needs a witness. Without one, a PRIM that loses its SECOND acknowledges
  changes ALONE; if the SECOND lost it too, it takes over without them (SafeKit's and DRBD's
  `fencing dont-care` behaviour). With a ping witness, a cut between the two nodes alone
  lets both reach it: both go ALONE, and the split-brain rule drops one side's changes.
- A PRIM released by a heartbeat after the loss goes ALONE; if every network then fails
  before the SECOND saw that ALONE state, the SECOND (synchronised by its own account) may
  take over without the changes made ALONE.
- `elect` between two copies that both ran alone does not know which one actually changed
  anything; if the data path reported whether its ALONE journal is empty, the copy with
  changes could be kept when only one has some.
- Two operators running `prim` on both nodes within one heartbeat period can both succeed;
  the split-brain rule then stops one of them at the next heartbeat.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Literal, TypeAlias, assert_never

# --------------------------------------------------------------------------- states


class State(enum.StrEnum):
    """A module's state on one node, with SafeKit's names."""

    STOP = "STOP"  # stopped (red); the daemon still exchanges heartbeats
    WAIT = "WAIT"  # started, not serving: deciding (orange) or blocked (red), see `why`
    ALONE = "ALONE"  # primary without a SECOND: VIP, mount journaling, application
    PRIM = "PRIM"  # primary mirroring every change to its SECOND
    SECOND = "SECOND"  # replica: resynchronising (magenta) or synchronised (green)

    @property
    def code(self) -> int:
        """`safekit state -lq` exit code: STOP 0, WAIT 1, ALONE 2, PRIM 3, SECOND 4."""
        return _STATE_CODES[self]

    @property
    def primary(self) -> bool:
        """Holds the virtual IP and runs the application (ALONE or PRIM)."""
        return self is State.ALONE or self is State.PRIM


_STATE_CODES = {State.STOP: 0, State.WAIT: 1, State.ALONE: 2, State.PRIM: 3, State.SECOND: 4}


class Phase(enum.StrEnum):
    """Where a node is within its state; decides the colour and which events matter."""

    READY = "ready"  # settled: STOP, or ALONE/PRIM/SECOND running normally
    PEER = "peer"  # WAIT: waiting for the peer's heartbeat (or the peer) to decide
    BLOCKED = "blocked"  # WAIT (red): cannot go on by itself; `why` says what would unblock it
    STARTING = "starting"  # ALONE/PRIM: start_prim running
    STOPPING = "stopping"  # ALONE/PRIM: stop_prim running; `goal` says what follows
    RESYNCING = "resyncing"  # SECOND: copying from the primary; the copy is not up to date
    HANDOVER = "handover"  # SECOND: gave the primary role to the peer (swap), waits for it


class Goal(enum.StrEnum):
    """What a primary does once stop_prim has finished (ordered by strength)."""

    RESTART = "restart"  # start_prim again: `restart`, keeps the VIP and the mount
    HANDOVER = "handover"  # release, become SECOND, let the peer become PRIM: `swap`
    STEP_DOWN = "step_down"  # release and WAIT: lost a split brain, or peer+witness lost
    STOP = "stop"  # release and STOP


_GOAL_STRENGTH = {Goal.RESTART: 0, Goal.HANDOVER: 1, Goal.STEP_DOWN: 2, Goal.STOP: 3}


class Witness(enum.StrEnum):
    """Why a node asked the splitbrain witness (the answer means something different)."""

    START = "start"  # WAIT with a SOLE copy and no peer: may it go ALONE?
    FAILOVER = "failover"  # synchronised SECOND lost its primary: may it take over?
    KEEP = "keep"  # primary lost a SECOND that could take over: may it stay primary?


class Copy(enum.StrEnum):
    """What a node knows of its copy of the replicated directories (persisted, I7)."""

    SOLE = "sole"  # was primary without a mirror: the newest copy; the peer's is behind
    MIRROR = "mirror"  # identical to the peer's when this node last ran
    STALE = "stale"  # not up to date: only a forced prim makes this node primary

    @property
    def uptodate(self) -> bool:
        return self is not Copy.STALE

    @property
    def rank(self) -> int:
        return {Copy.SOLE: 2, Copy.MIRROR: 1, Copy.STALE: 0}[self]


class Qualifier(enum.StrEnum):
    """SafeKit's state qualifier [UG §3.4.2]."""

    NOT_READY = "NotReady"
    TRANSIENT = "Transient"
    READY = "Ready"


class Colour(enum.StrEnum):
    """The console colour: red NotReady, orange Transient, green Ready, magenta resyncing."""

    RED = "red"
    ORANGE = "orange"
    MAGENTA = "magenta"
    GREEN = "green"


def qualifier_of(state: State, phase: Phase, asking_witness: bool = False) -> Qualifier:
    """The qualifier of a node in `state`/`phase` (see the module docstring)."""
    if state is State.STOP:
        return Qualifier.NOT_READY
    if state is State.WAIT:
        transient = phase is Phase.PEER or asking_witness
        return Qualifier.TRANSIENT if transient else Qualifier.NOT_READY
    if asking_witness or phase is not Phase.READY:
        return Qualifier.TRANSIENT
    return Qualifier.READY


def colour_of(state: State, phase: Phase, asking_witness: bool = False) -> Colour:
    """The colour of a node in `state`/`phase`: magenta for a resynchronising SECOND."""
    if state is State.SECOND and phase is Phase.RESYNCING:
        return Colour.MAGENTA
    q = qualifier_of(state, phase, asking_witness)
    return {
        Qualifier.READY: Colour.GREEN,
        Qualifier.TRANSIENT: Colour.ORANGE,
        Qualifier.NOT_READY: Colour.RED,
    }[q]


# --------------------------------------------------------------------------- the view


@dataclass(frozen=True)
class Policy:
    """The configuration knobs decisions depend on (from cluster.xml and `<service>`).

    node/peer: this node's and the peer's names in cluster.xml.
    defaultprim: "alone" | "lastprim" | a node name (`<service defaultprim>`).
    failover: `<service failover>`; off: a SECOND that loses its primary waits for `prim`.
    witness: a `<splitbrain>` checker is configured.
    maxloop, loop_interval: `<service maxloop loop_interval>`, the interval in seconds
    (0: no limit), the same unit as the events' `now`.
    """

    node: str
    peer: str
    defaultprim: str = "alone"
    failover: bool = True
    witness: bool = False
    maxloop: int = 3
    loop_interval: float = 24 * 3600.0


@dataclass(frozen=True)
class Durable:
    """What a node persists (`Persist`) and starts from after a stop or a crash.

    copy: see `Copy`. term: the highest primary term this node has heard of; a node that
    becomes primary takes the next one, so a primary that took over during a split has a
    higher term than the one it replaced. prim_term: the term of this node's last period
    as primary (0: never), for lastprim and for settling a split brain.
    """

    copy: Copy = Copy.STALE  # a fresh install was never synchronised: run `prim` first
    term: int = 0
    prim_term: int = 0


@dataclass(frozen=True)
class PeerInfo:
    """What a node announces in every heartbeat (`NodeView.announce()`).

    leaving: a primary running stop_prim before releasing (stop, swap, step down): the peer
    must not join it. forced: primary since a forced `prim`; its SECOND's next resync is
    full. colour: for showing the peer's state.
    """

    name: str
    state: State
    phase: Phase = Phase.READY
    copy: Copy = Copy.STALE
    term: int = 0
    prim_term: int = 0
    leaving: bool = False
    forced: bool = False
    colour: Colour = Colour.RED

    @property
    def synced_second(self) -> bool:
        """A SECOND whose copy is identical to its primary's: it can take over."""
        return (
            self.state is State.SECOND
            and self.copy is Copy.MIRROR
            and self.phase in (Phase.READY, Phase.HANDOVER)
        )

    @property
    def serving(self) -> bool:
        """A primary that stays primary (not stepping down, not a split-brain loser)."""
        return self.state.primary and not self.leaving and self.copy.uptodate


@dataclass(frozen=True)
class NodeView:
    """Everything the state machine knows about one node's module.

    state/phase/goal: see `State`, `Phase`, `Goal`. durable: the persisted record.
    witness: a pending witness question. peer: the last heartbeat's content, None when the
    peer is absent (heartbeats timed out) or not heard of yet. held: PRIM whose mount lost
    its SECOND and holds the calls until this node decides (fencing). forced: primary since a forced
    prim and no SECOND synchronised since. stopstart: start again once STOP is reached.
    loops: times (`now`) of the checker actions within `loop_interval`. why: the reason for
    the current state, for `hafs state`.
    """

    policy: Policy
    durable: Durable = field(default_factory=Durable)
    state: State = State.STOP
    phase: Phase = Phase.READY
    goal: Goal | None = None
    witness: Witness | None = None
    peer: PeerInfo | None = None
    held: bool = False
    forced: bool = False
    stopstart: bool = False
    loops: tuple[float, ...] = ()
    why: str = "stopped"

    @property
    def copy(self) -> Copy:
        return self.durable.copy

    @property
    def uptodate(self) -> bool:
        return self.durable.copy.uptodate

    @property
    def synced(self) -> bool:
        """A SECOND that can take over (see `PeerInfo.synced_second`)."""
        return self.announce().synced_second

    @property
    def leaving(self) -> bool:
        return self.phase is Phase.STOPPING and self.goal is not Goal.RESTART

    @property
    def qualifier(self) -> Qualifier:
        return qualifier_of(self.state, self.phase, self.witness is not None or self.held)

    @property
    def colour(self) -> Colour:
        return colour_of(self.state, self.phase, self.witness is not None or self.held)

    def announce(self) -> PeerInfo:
        """The content of this node's heartbeats."""
        return PeerInfo(
            name=self.policy.node,
            state=self.state,
            phase=self.phase,
            copy=self.durable.copy,
            term=self.durable.term,
            prim_term=self.durable.prim_term,
            leaving=self.leaving,
            forced=self.forced,
            colour=self.colour,
        )


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Start:
    """`hafs start`: start the module; it decides its role from the peer's heartbeats."""


@dataclass(frozen=True)
class Stop:
    """`hafs stop`: stop the module; on PRIM the synchronised SECOND takes over."""


@dataclass(frozen=True)
class Prim:
    """`hafs prim`: start as primary (ALONE) now.

    Refused when the peer is primary or would become primary by itself. force: the
    operator confirmed that a copy that is not up to date becomes the reference (SafeKit's
    primforce); without it a STALE copy is refused.
    """

    force: bool = False


@dataclass(frozen=True)
class Second:
    """`hafs second [fullsync]`: start as SECOND of the peer, which must be PRIM/ALONE."""

    fullsync: bool = False


@dataclass(frozen=True)
class Swap:
    """`hafs swap`: exchange PRIM and SECOND without resync. Handled by the PRIM node."""


@dataclass(frozen=True)
class Restart:
    """`hafs restart`: stop_prim then start_prim locally (stop/start_second on SECOND)."""


@dataclass(frozen=True)
class StopStart:
    """`hafs stopstart`: stop, then start; on PRIM the SECOND takes over meanwhile."""


@dataclass(frozen=True)
class SetFailover:
    """`hafs failover on|off`: change `<service failover>` at run time."""

    enabled: bool


@dataclass(frozen=True)
class PeerSeen:
    """An authenticated heartbeat from the peer (its latest one; older ones are dropped).

    A heartbeat saying STOP or WAIT from what was our primary is its announced departure.
    """

    peer: PeerInfo


@dataclass(frozen=True)
class PeerLost:
    """The peer is gone: no heartbeat on any network for `timeout` (announced=False), or
    its daemon said goodbye when it shut down (announced=True: no split brain possible)."""

    announced: bool = False


@dataclass(frozen=True)
class WitnessResult:
    """The answer to `AskWitness`: whether any splitbrain witness could be reached."""

    reachable: bool


@dataclass(frozen=True)
class ResyncFinished:
    """The resync started by `StartResync` ended; ok=False is retried as a stopstart that
    counts toward maxloop, hence `now` (seconds, the clock of `loop_interval`)."""

    ok: bool
    now: float = 0.0
    detail: str = ""


@dataclass(frozen=True)
class ReplicationLost:
    """The mount stopped replicating (the SECOND did not acknowledge in time, I5) and
    journals instead: PRIM becomes ALONE."""

    detail: str = ""


@dataclass(frozen=True)
class LeaseLost:
    """The arbitrating witness's lease on the primary role ran out (it could not be renewed,
    or another node holds it): the witness may grant the role to the peer now."""

    detail: str = ""


@dataclass(frozen=True)
class CheckerFailed:
    """A checker (errd process checker, ...) asks for an action, counted by maxloop."""

    checker: str
    action: Literal["restart", "stopstart"]
    now: float


@dataclass(frozen=True)
class ScriptResult:
    """A script started by `RunScript` ended (after its forced run, for stop scripts)."""

    script: str
    ok: bool


@dataclass(frozen=True)
class ActionFailed:
    """An action could not be executed (mount, VIP ...): the module stops."""

    action: str
    detail: str = ""


Event: TypeAlias = (
    Start
    | Stop
    | Prim
    | Second
    | Swap
    | Restart
    | StopStart
    | SetFailover
    | PeerSeen
    | PeerLost
    | WitnessResult
    | ResyncFinished
    | ReplicationLost
    | LeaseLost
    | CheckerFailed
    | ScriptResult
    | ActionFailed
)

# --------------------------------------------------------------------------- actions


class MountMode(enum.StrEnum):
    """How the data process mounts the replicated directories."""

    MIRROR = "mirror"  # every change acknowledged by the SECOND before it returns
    ALONE = "alone"  # changes applied locally and journaled for the resync (I5)
    FENCED = "fenced"  # stepping down: changes the SECOND did not acknowledge fail (EIO)


class LogLevel(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True)
class TakeVip:
    """Add the virtual IP on this node and announce it (gratuitous ARP)."""


@dataclass(frozen=True)
class ReleaseVip:
    """Remove the virtual IP from this node."""


@dataclass(frozen=True)
class Mount:
    """Mount the replicated directories over themselves in `mode`."""

    mode: MountMode


@dataclass(frozen=True)
class SetMountMode:
    """Switch the running mount between MIRROR and ALONE (journaling).

    MIRROR: the peer has become SECOND and is resynchronising: the mount serves its resync
    and then acknowledges every change only once the SECOND has it. The SECOND's resync can
    only finish against a mount in MIRROR mode, so that a synchronised SECOND stays so.
    """

    mode: MountMode


@dataclass(frozen=True)
class Unmount:
    """Unmount the replicated directories (the application is stopped)."""


@dataclass(frozen=True)
class StartReplica:
    """Run the replica server that applies the primary's stream to the local copy."""


@dataclass(frozen=True)
class StopReplica:
    """Stop the replica server."""


@dataclass(frozen=True)
class StartResync:
    """Bring the local copy level with the primary's; reports `ResyncFinished`.

    It completes only once the primary is PRIM (its mount in MIRROR mode mirrors every
    later change, see `SetMountMode`); `ResyncFinished(ok=True)` means this copy is
    identical to the primary's and stays so. full: copy everything (second fullsync, or the
    primary was forced); otherwise the data path copies what its journals say changed.
    """

    full: bool = False


@dataclass(frozen=True)
class RunScript:
    """Start user script `script` (if present in bin/) with SafeKit's arguments
    (current state, next state, action); reports `ScriptResult`."""

    script: str
    args: tuple[str, str, str]


@dataclass(frozen=True)
class Persist:
    """Write `durable` durably before executing the next action."""

    durable: Durable


@dataclass(frozen=True)
class Log:
    """A line for the module log."""

    level: LogLevel
    message: str


@dataclass(frozen=True)
class AskWitness:
    """Ping the splitbrain witnesses; reports `WitnessResult`."""


Action: TypeAlias = (
    TakeVip
    | ReleaseVip
    | Mount
    | SetMountMode
    | Unmount
    | StartReplica
    | StopReplica
    | StartResync
    | RunScript
    | Persist
    | Log
    | AskWitness
)


@dataclass(frozen=True)
class Transition:
    """The outcome of one event: the new view, what to do, and why.

    refused: the event was a command that cannot be carried out in this state; the view is
    unchanged and `reason` says why (the CLI prints it and exits non-zero).
    """

    new_state: NodeView
    actions: tuple[Action, ...]
    reason: str
    refused: bool = False


# --------------------------------------------------------------------------- election


def elect(a: PeerInfo, b: PeerInfo, defaultprim: str) -> tuple[str | None, str]:
    """Which of two nodes should be primary, and why; None when neither copy is up to date.

    Both nodes evaluate it on their own announcement and the peer's heartbeat, so it
    depends only on what heartbeats carry, and is symmetric: elect(a, b) == elect(b, a).
    Used both when two nodes start and when two primaries meet after a split.
    """
    if a.name > b.name:
        a, b = b, a
    if not a.copy.uptodate and not b.copy.uptodate:
        return None, "neither copy is up to date"
    if a.copy.rank != b.copy.rank:
        w, lo = (a, b) if a.copy.rank > b.copy.rank else (b, a)
        return w.name, f"{w.name}'s copy is {w.copy}, {lo.name}'s is {lo.copy}"
    if a.copy is Copy.SOLE and a.prim_term != b.prim_term:
        w = a if a.prim_term < b.prim_term else b
        return w.name, f"both ran alone: {w.name} was primary first (term {w.prim_term})"
    if defaultprim in (a.name, b.name):
        return defaultprim, f"defaultprim={defaultprim}"
    if a.prim_term != b.prim_term:
        w = a if a.prim_term > b.prim_term else b
        return w.name, f"{w.name} was primary last (term {w.prim_term})"
    return a.name, "equal claims: the first node name wins"


# --------------------------------------------------------------------------- step


def step(view: NodeView, event: Event) -> Transition:
    """The new view and the actions for `event` in `view`. Pure and deterministic."""
    match event:
        case Start() | Stop() | Prim() | Second() | Swap() | Restart() | StopStart():
            t = _command(_admin(view), event)
            return replace(t, new_state=view) if t.refused else t
        case SetFailover(enabled=enabled):
            v = replace(view, policy=replace(view.policy, failover=enabled))
            return _stay(v, f"failover {'on' if enabled else 'off'}")
        case PeerSeen(peer=peer):
            return _peer_seen(view, peer)
        case PeerLost(announced=announced):
            return _peer_lost(view, announced)
        case WitnessResult(reachable=reachable):
            return _witness_result(view, reachable)
        case ResyncFinished(ok=ok, now=now, detail=detail):
            return _resync_finished(view, ok, now, detail)
        case ReplicationLost(detail=detail):
            return _replication_lost(view, detail)
        case LeaseLost(detail=detail):
            return _lease_lost(view, detail)
        case CheckerFailed(checker=checker, action=action, now=now):
            return _loop(view, now, f"checker {checker} asks for {action}", action)
        case ScriptResult(script=script, ok=ok):
            return _script_result(view, script, ok)
        case ActionFailed(action=action, detail=detail):
            return _action_failed(view, action, detail)
        case _:
            assert_never(event)


def _command(
    v: NodeView, command: Start | Stop | Prim | Second | Swap | Restart | StopStart
) -> Transition:
    """An operator command (the maxloop count already reset)."""
    match command:
        case Start():
            if v.state is not State.STOP:
                return _refuse(v, f"already started ({v.state})")
            return _start(v, "start requested")
        case Stop():
            return _stop(replace(v, stopstart=False), "stop requested")
        case Prim(force=force):
            return _prim(v, force)
        case Second(fullsync=fullsync):
            return _second(v, fullsync)
        case Swap():
            return _swap(v)
        case Restart():
            return _restart(v, "restart requested", command=True)
        case StopStart():
            if v.state is State.STOP:
                return _start(v, "stopstart requested")
            return _stop(replace(v, stopstart=True), "stopstart requested")
        case _:
            assert_never(command)


# --------------------------------------------------------------------------- helpers


def _t(old: NodeView, new: NodeView, reason: str, *actions: Action) -> Transition:
    """A transition; a change of state is logged first, with its reason."""
    if new.state is not old.state:
        line = Log(LogLevel.INFO, f"Transition {old.state} -> {new.state}: {reason}")
        actions = (line, *actions)
        new = replace(new, held=False)  # only a PRIM holds its calls
    return Transition(new, tuple(actions), reason)


def _stay(v: NodeView, reason: str, *actions: Action) -> Transition:
    return Transition(v, tuple(actions), reason)


def _refuse(v: NodeView, reason: str) -> Transition:
    return Transition(v, (Log(LogLevel.WARNING, f"refused: {reason}"),), reason, refused=True)


def _admin(v: NodeView) -> NodeView:
    """Operator commands reset the maxloop count, as in SafeKit."""
    return replace(v, loops=()) if v.loops else v


def _persist(v: NodeView, copy: Copy) -> tuple[NodeView, tuple[Action, ...]]:
    if v.durable.copy is copy:
        return v, ()
    durable = replace(v.durable, copy=copy)
    return replace(v, durable=durable), (Persist(durable),)


def _script(name: str, old: State, new: State | str, action: str) -> RunScript:
    return RunScript(name, (str(old), str(new), action))


def _no_witness_warning(v: NodeView) -> tuple[Action, ...]:
    if v.policy.witness:
        return ()
    return (
        Log(
            LogLevel.WARNING,
            "no splitbrain witness configured: if every heartbeat network fails, both nodes "
            "go ALONE and the changes made on one of them are lost when they meet again",
        ),
    )


# --------------------------------------------------------------------------- entering roles


def _start(v: NodeView, reason: str, *before: Action) -> Transition:
    new = replace(
        v,
        state=State.WAIT,
        phase=Phase.PEER,
        goal=None,
        witness=None,
        forced=False,
        stopstart=False,
        why="started: waiting for the peer's heartbeat",
    )
    prestart = _script("prestart", v.state, State.WAIT, "start")
    return _t(v, new, reason, *before, prestart, *_no_witness_warning(v))


def _enter_primary(
    v: NodeView,
    target: State,
    reason: str,
    *before: Action,
    copy: Copy = Copy.SOLE,
    forced: bool = False,
) -> Transition:
    """Become ALONE or PRIM: persist first (a crash after taking the VIP must restart as the
    primary it was), then mount, take the VIP and start the application."""
    term = v.durable.term + 1
    durable = Durable(copy=copy, term=term, prim_term=term)
    acts: list[Action] = list(before)
    if v.state is State.SECOND:
        acts += [StopReplica(), _script("stop_second", v.state, target, "stop")]
    mode = MountMode.MIRROR if target is State.PRIM else MountMode.ALONE
    acts += [
        Persist(durable),
        Mount(mode),
        TakeVip(),
        _script("start_prim", v.state, target, "start"),
    ]
    new = replace(
        v,
        state=target,
        phase=Phase.STARTING,
        goal=None,
        witness=None,
        durable=durable,
        forced=forced,
        why=reason,
    )
    return _t(v, new, reason, *acts)


def _become_second(v: NodeView, reason: str, full: bool, *before: Action) -> Transition:
    """Join the peer as SECOND: the copy is STALE until the resync finishes."""
    v2, persist = _persist(v, Copy.STALE)
    acts = (
        *before,
        *persist,
        StartReplica(),
        StartResync(full=full),
        _script("start_second", v.state, State.SECOND, "start"),
    )
    new = replace(v2, state=State.SECOND, phase=Phase.RESYNCING, goal=None, witness=None)
    return _t(v, replace(new, why=reason), reason, *acts)


def _to_wait(v: NodeView, why: str, *before: Action, blocked: bool = True) -> Transition:
    """WAIT from WAIT or SECOND (a primary steps down through `_leave_primary`)."""
    acts: list[Action] = list(before)
    if v.state is State.SECOND:
        acts += [StopReplica(), _script("stop_second", v.state, State.WAIT, "stopwait")]
    phase = Phase.BLOCKED if blocked else Phase.PEER
    new = replace(v, state=State.WAIT, phase=phase, goal=None, witness=None, why=why)
    return _t(v, new, why, *acts)


def _prim_to_alone(v: NodeView, reason: str, *before: Action) -> Transition:
    """PRIM without its SECOND: keep running, journal from now on (I5)."""
    v2, persist = _persist(v, Copy.SOLE)
    new = replace(v2, state=State.ALONE, why=reason)
    return _t(v, new, reason, *before, *persist, SetMountMode(MountMode.ALONE))


# --------------------------------------------------------------------------- leaving roles


def _leave_primary(v: NodeView, goal: Goal, reason: str, *before: Action) -> Transition:
    """First half of leaving a primary role: stop_prim. `_after_stop_prim` does the rest.
    Calls held for want of the SECOND's acknowledgement fail first (they would hold
    stop_prim, and the SECOND may take over without them)."""
    if v.held:
        before = (SetMountMode(MountMode.FENCED), *before)
        v = replace(v, held=False)
    if v.phase is Phase.STOPPING:
        assert v.goal is not None
        stronger = goal if _GOAL_STRENGTH[goal] > _GOAL_STRENGTH[v.goal] else v.goal
        return _stay(replace(v, goal=stronger, why=reason), reason, *before)
    target: State | str = {
        Goal.RESTART: v.state,
        Goal.HANDOVER: State.SECOND,
        Goal.STEP_DOWN: State.WAIT,
        Goal.STOP: State.STOP,
    }[goal]
    action = {
        Goal.RESTART: "stopstart",
        Goal.HANDOVER: "stop",
        Goal.STEP_DOWN: "stopwait",
        Goal.STOP: "stop",
    }[goal]
    new = replace(v, phase=Phase.STOPPING, goal=goal, why=reason)
    return _t(v, new, reason, *before, _script("stop_prim", v.state, target, action))


def _after_stop_prim(v: NodeView, ok: bool) -> Transition:
    note: tuple[Action, ...] = ()
    if not ok:
        note = (Log(LogLevel.ERROR, "stop_prim failed, also when forced: releasing anyway"),)
    release = (ReleaseVip(), Unmount())
    goal = v.goal
    if goal is Goal.HANDOVER and not (v.peer is not None and v.peer.synced_second):
        note += (Log(LogLevel.WARNING, "swap abandoned: the peer is no longer a synced SECOND"),)
        goal = Goal.RESTART
    if goal is Goal.RESTART:
        new = replace(v, phase=Phase.STARTING, goal=None, why="restarting the application")
        start = _script("start_prim", v.state, v.state, "start")
        return _t(v, new, "stop_prim done: starting the application again", *note, start)
    v = replace(v, witness=None)  # a question asked as primary means nothing once released
    if goal is Goal.HANDOVER:
        v2, persist = _persist(v, Copy.MIRROR)
        new = replace(
            v2,
            state=State.SECOND,
            phase=Phase.HANDOVER,
            goal=None,
            forced=False,
            why=f"swap: handing the primary role to {v.policy.peer}",
        )
        start_second = _script("start_second", v.state, State.SECOND, "start")
        acts = (*note, *release, *persist, StartReplica(), start_second)
        return _t(v, new, new.why, *acts)
    if goal is Goal.STEP_DOWN:
        new = replace(v, state=State.WAIT, phase=Phase.BLOCKED, goal=None, forced=False)
        return _t(v, new, v.why, *note, *release)
    new = replace(v, state=State.STOP, phase=Phase.READY, goal=None, forced=False)
    return _arrive_stop(v, new, v.why, (*note, *release))


def _arrive_stop(old: NodeView, new: NodeView, reason: str, acts: tuple[Action, ...]) -> Transition:
    poststop = _script("poststop", old.state, State.STOP, "stop")
    new = replace(new, witness=None, why="stopped")
    if not new.stopstart:
        return _t(old, new, reason, *acts, poststop)
    again = _start(replace(new, stopstart=False), "stopstart: starting again")
    return _t(old, again.new_state, reason, *acts, poststop, *again.actions)


def _stop(v: NodeView, reason: str) -> Transition:
    match v.state:
        case State.STOP:
            return _stay(v, "already stopped")
        case State.WAIT:
            return _arrive_stop(v, replace(v, state=State.STOP, phase=Phase.READY), reason, ())
        case State.SECOND:
            stop_second = _script("stop_second", v.state, State.STOP, "stop")
            new = replace(v, state=State.STOP, phase=Phase.READY)
            return _arrive_stop(v, new, reason, (StopReplica(), stop_second))
        case State.ALONE | State.PRIM:
            return _leave_primary(v, Goal.STOP, reason)
        case _:
            assert_never(v.state)


# --------------------------------------------------------------------------- commands


def _prim(v: NodeView, force: bool) -> Transition:
    if v.state.primary:
        return _refuse(v, f"already {v.state}")
    if v.state is State.SECOND:
        return _refuse(v, "this node is SECOND: use swap, or stop it first")
    p = v.peer
    if p is not None and p.serving:
        return _refuse(v, f"{p.name} is already {p.state}")
    if p is not None and _would_take_over(v, p):
        return _refuse(
            v,
            f"{p.name} is {p.state} with an up-to-date copy and would become primary too: "
            f"stop it first, or run prim there",
        )
    if not v.copy.uptodate and not force:
        return _refuse(
            v,
            "this node's copy is not up to date: confirm with the force option to make it "
            "the reference (the peer's changes since then are lost)",
        )
    before: list[Action] = []
    if v.state is State.STOP:
        before.append(_script("prestart", v.state, State.ALONE, "start"))
    forced = not v.copy.uptodate
    if forced:
        before.append(
            Log(
                LogLevel.WARNING,
                "forced prim: a copy that is not up to date "
                "becomes the reference; the next resync is full",
            )
        )
    reason = "prim forced by the operator" if forced else "prim requested"
    return _enter_primary(v, State.ALONE, reason, *before, forced=forced)


def _would_take_over(v: NodeView, p: PeerInfo) -> bool:
    """Would the peer become primary by itself, on seeing this node not primary?"""
    if p.synced_second:
        return True  # it fails over as soon as it sees its primary gone
    if p.state is State.WAIT and p.copy.uptodate:
        winner, _ = elect(v.announce(), p, v.policy.defaultprim)
        return winner == p.name
    return False


def _second(v: NodeView, fullsync: bool) -> Transition:
    if v.state not in (State.STOP, State.WAIT):
        return _refuse(v, f"this node is {v.state}: stop it first")
    p = v.peer
    if p is None or not p.serving:
        seen = "absent" if p is None else str(p.state)
        return _refuse(v, f"the peer is not PRIM or ALONE ({seen})")
    before: tuple[Action, ...] = ()
    if v.state is State.STOP:
        before = (_script("prestart", v.state, State.SECOND, "start"),)
    return _become_second(v, f"second: joining {p.name}", fullsync or p.forced, *before)


def _swap(v: NodeView) -> Transition:
    if v.state is State.SECOND:
        return _refuse(v, "swap is carried out by the PRIM node: send it there")
    if v.state is not State.PRIM or v.phase is not Phase.READY:
        return _refuse(v, f"swap needs a running PRIM ({v.state}, {v.phase})")
    p = v.peer
    if (
        p is None
        or p.state is not State.SECOND
        or p.phase is not Phase.READY
        or not p.synced_second
        or v.held
    ):
        return _refuse(v, "the peer is not a synchronised SECOND")
    return _leave_primary(v, Goal.HANDOVER, f"swap: handing over to {p.name}")


def _restart(v: NodeView, reason: str, command: bool) -> Transition:
    if v.held:  # stop_prim would fence the held writes, and start_prim find them failing
        why = "replication lost: writes are held until a heartbeat or the witness answers"
        return _refuse(v, why) if command else _stay(v, f"{reason}: deferred, {why}")
    if v.state.primary and v.phase is Phase.READY:
        return _leave_primary(v, Goal.RESTART, reason)
    if v.state is State.SECOND:
        return _stay(
            v,
            reason,
            _script("stop_second", v.state, v.state, "stopstart"),
            _script("start_second", v.state, v.state, "start"),
        )
    if command:
        return _refuse(v, f"nothing to restart in {v.state} ({v.phase})")
    return _stay(v, f"{reason}: ignored in {v.state} ({v.phase})")


def _loop(
    v: NodeView, now: float, reason: str, action: Literal["restart", "stopstart"]
) -> Transition:
    """A restart/stopstart asked by a checker or a failed resync, bounded by maxloop."""
    if v.state is State.STOP:
        return _stay(v, f"{reason}: ignored, module stopped")
    window = v.policy.loop_interval
    if window > 0:
        recent = tuple(t for t in v.loops if now - t < window)
        if len(recent) >= v.policy.maxloop:
            why = (
                f"Action stop called by maxloop: {reason} "
                f"({len(recent)} actions within {window:g} s)"
            )
            return _stop(replace(v, loops=(), stopstart=False), why)
        v = replace(v, loops=(*recent, now))
    if action == "restart":
        return _restart(v, reason, command=False)
    return _stop(replace(v, stopstart=True), reason)


# --------------------------------------------------------------------------- peer events


def _peer_seen(v: NodeView, p: PeerInfo) -> Transition:
    if p.name == v.policy.node:
        return _stay(v, "ignored: a heartbeat with this node's own name")
    prev = v.peer
    learnt = max(v.durable.term, p.term)
    v = replace(v, peer=p, durable=replace(v.durable, term=learnt), witness=None)
    match v.state:
        case State.STOP:
            v2, acts = _note_peer_copy(v, p)
            return _stay(v2, f"peer {p.name} is {p.state}", *acts)
        case State.WAIT:
            v2, acts = _note_peer_copy(v, p)
            return _wait_decide(v2, p, acts)
        case State.SECOND:
            return _second_sees(v, p)
        case State.ALONE | State.PRIM:
            return _primary_sees(v, p, prev)
        case _:
            assert_never(v.state)


def _note_peer_copy(v: NodeView, p: PeerInfo) -> tuple[NodeView, tuple[Action, ...]]:
    """A node that is not running a role learns from the peer that its copy fell behind:
    the peer is primary (its copy is the reference now), or ran alone while ours is only
    MIRROR (it changed things since), or both ran alone (a split brain while one of them
    was down) and `elect` keeps the peer's copy, as when two primaries meet."""
    if v.copy is Copy.STALE:
        return v, ()
    behind = p.serving or (p.copy is Copy.SOLE and v.copy is Copy.MIRROR)
    why = f"{p.name} is {p.state} with a {p.copy} copy"
    if not behind and p.copy is Copy.SOLE and v.copy is Copy.SOLE:
        winner, reason = elect(v.announce(), p, v.policy.defaultprim)
        behind = winner == p.name
        why = f"both copies ran alone (split brain), {p.name}'s is kept: {reason}"
    if not behind:
        return v, ()
    v2, persist = _persist(v, Copy.STALE)
    return v2, (*persist, Log(LogLevel.WARNING, f"copy no longer up to date: {why}"))


def _wait_decide(v: NodeView, p: PeerInfo, acts: tuple[Action, ...]) -> Transition:
    if p.state.primary:
        if not p.serving:
            return _to_wait(
                v, f"waiting: {p.name} is leaving the primary role", *acts, blocked=False
            )
        return _become_second(v, f"{p.name} is {p.state}: joining as SECOND", p.forced, *acts)
    if p.state is State.SECOND:
        return _to_wait(
            v, f"waiting: {p.name} is a SECOND of an earlier primary", *acts, blocked=False
        )
    winner, why = elect(v.announce(), p, v.policy.defaultprim)
    if winner is None:
        return _to_wait(
            v,
            "neither copy is up to date (rfs_notuptodate_server): run `hafs prim` on the "
            "node with the good data",
            *acts,
        )
    if winner == v.policy.node:
        return _enter_primary(v, State.ALONE, f"elected against {p.name} ({p.state}): {why}", *acts)
    if p.state is State.WAIT:
        return _to_wait(
            v, f"{p.name} becomes primary ({why}): waiting to join it", *acts, blocked=False
        )
    return _to_wait(
        v,
        f"{p.name} has the better claim ({why}) but is stopped: start it, or run `hafs prim` here",
        *acts,
    )


def _second_sees(v: NodeView, p: PeerInfo) -> Transition:
    if v.phase is Phase.HANDOVER:
        if p.serving and p.state is State.PRIM:
            new = replace(v, phase=Phase.READY, why=f"swap done: {p.name} is PRIM")
            return _stay(new, new.why, Log(LogLevel.INFO, new.why))
        if p.state is State.ALONE:  # it took over without mirroring to us: we are behind
            return _resync(v, f"{p.name} became ALONE instead of PRIM: resynchronising")
        if p.state is State.SECOND or p.state.primary:
            return _stay(v, f"swap: waiting for {p.name} to take over")
        return _enter_primary(
            v, State.ALONE, f"swap: {p.name} did not take over ({p.state}): taking it back"
        )
    if p.state is State.ALONE and v.phase is not Phase.RESYNCING:
        # Even when it is leaving: it may have written alone before, and taking over from
        # this copy would lose that.
        return _resync(v, f"{p.name} went on ALONE: this copy is behind, resynchronising")
    if p.serving:
        return _stay(v, f"{p.name} is {p.state}")
    if p.state.primary:
        return _stay(v, f"{p.name} is leaving the primary role")
    if p.state is State.SECOND and p.phase is Phase.HANDOVER and v.synced:
        return _enter_primary(
            v, State.PRIM, f"swap: {p.name} handed over the primary role", copy=Copy.MIRROR
        )
    v2, behind = _note_peer_copy(v, p)
    if behind:  # it ran ALONE since our copy was synchronised: the heartbeat saying so was lost
        why = f"{p.name} is {p.state} with changes this copy lacks: waiting for it"
        return _to_wait(v2, why, *behind, blocked=False)
    return _primary_gone(v, announced=True, why=f"{p.name} is {p.state}")


def _resync(v: NodeView, reason: str) -> Transition:
    v2, persist = _persist(v, Copy.STALE)
    new = replace(v2, phase=Phase.RESYNCING, why=reason)
    return _stay(new, reason, *persist, StartResync(full=False), Log(LogLevel.INFO, reason))


def _primary_gone(v: NodeView, announced: bool, why: str) -> Transition:
    """A SECOND's primary left (announced) or its heartbeats timed out."""
    if v.witness is not None:
        return _stay(v, f"{why}: waiting for the witness")
    if not v.synced:
        return _to_wait(
            v,
            f"{why} during the resync: this copy is not up to date, waiting "
            f"for the up-to-date peer",
        )
    if not v.policy.failover:
        return _to_wait(v, f"{why}: failover is off, run `hafs prim` to take over")
    if not announced and v.policy.witness:
        new = replace(v, witness=Witness.FAILOVER, why=f"{why}: asking the witness")
        return _stay(new, new.why, AskWitness())
    reason = (
        "Action alone called by heart: remote stop"
        if announced
        else ("Remote state UNKNOWN: failover")
    )
    return _enter_primary(v, State.ALONE, f"{reason} ({why})", *_no_witness_warning(v))


def _primary_sees(v: NodeView, p: PeerInfo, prev: PeerInfo | None) -> Transition:
    peer = p.name
    if p.state.primary:
        if not p.serving:
            if v.state is State.PRIM:
                return _prim_to_alone(v, f"{peer} is leaving the primary role")
            return _stay(v, f"{peer} is leaving the primary role")
        winner, why = elect(v.announce(), p, v.policy.defaultprim)
        if winner != v.policy.node:
            v2, persist = _persist(v, Copy.STALE)
            warn = Log(LogLevel.WARNING, f"split brain with {peer}: {why}")
            return _leave_primary(
                v2,
                Goal.STEP_DOWN,
                f"Split brain recovery: exiting alone ({why})",
                *persist,
                warn,
            )
        stays = f"split brain with {peer}: staying primary ({why})"
        if v.state is State.PRIM:
            return _prim_to_alone(v, stays, Log(LogLevel.WARNING, stays))
        first = prev is None or not prev.serving  # warn once, not at every heartbeat
        return _stay(v, stays, *((Log(LogLevel.WARNING, stays),) if first else ()))
    if p.state is State.SECOND:
        if v.state is State.PRIM and v.held:
            return _prim_to_alone(v, f"replication to {peer} lost, {peer} alive: keeps running")
        if v.state is State.ALONE:
            if p.phase is Phase.RESYNCING and not v.leaving:
                new = replace(v, state=State.PRIM, why=f"{peer} is SECOND: mirroring")
                return _t(v, new, new.why, SetMountMode(MountMode.MIRROR))
            return _stay(v, f"waiting for {peer} to resynchronise")
        return _prim_sees_second(v, p, prev)
    if v.state is State.PRIM:
        return _prim_to_alone(v, f"{peer} is {p.state}: keeps running without it")
    return _stay(v, f"{peer} is {p.state}")


def _prim_sees_second(v: NodeView, p: PeerInfo, prev: PeerInfo | None) -> Transition:
    if not (p.synced_second and p.phase is Phase.READY):
        return _stay(v, f"{p.name} is SECOND ({p.phase})")
    v2, persist = _persist(v, Copy.MIRROR)
    v2 = replace(v2, forced=False)
    just_synced = (
        prev is not None and prev.state is State.SECOND and (prev.phase is Phase.RESYNCING)
    )
    if (
        just_synced
        and v.policy.defaultprim == p.name
        and v.phase is Phase.READY
        and v.state is State.PRIM
    ):
        return _leave_primary(v2, Goal.HANDOVER, "Transition SWAP from defaultprim", *persist)
    return _stay(v2, f"{p.name} is a synchronised SECOND", *persist)


def _peer_lost(v: NodeView, announced: bool) -> Transition:
    prev = v.peer
    v = replace(v, peer=None)
    why = f"{v.policy.peer} stopped" if announced else "Remote state UNKNOWN"
    match v.state:
        case State.STOP:
            return _stay(v, why)
        case State.WAIT:
            if v.witness is not None:
                return _stay(v, f"{why}: waiting for the witness")
            return _absent(v, announced, why)
        case State.SECOND:
            return _primary_gone(v, announced, why)
        case State.ALONE | State.PRIM:
            if v.witness is not None:  # a repeated loss must not bypass the question
                return _stay(v, f"{why}: waiting for the witness")
            # A PRIM's SECOND may have finished its resync in a heartbeat this node never
            # received, so PRIM always asks; an ALONE node's peer cannot be synchronised.
            could_take_over = v.state is State.PRIM or (prev is not None and prev.synced_second)
            if could_take_over and not announced and v.policy.witness:
                new = replace(v, witness=Witness.KEEP, why=f"{why}: asking the witness")
                return _stay(new, new.why, AskWitness())
            if v.state is State.PRIM:
                return _prim_to_alone(
                    v, f"{why}: keeps running without it", *_no_witness_warning(v)
                )
            return _stay(v, why)
        case _:
            assert_never(v.state)


def _absent(v: NodeView, announced: bool, why: str) -> Transition:
    """A WAIT node with no peer in sight."""
    match v.copy:
        case Copy.STALE:
            return _to_wait(
                v,
                f"{why}: this copy is not up to date and no up-to-date peer is "
                f"seen (rfs.uptodate down): waiting for it, or `hafs prim` with "
                f"the force option",
            )
        case Copy.MIRROR:
            return _to_wait(
                v,
                f"{why}: this copy was mirrored and the peer may have gone on "
                f"alone since: waiting for it, or `hafs prim` to start anyway",
            )
        case Copy.SOLE:
            if v.policy.witness and not announced:
                new = replace(
                    v, phase=Phase.PEER, witness=Witness.START, why=f"{why}: asking the witness"
                )
                return _t(v, new, new.why, AskWitness())
            return _enter_primary(v, State.ALONE, f"{why}: this copy is up to date")
        case _:
            assert_never(v.copy)


def _witness_result(v: NodeView, reachable: bool) -> Transition:
    purpose = v.witness
    if purpose is None:
        return _stay(v, "witness answer ignored: no question pending")
    asker = {Witness.START: v.state is State.WAIT, Witness.FAILOVER: v.state is State.SECOND}
    if not asker.get(purpose, v.state.primary and not v.leaving):
        return _stay(replace(v, witness=None), f"witness answer ignored: {v.state} now")
    v = replace(v, witness=None)
    peer_back = v.peer is not None
    if peer_back:
        return _stay(v, "witness answer ignored: the peer is back")
    if purpose is Witness.START:
        if reachable and v.copy is Copy.SOLE:
            return _enter_primary(
                v, State.ALONE, "peer absent, witness reachable: copy is up to date"
            )
        return _to_wait(
            v,
            "peer absent and witness unreachable (splitbrain_failure): not "
            "going ALONE; `hafs prim` to force",
        )
    if purpose is Witness.FAILOVER:
        if reachable and v.synced:
            return _enter_primary(
                v, State.ALONE, "Remote state UNKNOWN, witness reachable: failover"
            )
        return _to_wait(v, "peer and witness unreachable (splitbrain_failure): not taking over")
    if reachable:
        if v.state is State.PRIM:
            return _prim_to_alone(v, "peer lost, witness reachable: keeps running")
        return _stay(v, "peer lost, witness reachable: stays ALONE")
    return _leave_primary(
        replace(v, held=False),
        Goal.STEP_DOWN,
        "peer and witness unreachable (splitbrain_failure): stopping the application",
        SetMountMode(MountMode.FENCED),
    )


# --------------------------------------------------------------------------- local events


def _lease_lost(v: NodeView, detail: str) -> Transition:
    """ALONE acknowledges changes on its own word: without the lease it must stop before the
    witness can give the role to the peer. A PRIM's changes wait for its SECOND anyway."""
    if v.state is not State.ALONE or v.leaving:
        return _stay(v, f"witness lease lost ({detail}): nothing to do in {v.state}")
    return _leave_primary(
        replace(v, held=False),
        Goal.STEP_DOWN,
        f"witness lease lost ({detail}): stopping the application",
        SetMountMode(MountMode.FENCED),
    )


def _replication_lost(v: NodeView, detail: str) -> Transition:
    """The mount stopped replicating and holds the calls (fencing, see the module doc)."""
    if v.state is not State.PRIM:
        return _stay(v, "replication lost: not PRIM, nothing to do")
    why = f"replication to {v.policy.peer} lost: {detail}"
    if not v.policy.witness:
        return _prim_to_alone(v, why)
    if v.leaving:  # the application is being stopped for good: nothing to wait for
        return _stay(v, f"{why}: fenced while leaving", SetMountMode(MountMode.FENCED))
    if v.held:
        return _stay(v, f"{why} (already holding)")
    new = replace(
        v, held=True, why=f"{why}: holding writes until a heartbeat or the witness answers"
    )
    return _stay(new, new.why)


def _resync_finished(v: NodeView, ok: bool, now: float, detail: str) -> Transition:
    if v.state is not State.SECOND or v.phase is not Phase.RESYNCING:
        return _stay(v, "resync result ignored: not resynchronising")
    if not ok:
        return _loop(v, now, f"resync failed: {detail}".rstrip(": "), "stopstart")
    v2, persist = _persist(v, Copy.MIRROR)
    new = replace(v2, phase=Phase.READY, why="synchronised with the primary")
    return _stay(new, new.why, *persist, Log(LogLevel.INFO, "resync finished: up to date"))


def _script_result(v: NodeView, script: str, ok: bool) -> Transition:
    if v.state.primary and v.phase is Phase.STARTING and script == "start_prim":
        if ok:
            new = replace(v, phase=Phase.READY, why=f"{v.state}: application running")
            return _stay(new, "start_prim done")
        fail = Log(LogLevel.ERROR, "start_prim failed: stopping the module")
        return _leave_primary(v, Goal.STOP, "start_prim failed", fail)
    if v.state.primary and v.phase is Phase.STOPPING and script == "stop_prim":
        return _after_stop_prim(v, ok)
    if not ok:
        return _stay(v, f"{script} failed", Log(LogLevel.ERROR, f"{script} failed"))
    return _stay(v, f"{script} done")


def _action_failed(v: NodeView, action: str, detail: str) -> Transition:
    reason = f"{action} failed: {detail}".rstrip(": ")
    log = Log(LogLevel.ERROR, reason)
    if v.state is State.STOP or v.leaving:
        return _stay(v, reason, log)
    t = _stop(replace(v, stopstart=False), reason)
    return replace(t, actions=(log, *t.actions))
