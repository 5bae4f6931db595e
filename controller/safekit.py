"""`$SAFE/safekit`: SafeKit's command, as the seed's scripts call it.

    $SAFE/safekit printi|printw|printe [-m MODULE] MESSAGE...
    $SAFE/safekit stop [-m MODULE] [-i IDENT]
    $SAFE/safekit state [-m MODULE]

Inside a script `-m` may be left out: SAFEMODULE names the module (SafeKit's rule). The
print verbs append to the module log of the node whose root is $HAFS_ROOT, with SAFENODE as
the node name; both are set by the script environment (controller.scripts), and the command
file written by `install_safekit_command` pins HAFS_ROOT to its own node. SafeKit documents
only printi and printe, but the seed's scripts call printw, so it is here too.

stop and state ask the node's daemon over its control socket. `stop -i IDENT` is how a script
gives up (the template's start_prim runs `safekit stop -i start_prim`); the reason the daemon
logs carries the identity.

Exit codes: 0 done, 1 the daemon refused or could not be reached, 2 bad usage.
"""

from __future__ import annotations

import getopt
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from controller.modulelog import ModuleLog
from controller.paths import Layout

PRINT_LEVELS = {"printi": "I", "printw": "W", "printe": "E"}
VERBS = (*PRINT_LEVELS, "stop", "state")


class UsageError(Exception):
    """Bad arguments: exit 2."""


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] not in _HANDLERS:
        what = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"safekit: {what}; supported: {', '.join(VERBS)}", file=sys.stderr)
        return 2
    verb, rest = argv[0], list(argv[1:])
    try:
        return _HANDLERS[verb](verb, rest)
    except (UsageError, getopt.GetoptError) as e:
        print(f"safekit {verb}: {e}", file=sys.stderr)
        return 2


def _print(verb: str, args: list[str]) -> int:
    # getopt stops at the first word that is not an option, so a message may contain "-x".
    opts, words = getopt.getopt(args, "m:")
    module = _module(dict(opts))
    message = " ".join(words)
    if not message:
        raise UsageError("no message")
    node = os.environ.get("SAFENODE") or os.uname().nodename
    ModuleLog(Layout.from_env().module_log(module), node).write(PRINT_LEVELS[verb], message)
    return 0


def _stop(verb: str, args: list[str]) -> int:
    opts = _options(args, "m:i:")
    module = _module(opts)
    ident = opts.get("-i")
    reason = f"stop -i {ident}" if ident else "stop (safekit command)"
    reply, code = _ask("stop", module, reason=reason)
    if code == 0 and reply.get("message"):
        print(reply["message"])
    return code


def _state(verb: str, args: list[str]) -> int:
    module = _module(_options(args, "m:"))
    reply, code = _ask("state", module)
    if code == 0:
        state = reply.get("state")
        print(f"{module}: {state if state is not None else json.dumps(reply, sort_keys=True)}")
    return code


_HANDLERS: dict[str, Callable[[str, list[str]], int]] = {
    **dict.fromkeys(PRINT_LEVELS, _print),
    "stop": _stop,
    "state": _state,
}


def _options(args: list[str], spec: str) -> dict[str, str]:
    opts, extra = getopt.getopt(args, spec)
    if extra:
        raise UsageError(f"unexpected argument {extra[0]!r}")
    return dict(opts)


def _module(opts: dict[str, str]) -> str:
    module = opts.get("-m") or os.environ.get("SAFEMODULE")
    if not module:
        raise UsageError("no module: give -m MODULE, or call it from a module's script")
    return module


def _ask(cmd: str, module: str, **args: Any) -> tuple[dict[str, Any], int]:
    """One request to the daemon: (its reply, exit code)."""
    # Imported here: the print verbs must work without the control client.
    from controller.control import ControlError, request

    try:
        reply = request(Layout.from_env(), cmd, module=module, **args)
    except ControlError as e:
        print(f"safekit {cmd}: {e}", file=sys.stderr)
        return {}, 1
    if reply.get("ok") is False:  # the daemon's refusal: {"ok": false, "message": why}
        print(f"safekit {cmd}: {reply.get('message', 'refused')}", file=sys.stderr)
        return reply, 1
    return reply, 0


def install_safekit_command(layout: Layout, python: str = sys.executable) -> Path:
    """Write `$SAFE/safekit` for this node (the daemon does at start) and return its path.

    It pins HAFS_ROOT: the command in one node's home speaks for that node, whatever the
    caller's environment says (two nodes share a machine on the rig). `-P` keeps the
    script's working directory (the module's bin/) off sys.path.
    """
    target = layout.safekit_command
    target.parent.mkdir(parents=True, exist_ok=True)
    text = (
        "#!/bin/sh\n"
        "# SafeKit's command for module scripts, written by the hafs daemon at start.\n"
        f"HAFS_ROOT={shlex.quote(str(layout.root))}\n"
        "export HAFS_ROOT\n"
        f'exec {shlex.quote(python)} -P -m controller.safekit "$@"\n'
    )
    # Written aside and renamed: a script calling it meanwhile sees the old or the new one.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".safekit.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return target


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
