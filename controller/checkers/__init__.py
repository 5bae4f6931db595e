"""Checkers: small probes of one shape, polled by one runner (keepalived's check/ tree).

    class Checker(Protocol):
        name: str; interval: float
        async def check(self) -> CheckResult

A checker only observes: it returns CheckResult(ok, detail) and never acts. `run_checker`
polls it and hands failures to a callback, which the daemon turns into an event for the
state machine (restart, stopstart, wait ...): decisions stay out of effect code.

One file per checker: process.py (errd's `<proc>`), interface.py (`<interface check="on">`),
witness.py (`<splitbrain>`, asked only when every heartbeat is lost, so it is a query and
not a polled checker).

When does the callback fire? At every failing poll, once `fall` polls in a row failed, as
SafeKit's errd acts at each detection and keepalived's checkers do (fall defaults to 1, as
errd has no such setting). There is no "once per failure episode" latch: the action is
what ends the episode. While the daemon acts on a failure (runs the scripts of a restart or
stopstart) it cancels the checker task, as SafeKit switches errd monitoring off around the
scripts, and starts it again afterwards; the first poll then sees the restarted process.
A check that cannot finish in time (`timeout`, by default its interval) is a failure.

Checkers turn the errors they expect (no such process, no such link) into failed results;
anything else is a bug and propagates into the daemon's nursery instead of being taken for
a failed application.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, Protocol

import trio


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str


class Checker(Protocol):
    @property
    def name(self) -> str:
        """What is checked, for logs and events: "errd.mysqld", "intf.eth0" ..."""
        ...

    @property
    def interval(self) -> float:
        """Seconds between polls."""
        ...

    async def check(self) -> CheckResult: ...


OnFailure = Callable[[Checker, CheckResult], None]


async def poll_once(checker: Checker, timeout: float | None = None) -> CheckResult:
    """One check, bounded by `timeout` (the checker's interval by default)."""
    limit = checker.interval if timeout is None else timeout
    with trio.move_on_after(limit):
        return await checker.check()
    return CheckResult(False, f"{checker.name}: no answer within {limit:g} s")


async def run_checker(
    checker: Checker,
    on_failure: OnFailure,
    *,
    fall: int = 1,
    timeout: float | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Poll `checker` every interval until cancelled; see the module docstring.

    `on_failure` is called synchronously from this task (hand the failure over, e.g. with
    a memory channel's send_nowait; do not block). `nursery.start(run_checker, ...)`
    returns after the first poll, so the caller knows the initial state has been seen.
    """
    if fall < 1:
        raise ValueError(f"fall must be at least 1, not {fall}")
    failures = 0
    deadline = trio.current_time()
    started = False
    while True:
        result = await poll_once(checker, timeout)
        failures = 0 if result.ok else failures + 1
        if failures >= fall:
            on_failure(checker, result)
        if not started:
            task_status.started()
            started = True
        # Fixed-rate polling: a slow check does not push every later poll back.
        deadline = max(deadline + checker.interval, trio.current_time())
        await trio.sleep_until(deadline)
