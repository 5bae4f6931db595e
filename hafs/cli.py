"""The `hafs` command line. Exit codes: 0 success, 1 a check found differences or the
process failed at run time, 2 bad usage or bad input (key, address, directory)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from hafs import manifest, protocol, status, verify, wire
from hafs.ops import Ack
from hafs.state import default_state_dir

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="hafs: two-node high availability with synchronous file replication.",
)
fs_app = typer.Typer(no_args_is_help=True, help="The data path: mount, replica, verify.")
app.add_typer(fs_app, name="fs")
config_app = typer.Typer(no_args_is_help=True, help="Configuration: cluster.xml and modules.")
app.add_typer(config_app, name="config")

KeyOpt = Annotated[Path, typer.Option("--key", help="cluster key file (hafs keygen)")]
StateOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir", help="state directory (default: $HAFS_ROOT/var/lib/hafs/fs/<escaped DIR>)"
    ),
]
DirArg = Annotated[Path, typer.Argument(help="the replicated directory")]


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"hafs: {message}", err=True)
    raise typer.Exit(code)


def _setup_logging(verbose: bool) -> None:
    node = socket.gethostname()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s {node} %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def _key(path: Path) -> bytes:
    try:
        return protocol.read_key(str(path))
    except OSError as e:
        _fail(f"cannot read key {path}: {e.strerror}")
    except protocol.AuthError as e:
        _fail(str(e))


def _hostport(text: str) -> tuple[str, int]:
    try:
        return wire.parse_hostport(text)
    except ValueError as e:
        _fail(str(e))


def _directory(path: Path) -> str:
    if not path.is_dir():
        _fail(f"{path}: not a directory")
    return str(path.resolve())


@app.command()
def keygen(file: Annotated[Path, typer.Argument(help="where to write the new key")]) -> None:
    """Write a new random cluster key (mode 0600); copy the same file to both nodes."""
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        _fail(f"{file} exists; refusing to overwrite a cluster key")
    with os.fdopen(fd, "w") as f:
        f.write(protocol.new_key().hex() + "\n")
    typer.echo(f"wrote {file}")


@fs_app.command("replica")
def fs_replica(
    dir: DirArg,
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT to accept the mount on")],
    key: KeyOpt,
    workers: Annotated[
        int,
        typer.Option(
            min=1, help="threads reading the tree and hashing blocks in a resync (<rfs nbrei>)"
        ),
    ] = 4,
    state_dir: StateOpt = None,
    verbose: bool = False,
) -> None:
    """Run the replica server in the foreground: apply the authenticated stream under DIR."""
    from hafs.mount import run_replica

    _setup_logging(verbose)
    data_dir = _directory(dir)
    try:
        state = state_dir or default_state_dir(data_dir)
        run_replica(data_dir, _hostport(listen), _key(key), state, workers)
    except OSError as e:
        _fail(f"replica: {e}", 1)


@fs_app.command("mount")
def fs_mount(
    dir: DirArg,
    peer: Annotated[str | None, typer.Option("--peer", help="HOST:PORT of the replica")] = None,
    key: Annotated[Path | None, typer.Option("--key", help="cluster key file")] = None,
    standalone: Annotated[bool, typer.Option(help="no peer: the benchmark baseline")] = False,
    alone: Annotated[
        bool,
        typer.Option(
            help="start ALONE: journal every change, do not connect; the peer joins with "
            "`hafs fs mirror`"
        ),
    ] = False,
    mountpoint: Annotated[Path | None, typer.Option(help="mount here instead of over DIR")] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for an ack before ALONE")] = 5.0,
    xattrs: Annotated[
        bool,
        typer.Option(
            help="serve extended attributes; --no-xattrs saves the kernel's getxattr before "
            "every buffered write (EOPNOTSUPP for applications' xattr calls)"
        ),
    ] = True,
    live_passes: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="a rejoin copies while the application writes for up to this many passes, "
            "then pauses its writes for a last pass over what changed meanwhile; 0 pauses "
            "them for the whole copy [default: 4]",
        ),
    ] = None,
    maxrate: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="MB/s a rejoin's copy sends at most while the application writes (its "
            "last, paused pass is not held back); 0: as fast as it can",
        ),
    ] = 0.0,
    workers: Annotated[
        int,
        typer.Option(
            min=1, help="threads reading the tree and hashing blocks in a resync (<rfs nbrei>)"
        ),
    ] = 4,
    fence: Annotated[
        bool,
        typer.Option(
            help="when the peer stops acknowledging, hold the calls (HELD) until told "
            "`hafs fs alone` (they complete, journaled) or `hafs fs fence` (they fail with "
            "EIO) instead of going ALONE after --timeout: the daemon's fencing"
        ),
    ] = False,
    ack: Annotated[
        Ack,
        typer.Option(
            help="when a mutating call returns: applied = once the peer applied it, fsync "
            "once durable on both (no acknowledged change lost); fsync = writes at once, "
            "fsync as applied (a write not yet fsynced may be lost in a failover); receipt "
            "= writes at once, fsync once the peer has it in memory (a commit is lost only "
            "if both nodes fail at once)"
        ),
    ] = Ack.APPLIED,
    standby: Annotated[
        bool,
        typer.Option(
            help="start, then wait for a line `go alone` or `go mirror` on stdin before "
            "mounting (exit at end of input): a failover then does not wait for Python"
        ),
    ] = False,
    state_dir: StateOpt = None,
    verbose: bool = False,
) -> None:
    """Mount hafs over DIR (foreground); SIGTERM/SIGINT drain the stream and unmount."""
    from hafs.mount import MountConfig, run_mount, wait_for_go

    _setup_logging(verbose)
    data_dir = _directory(dir)
    if standalone == (peer is not None):
        _fail("give either --peer HOST:PORT with --key, or --standalone")
    if peer is not None and key is None:
        _fail("--peer needs --key")
    if alone and peer is None:
        _fail("--alone needs --peer: a standalone mount has no peer to be alone from")
    if fence and peer is None:
        _fail("--fence needs --peer: a standalone mount has no peer")
    cfg = MountConfig(
        data_dir=data_dir,
        mountpoint=_directory(mountpoint) if mountpoint else data_dir,
        state_dir=state_dir or default_state_dir(data_dir),
        peer=_hostport(peer) if peer else None,
        key=_key(key) if key else None,
        timeout=timeout,
        xattrs=xattrs,
        alone=alone,
        maxrate=int(maxrate * 1e6),
        workers=workers,
        fence=fence,
        ack=ack,
    )
    if live_passes is not None:
        cfg = dataclasses.replace(cfg, live_passes=live_passes)
    if standby:
        go = wait_for_go(cfg)
        if go is None:
            return
        cfg = go
    try:
        run_mount(cfg)
    except (OSError, RuntimeError) as e:
        _fail(f"mount: {e}", 1)


def _status_sock(dir: Path | None, state_dir: Path | None) -> Path:
    if state_dir is None:
        if dir is None:
            _fail("give DIR or --state-dir")
        state_dir = default_state_dir(str(dir))
    return state_dir / "status.sock"


@fs_app.command("status")
def fs_status(
    dir: Annotated[Path | None, typer.Argument()] = None, state_dir: StateOpt = None
) -> None:
    """Print the running mount's or replica's status as JSON."""
    sock = _status_sock(dir, state_dir)
    try:
        typer.echo(json.dumps(status.query(sock), indent=2))
    except (OSError, ValueError) as e:
        _fail(f"no hafs process answers at {sock.parent}: {e}", 1)


def _command(sock: Path, request: dict[str, str], timeout: float | None) -> dict[str, Any]:
    try:
        return status.command(sock, request, timeout)
    except (OSError, ValueError) as e:
        _fail(f"no hafs mount answers at {sock.parent}: {e}", 1)


# The counters of a resync's last line (`hafs fs mirror`, `hafs fs resync`).
RESYNC_COUNTERS = ("files_checked", "files_copied", "bytes_sent", "seconds")


@fs_app.command("mirror")
def fs_mirror(
    dir: Annotated[Path | None, typer.Argument()] = None,
    state_dir: StateOpt = None,
    timeout: Annotated[
        float | None, typer.Option(help="give up waiting after this many seconds")
    ] = None,
) -> None:
    """Join the peer: make its replica identical to this tree, then mirror every change.

    The mount must be ALONE. The application goes on writing while the differences are
    copied; mutating calls wait only during the last pass (`paused_seconds`)."""
    reply = _command(_status_sock(dir, state_dir), {"cmd": "mirror"}, timeout)
    if not reply.get("ok"):
        _fail(f"mirror failed: {reply.get('message')}", 1)
    typer.echo(f"mirror: {reply.get('message')}")
    counters = [*RESYNC_COUNTERS, "passes", "paused_seconds"]
    typer.echo("resync: " + " ".join(f"{name}={reply.get(name)}" for name in counters))


@fs_app.command("resync")
def fs_resync(
    dir: DirArg,
    peer: Annotated[str, typer.Option("--peer", help="HOST:PORT of the replica")],
    key: KeyOpt,
    full: Annotated[
        bool, typer.Option(help="compare every file, even if the journal could narrow it")
    ] = False,
    state_dir: StateOpt = None,
) -> None:
    """Make the replica at --peer identical to DIR, by hand.

    DIR mounted by hafs (ALONE): that mount resyncs and then mirrors, as `hafs fs mirror`.
    DIR not mounted (the application stopped): a private mount of it does the resync and
    is unmounted after. Either way the last line is
    `resync: files_checked=N files_copied=N bytes_sent=N seconds=S`."""
    data_dir = _directory(dir)
    state = state_dir or default_state_dir(data_dir)
    sock = state / "status.sock"
    request: dict[str, Any] = {"cmd": "mirror", "full": full}
    if _answers(sock):
        mounted = status.query(sock)
        if mounted.get("peer") != f"{_hostport(peer)[0]}:{_hostport(peer)[1]}":
            _fail(f"{data_dir} is mounted with peer {mounted.get('peer')}, not {peer}")
        reply = _command(sock, request, None)
    else:
        reply = _resync_unmounted(data_dir, peer, key, state, request)
    if not reply.get("ok"):
        _fail(f"resync failed: {reply.get('message')}", 1)
    typer.echo(f"mirror: {reply.get('message')}")
    typer.echo("resync: " + " ".join(f"{name}={reply.get(name)}" for name in RESYNC_COUNTERS))


def _answers(sock: Path) -> bool:
    try:
        status.query(sock, timeout=2.0)
    except (OSError, ValueError):
        return False
    return True


def _resync_unmounted(
    data_dir: str, peer: str, key: Path, state: Path, request: dict[str, Any]
) -> dict[str, Any]:
    """Mount DIR ALONE on a private mountpoint, resync through it, then unmount it."""
    import subprocess
    import tempfile
    import time

    from hafs.mountinfo import force_unmount, is_mounted

    with tempfile.TemporaryDirectory(prefix="hafs-resync-") as mountpoint:
        argv = [sys.executable, "-m", "hafs.cli", "fs", "mount", data_dir, "--peer", peer,
                "--key", str(key), "--state-dir", str(state), "--mountpoint", mountpoint,
                "--alone"]  # fmt: skip
        proc = subprocess.Popen(argv)
        try:
            deadline = time.monotonic() + 60
            while True:
                # The status socket answers before the mount's loop takes commands.
                if is_mounted(mountpoint) and _answers(state / "status.sock"):
                    reply = _command(state / "status.sock", request, None)
                    if reply.get("message") != status.STARTING:
                        return reply
                if proc.poll() is not None or time.monotonic() > deadline:
                    _fail(f"could not mount {data_dir} for the resync", 1)
                time.sleep(0.1)
        finally:
            proc.terminate()  # drains the stream, then unmounts
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if is_mounted(mountpoint):
                force_unmount(mountpoint)


ReasonOpt = Annotated[str, typer.Option(help="why, for the status and the log")]


@fs_app.command("alone")
def fs_alone(
    dir: Annotated[Path | None, typer.Argument()] = None,
    state_dir: StateOpt = None,
    reason: ReasonOpt = "asked by the operator",
) -> None:
    """Stop replicating now and journal every change (I5); idempotent. Releases the calls
    a --fence mount holds."""
    _mode_command("alone", dir, state_dir, reason)


@fs_app.command("fence")
def fs_fence(
    dir: Annotated[Path | None, typer.Argument()] = None,
    state_dir: StateOpt = None,
    reason: ReasonOpt = "asked by the operator",
) -> None:
    """Stop replicating and fail every mutating call not yet acknowledged by the peer, and
    every later one, with EIO (the node is stepping down); reads go on."""
    _mode_command("fence", dir, state_dir, reason)


def _mode_command(cmd: str, dir: Path | None, state_dir: Path | None, reason: str) -> None:
    reply = _command(_status_sock(dir, state_dir), {"cmd": cmd, "reason": reason}, 30.0)
    if not reply.get("ok"):
        _fail(f"{cmd} failed: {reply.get('message')}", 1)
    typer.echo(f"{cmd}: {reply.get('message')}")


@fs_app.command("verify")
def fs_verify(
    dir: DirArg,
    peer: Annotated[str, typer.Option("--peer", help="HOST:PORT of the replica")],
    key: KeyOpt,
    timeout: float = 300.0,
    rounds: Annotated[
        int, typer.Option(help="re-reads of the differing paths, to tell writes in flight")
    ] = verify.Rounds.count,
    interval: Annotated[float, typer.Option(help="seconds between re-reads")] = (
        verify.Rounds.interval
    ),
    repair: Annotated[
        bool,
        typer.Option("--repair", help="send the differing paths again through the mount"),
    ] = False,
    state_dir: StateOpt = None,
) -> None:
    """Compare this node's tree with the replica's, online (while the application writes).

    Exit 0 identical (paths being written are listed as busy), 1 differences (after
    --repair: still), 2 no comparison (bad input, replica unreachable)."""
    data_dir = _directory(dir)
    addr, secret = _hostport(peer), _key(key)
    sock = _status_sock(dir, state_dir) if repair else None
    plan = verify.Rounds(rounds, interval, max(10.0, rounds * interval * 3))
    try:
        result = verify.check(data_dir, addr, secret, timeout, repair_via=sock, rounds=plan)
    except (OSError, protocol.ProtocolError, manifest.ManifestError) as e:
        _fail(f"verify: cannot compare with the replica: {e}")
    except verify.RepairError as e:
        _fail(f"verify: {e}")
    if result.before is not None and result.repair is not None:
        for line in result.before.lines():
            typer.echo(line)
        typer.echo(verify.repair_line(result.repair))
    for line in result.verdict.lines():
        typer.echo(line)
    if not result.verdict.identical:
        typer.echo(f"{len(result.verdict.differing)} paths differ", err=True)
        raise typer.Exit(1)


@config_app.command("check")
def config_check(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="module directories (conf/userconfig.xml + bin/), userconfig.xml or "
            "cluster.xml files; the modules' lans and nodes are checked against a cluster.xml "
            "given with them"
        ),
    ],
) -> None:
    """Validate configuration without starting anything: print `ok: PATH` for each valid
    path and `FILE:LINE: message` for each problem; exit 0 if all are valid, 1 if not."""
    from controller import config

    for path in paths:
        if not path.exists():
            _fail(f"{path}: no such file or directory")
    problems = config.check(*paths)
    for problem in problems:
        typer.echo(str(problem))
    for path in paths:
        if not any(path == Path(p.file) or path in Path(p.file).parents for p in problems):
            typer.echo(f"ok: {path}")
    if problems:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
