"""The `hafs` command: SafeKit's verbs for a node's modules, on top of the data path's `hafs fs`.

Exit codes: 0 done; 1 refused or failed (the message says why), or with --wait: the state
did not settle in time, or settled red (STOP, WAIT blocked) after a command meant to run the
module; 2 bad usage, or the daemon is not running.

`hafs verify -m M` exits as diff(1) does: 0 identical, 1 differences, 2 not verified.

`hafs state -m M -lq` exits with the state's code instead: STOP 0, WAIT 1, ALONE 2, PRIM 3,
SECOND 4 (SafeKit's `safekit state -lq`). Its errors exit 10 and up, so a script never takes
one for a state: 10 the daemon cannot be reached; 11 no such module, or not exactly one
module (give -m M). The message goes to stderr.
"""

from __future__ import annotations

import enum
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from controller import control
from controller.modulelog import ModuleLog
from controller.paths import ROOT_ENV, Layout
from hafs import verify
from hafs.cli import app

ModuleOpt = Annotated[str, typer.Option("-m", "--module", help="the module's name")]
WaitOpt = Annotated[
    float, typer.Option("--wait", help="seconds to wait for the state to settle (0: do not)")
]
COLOUR_CODES = {"red": "31", "orange": "33", "green": "32", "magenta": "35"}
# A command's reply comes once its transition's actions are done (mounts, the VIP ...).
COMMAND_TIMEOUT = 600.0
QUERY_TIMEOUT = 30.0  # state, ping: answered at once
# `state -lq` errors: never a state's code (0-4)
LQ_UNREACHABLE = 10
LQ_NO_MODULE = 11


@app.callback()
def main(
    root: Annotated[
        Path | None,
        typer.Option("--root", envvar=ROOT_ENV, help="the node's root (default /)"),
    ] = None,
) -> None:
    """hafs: two-node high availability with synchronous file replication."""
    if root is not None:
        os.environ[ROOT_ENV] = str(root)  # every path below, scripts and data processes


def _layout() -> Layout:
    return Layout.from_env()


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"hafs: {message}", err=True)
    raise typer.Exit(code)


def _ask(
    cmd: str,
    module: str | None = None,
    timeout: float = QUERY_TIMEOUT,
    unreachable: int = 2,
    **args: Any,
) -> dict[str, Any]:
    """The daemon's reply; exits `unreachable` when the daemon cannot be reached."""
    try:
        return control.request(_layout(), cmd, module, timeout=timeout, **args)
    except control.ControlError as e:
        _fail(str(e), unreachable)


# ---------------------------------------------------------------------- the daemon


@app.command()
def daemon(
    node: Annotated[str | None, typer.Option(help="this node's name in cluster.xml")] = None,
    verbose: bool = False,
) -> None:
    """Run this node's daemon in the foreground (systemd: hafs.service)."""
    from controller.daemon import DaemonError, run

    try:
        run(_layout(), node, verbose)
    except DaemonError as e:
        _fail(str(e), 2)


# ---------------------------------------------------------------------- state


@app.command()
def state(
    module: Annotated[str | None, typer.Option("-m", "--module")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
    code_only: Annotated[
        bool, typer.Option("-lq", help="print nothing; exit with the state's code")
    ] = False,
) -> None:
    """Both nodes' states and colours, for one module or all."""
    reply = _ask("state", module, unreachable=LQ_UNREACHABLE if code_only else 2)
    if not reply.get("ok"):
        _fail(reply.get("message", "state failed"), LQ_NO_MODULE if code_only else 1)
    modules = reply["modules"]
    if code_only:
        if len(modules) != 1:
            which = ", ".join(m["module"] for m in modules) or "none loaded"
            _fail(f"-lq needs exactly one module: give -m MODULE ({which})", LQ_NO_MODULE)
        raise typer.Exit(modules[0]["code"])
    if as_json:
        typer.echo(json.dumps(modules, indent=2))
        return
    for snap in modules:
        typer.echo(_state_lines(snap))


def _paint(state: str, colour: str) -> str:
    text = f"{state} ({colour})"
    if not sys.stdout.isatty():
        return text
    return f"\033[{COLOUR_CODES.get(colour, '0')}m{text}\033[0m"


def _state_lines(snap: dict[str, Any]) -> str:
    peer = snap["peer"]
    peer_text = "UNKNOWN (no heartbeat)" if peer is None else _paint(peer["state"], peer["colour"])
    nets = ", ".join(f"{n} {age:.1f}s ago" for n, age in snap["heartbeats"].items()) or "none"
    return "\n".join(
        [
            f"{snap['module']}: {snap['node']} {_paint(snap['state'], snap['colour'])}"
            f"  {snap['peer_name']} {peer_text}",
            f"  why: {snap['why']}",
            f"  copy: {snap['copy']} ({'up to date' if snap['uptodate'] else 'NOT up to date'})"
            f"  heartbeats: {nets}",
            *([f"  resync: {snap['resync']}"] if snap.get("resync") else []),
        ]
    )


# ---------------------------------------------------------------------- commands


# Commands whose goal is a running module: settling red (STOP, WAIT blocked) is a failure.
TO_RUN = frozenset({"start", "prim", "second", "restart", "stopstart", "swap"})


def _command(cmd: str, module: str, wait: float, **args: Any) -> None:
    reply = _ask(cmd, module, timeout=COMMAND_TIMEOUT, **args)
    typer.echo(f"{module}: {reply.get('message', '')}")
    if not reply.get("ok"):
        raise typer.Exit(1)
    if wait > 0:
        _wait_settled(module, wait, must_run=cmd in TO_RUN)


def _wait_settled(module: str, wait: float, must_run: bool) -> None:
    """Wait until the module is no longer in a transient (orange/magenta) phase; exit 1 if
    it does not within `wait` seconds, or settles red when it was meant to run."""
    deadline = time.monotonic() + wait
    while True:
        reply = _ask("state", module)
        if not reply.get("ok"):
            _fail(reply.get("message", "state failed"))
        snap = reply["modules"][0]
        if snap["colour"] in ("green", "red") and snap["phase"] != "stopping":
            break
        if time.monotonic() >= deadline:
            _fail(f"{module}: still {snap['state']} ({snap['colour']}) after {wait:g} s")
        time.sleep(0.2)
    settled = f"{module}: {snap['state']} ({snap['colour']}): {snap['why']}"
    if must_run and snap["colour"] == "red":
        _fail(f"{settled}: not running")
    typer.echo(settled)


@app.command()
def start(module: ModuleOpt, wait: WaitOpt = 0.0) -> None:
    """Start the module: it becomes PRIM, SECOND or ALONE depending on the peer."""
    _command("start", module, wait)


# 900 s: stop_prim may run twice, bounded by nicestoptimeout then forcestoptimeout.
@app.command()
def stop(module: ModuleOpt, wait: WaitOpt = 900.0) -> None:
    """Stop the module; on PRIM the synchronised SECOND takes over."""
    _command("stop", module, wait)


@app.command()
def restart(module: ModuleOpt, wait: WaitOpt = 120.0) -> None:
    """Restart the application locally (stop_prim, start_prim) without a failover."""
    _command("restart", module, wait)


@app.command()
def stopstart(module: ModuleOpt, wait: WaitOpt = 0.0) -> None:
    """Stop then start the module: on PRIM, the SECOND takes over meanwhile."""
    _command("stopstart", module, wait)


@app.command()
def swap(module: ModuleOpt, wait: WaitOpt = 120.0) -> None:
    """Exchange PRIM and SECOND, with no data loss and no resync (run it on the PRIM)."""
    _command("swap", module, wait)


@app.command()
def prim(
    module: ModuleOpt,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="confirm that this node's copy becomes the reference even though it is not "
            "up to date: the peer's later changes are lost",
        ),
    ] = False,
    wait: WaitOpt = 120.0,
) -> None:
    """Start as primary (ALONE) now: the first start, on the node with the good data."""
    _command("prim", module, wait, force=force)


@app.command()
def second(
    module: ModuleOpt,
    fullsync: Annotated[bool, typer.Option(help="compare and copy every file")] = False,
    wait: WaitOpt = 0.0,
) -> None:
    """Start as SECOND of the peer, which must be PRIM or ALONE."""
    _command("second", module, wait, fullsync=fullsync)


class OnOff(enum.StrEnum):
    ON = "on"
    OFF = "off"


@app.command()
def failover(
    module: ModuleOpt,
    on_off: Annotated[OnOff, typer.Argument(metavar="on|off", case_sensitive=False)],
) -> None:
    """Turn automatic failover on or off at run time (off: a SECOND waits for `prim`)."""
    _command("failover", module, 0.0, on=on_off is OnOff.ON)


# ---------------------------------------------------------------------- verify


@app.command("verify")
def verify_module(
    module: ModuleOpt,
    repair: Annotated[
        bool, typer.Option("--repair", help="send what differs to the SECOND again, mirroring")
    ] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the answer")] = 3600.0,
) -> None:
    """Compare each replicated directory with the SECOND's copy while the application
    writes (run it on the PRIM). Exit 0 identical (files being written are listed as busy),
    1 differences (with --repair: still after the repair), 2 not verified (refused: not
    PRIM, SECOND not synchronised; the peer unreachable)."""
    reply = _ask("verify", module, timeout=timeout, repair=repair)
    if not reply.get("ok"):
        _fail(f"{module}: {reply.get('message', 'verify failed')}", 2)
    code = 0
    for result in reply["dirs"]:
        where = f"{module}: {result['dir']}"
        if "error" in result:
            typer.echo(f"{where}: not verified: {result['error']}", err=True)
            code = 2
            continue
        verdict = verify.Verdict.from_json(result["verdict"])
        lines = verdict.lines()
        if "repair" in result:
            before = verify.Verdict.from_json(result["before"])
            lines = [*before.lines(), verify.repair_line(result["repair"]), *lines]
        for line in lines:
            typer.echo(f"{where}: {line}")
        if not verdict.identical:
            code = code or 1
    raise typer.Exit(code)


# ---------------------------------------------------------------------- logs


@app.command("log")
def module_log(
    module: ModuleOpt,
    lines: Annotated[int, typer.Option("-n", help="how many of the last lines (0: all)")] = 40,
    verbose: Annotated[bool, typer.Option(help="also the data processes' logs")] = False,
) -> None:
    """The module log: state changes with their reasons, actions and their outcomes."""
    layout = _layout()
    for line in ModuleLog(layout.module_log(module), "-").tail(lines):
        typer.echo(line)
    if verbose:
        for path in sorted((layout.logs / module).glob("*.log")):
            if path.name in ("module.log", "userlog.log"):
                continue
            typer.echo(f"==> {path} <==")
            for line in ModuleLog(path, "-").tail(lines):
                typer.echo(line)


@app.command()
def userlog(
    module: ModuleOpt,
    lines: Annotated[int, typer.Option("-n", help="how many of the last lines (0: all)")] = 0,
) -> None:
    """The application log: what the module's scripts printed."""
    for line in ModuleLog(_layout().user_log(module), "-").tail(lines):
        typer.echo(line)


def _print(level: str, message: str, module: str | None) -> None:
    name = module or os.environ.get("SAFEMODULE")
    if not name:
        _fail("which module? give -m NAME (scripts have $SAFEMODULE)", 2)
    node = os.environ.get("SAFENODE") or os.uname().nodename
    ModuleLog(_layout().module_log(name), node).write(level, message)


ModuleEnvOpt = Annotated[str | None, typer.Option("-m", "--module", help="default $SAFEMODULE")]


@app.command()
def printi(message: str, module: ModuleEnvOpt = None) -> None:
    """Write an information line to the module log."""
    _print("I", message, module)


@app.command()
def printw(message: str, module: ModuleEnvOpt = None) -> None:
    """Write a warning line to the module log."""
    _print("W", message, module)


@app.command()
def printe(message: str, module: ModuleEnvOpt = None) -> None:
    """Write an error line to the module log."""
    _print("E", message, module)


# ---------------------------------------------------------------------- modules

module_app = typer.Typer(no_args_is_help=True, help="Install and distribute modules.")
app.add_typer(module_app, name="module")


@module_app.command("install")
def module_install(
    name: Annotated[str, typer.Argument(help="the module's name")],
    source: Annotated[Path, typer.Argument(help="a module directory or a NAME.safe file")],
) -> None:
    """Install (or replace) a module from a directory (conf/userconfig.xml + bin/) or a .safe
    file (a zip of that directory); the running daemon loads it."""
    from controller import modules

    layout = _layout()
    try:
        target = modules.install(layout, name, source)
    except modules.ModuleError as e:
        _fail(str(e))
    typer.echo(f"installed module {name} in {target}")
    if layout.control_socket.exists():
        reply = _ask("reload", name, timeout=COMMAND_TIMEOUT)
        typer.echo(reply.get("message", ""))
        if not reply.get("ok"):
            raise typer.Exit(1)


@module_app.command("apply")
def module_apply(module: ModuleOpt) -> None:
    """Push this node's installed module to the peer over the authenticated channel; the
    peer's daemon installs and loads it (the same module on both nodes)."""
    from controller import modules

    node = _ask("ping")["node"]
    try:
        typer.echo(f"{module}: {modules.push(_layout(), module, node)}")
    except (modules.ModuleError, OSError) as e:
        _fail(str(e))


@module_app.command("list")
def module_list() -> None:
    """The installed modules."""
    layout = _layout()
    found = layout.modules.iterdir() if layout.modules.is_dir() else iter(())
    names = sorted(p.name for p in found if not p.name.startswith("."))  # dot: installing
    for name in names:
        typer.echo(name)


# ---------------------------------------------------------------------- the witness

witness_app = typer.Typer(no_args_is_help=True, help="The arbitrating split-brain witness.")
app.add_typer(witness_app, name="witness")


@witness_app.command("serve")
def witness_serve(
    listen: Annotated[
        str, typer.Option(help="ADDR or ADDR:PORT to answer on (UDP; default port 4950)")
    ] = "0.0.0.0",
    key: Annotated[
        Path | None,
        typer.Option(help="the cluster key file (default: this root's etc/hafs/cluster.key)"),
    ] = None,
    state_file: Annotated[
        Path | None,
        typer.Option(
            help="where the lease holders are kept (default: this root's "
            "var/lib/hafs/state/witness.json)"
        ),
    ] = None,
    verbose: bool = False,
) -> None:
    """Run the arbitrating witness in the foreground, on a third host both nodes reach
    (`<splitbrain exec="arbitrate" arg="ADDR">`): it grants each module's primary role to
    one node at a time (a lease the serving node renews)."""
    import logging

    import trio

    from controller.arbiter import WITNESS_PORT, WitnessServer
    from hafs.protocol import ProtocolError, read_key

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    host, _, port = listen.rpartition(":") if listen.count(":") == 1 else (listen, "", "")
    layout = _layout()
    state = state_file or layout.witness_state
    try:
        cluster_key = read_key(str(key or layout.cluster_key))
        address = (host or listen, int(port) if port else WITNESS_PORT)
        state.parent.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError, ProtocolError) as e:
        _fail(f"witness: {e}", 2)

    async def serve() -> None:
        try:
            server = WitnessServer(cluster_key, state, trio.current_time())
        except ValueError as e:
            _fail(f"witness: {e}", 2)
        await server.serve(address)

    try:
        trio.run(serve)
    except OSError as e:
        _fail(f"witness: {address[0]}:{address[1]}: {e}", 1)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    app()
