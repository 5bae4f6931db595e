"""tools/rig: drive the persistent two-node MySQL rig from the shell (docs/rig.md).

Exit codes: 0 done; 1 failed (the message says why); 2 bad usage, or the rig is not in a
state the command needs. `exec` exits with the command's own code.
"""

from __future__ import annotations

import argparse
import os
import sys

from tools.riglib.netns import LabError
from tools.riglib.node import RigError
from tools.riglib.rig import ALL, MODULE, NODES, PREFIX, RIG_DIR, PersistentRig, down, say, up


def _exec(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise RigError("exec NODE -- CMD...: no command")
    argv, env = PersistentRig.current().exec_argv(args.node, cmd)
    os.execvpe(argv[0], argv, env)


def _status(_: argparse.Namespace) -> int:
    rig = PersistentRig.current()
    if not rig.is_up():
        say("down")
        return 3
    present = ", ".join(PREFIX + n for n in rig.lab.nodes) or "none"
    say(f"namespaces: {present}; state in {RIG_DIR}")
    for name in NODES:
        if name not in rig.lab.nodes:
            continue
        node = rig.node(name)
        pid = node.init_pid()
        if pid is None:
            say(f"{name}: off (tools/rig boot {name})")
            continue
        reply = node.hafs("state", "-m", MODULE, check=False)
        say(f"{name}: init pid {pid}")
        print((reply.stdout or reply.stderr).rstrip(), flush=True)
    cuts = rig.cut_pairs()
    say("cuts: " + (", ".join("-".join(p) for p in cuts) if cuts else "none"))
    return 0


def _up(_: argparse.Namespace) -> int:
    if PersistentRig.current().is_up():
        say(f"the rig is up, or half-made ({RIG_DIR}): tools/rig down first")
        return 2
    try:
        up()
    except BaseException:
        say("up failed: the rig is left as it is for a look; tools/rig down removes it")
        raise
    return 0


def _down(_: argparse.Namespace) -> int:
    problems = down()
    for problem in problems:
        say(f"down: {problem}")
    if not problems:
        say("down: nothing left")
    return 1 if problems else 0


def _kill(args: argparse.Namespace) -> int:
    PersistentRig.current().kill(args.node)
    return 0


def _boot(args: argparse.Namespace) -> int:
    PersistentRig.current().boot(args.node)
    return 0


def _cut(args: argparse.Namespace) -> int:
    PersistentRig.current().cut(args.node1, args.node2)
    return 0


def _heal(_: argparse.Namespace) -> int:
    PersistentRig.current().heal()
    return 0


def _loss(args: argparse.Namespace) -> int:
    rig = PersistentRig.current()
    rig.lab.loss(rig.host(args.node), args.percent)
    return 0


def _rate(args: argparse.Namespace) -> int:
    rig = PersistentRig.current()
    limit = None if args.rate in ("0", "off", "none") else args.rate
    rig.lab.rate(rig.host(args.node), limit)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="tools/rig", description=__doc__.split("\n\n")[0])
    sub = top.add_subparsers(dest="command", required=True)
    node_help = f"one of {', '.join(ALL)}"

    def command(name: str, run: object, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.set_defaults(run=run)
        return p

    command("up", _up, "build the rig; node1 PRIM, node2 SECOND, MariaDB on the VIP")
    command("down", _down, "remove every namespace, process, mount and file of the rig")
    command("status", _status, "namespaces, nodes' states, cuts (exit 3: the rig is down)")
    p = command("exec", _exec, "run CMD inside NODE's namespaces (and its hafs root)")
    p.add_argument("node", choices=ALL, help=node_help)
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD...")
    p = command("kill", _kill, "SIGKILL every process of NODE at once (power loss)")
    p.add_argument("node", choices=ALL)
    p = command("boot", _boot, "start NODE's daemon again, as its boot would")
    p.add_argument("node", choices=NODES)
    p = command("cut", _cut, "drop all traffic between NODE1 and NODE2, both ways")
    p.add_argument("node1", choices=ALL)
    p.add_argument("node2", choices=ALL)
    command("heal", _heal, "undo every cut")
    p = command("loss", _loss, "drop PERCENT %% of NODE's packets at random (0: none)")
    p.add_argument("node", choices=ALL)
    p.add_argument("percent", type=float)
    p = command("rate", _rate, "limit NODE's bandwidth each way (tc units: 1mbit; off)")
    p.add_argument("node", choices=ALL)
    p.add_argument("rate")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if os.geteuid() != 0:
        say("needs root (namespaces, mounts)")
        return 2
    try:
        code: int = args.run(args)
    except (RigError, LabError) as e:
        say(str(e))
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
