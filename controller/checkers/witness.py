"""The split-brain witness (`<splitbrain exec="ping" arg="ip1 ip2">`).

Asked only when every heartbeat is lost: the node that reaches a witness may go ALONE, the
other waits (I8). One `ping -c 1` per witness, all at once, answered as soon as one replies
and in any case within `timeout`, so a failover never waits on a dead witness.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

# Types only: importing the config module pulls in xmlschema, a second at start-up.
if TYPE_CHECKING:
    from controller.config import IPAddress


async def reachable(witnesses: Sequence[str | IPAddress], timeout: float = 2.0) -> bool:
    """True if any witness answers a ping within `timeout` seconds."""
    if not witnesses:
        return False
    ping = shutil.which("ping")
    if ping is None:
        raise FileNotFoundError("ping: not found (install iputils-ping)")
    answered = False

    async def one(addr: str, cancel_scope: trio.CancelScope) -> None:
        nonlocal answered
        argv = [ping, "-n", "-q", "-c", "1", "-W", f"{timeout:g}", addr]
        proc = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
        if proc.returncode == 0:
            answered = True
            cancel_scope.cancel()  # one is enough: stop waiting for the others

    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:
            for w in witnesses:
                nursery.start_soon(one, str(w), nursery.cancel_scope)
    return answered
