"""A module's user scripts (bin/prestart, start_prim, stop_prim ...), run the SafeKit way.

SafeKit's contract [UG §14; reference/safekit.md §3], which the seed's scripts rely on:

- A script is `bin/NAME` of the installed module. A missing one is not an error: most
  modules ship only start_prim and stop_prim. One present but not executable (a module
  unzipped without its modes) runs with /bin/sh, with a warning in the module log.
- Every script gets three arguments: current state, next state, action, e.g.
  `start_prim WAIT ALONE start`. Its environment carries SAFE, SAFEBIN, SAFEUSERBIN,
  SAFEUSERCONF, SAFEVAR, SAFEUSERVAR, SAFEMODULE and each `<user><var name value>`; hafs
  adds SAFENODE and HAFS_ROOT so `$SAFE/safekit printi` finds this node's module log.
- Stop scripts (STOP_SCRIPTS) run twice: normally, then always again with `force` first
  (`stop_prim force PRIM STOP stop`; the seed's stop_prim tests `[ "$1" = "force" ]` and
  shifts it off). The force run is what guarantees the application is gone when the nice
  one failed or hung, so a stop counts as done when either run succeeded.
- What scripts print (stdout and stderr, in order) goes to the application log (userlog),
  each line stamped with the time and the node; `<user logging="none">` discards it.

Time limits (`time_limit`). SafeKit bounds only stopping: `nicestoptimeout` for the normal run
of a stop script, `forcestoptimeout` for its force run [UG §13.8]. hafs also bounds:
- poststop by nicestoptimeout: it is on the stop path, and a stop must end;
- prestart by nicestoptimeout + forcestoptimeout: SafeKit's template prestart runs every
  stop script normally and then with force, so it may take both.
Start scripts (start_prim, start_second ...) and the rest are not bounded, as in SafeKit: a
slow start keeps the module in its transient state, and the daemon ends a hung one by
cancelling `run_script` (an operator's stop), which kills the script's process group.

At a time limit the script's whole process group (it is started in its own session) gets
SIGTERM, then SIGKILL after KILL_GRACE, so nothing it started outlives it.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil
import trio

from controller.config import UserScripts
from controller.modulelog import ModuleLog, format_line
from controller.paths import ROOT_ENV, Layout

STOP_SCRIPTS = ("stop_prim", "stop_second", "stop_sec", "stop_both")
FORCE = "force"

# Between SIGTERM and SIGKILL of a timed-out script's process group.
KILL_GRACE = 2.0
# How long output may still arrive once a script exited: its pipe stays open as long as
# something it started in the background holds it (see _hand_off_output).
DRAIN_GRACE = 1.0
_POLL = 0.05
_CHUNK = 65536
# A line longer than this without a newline is written out as it is, so a script printing
# without newlines cannot grow the daemon's memory.
_MAX_LINE = 65536


@dataclass(frozen=True)
class TimeLimit:
    """How long one run of a script may take, and the `<user>` attribute that says so."""

    seconds: float
    name: str


@dataclass(frozen=True)
class ScriptContext:
    """What a module's scripts run with. `user` is `UserScripts()` when `<user>` is absent
    (SafeKit then runs no scripts: that decision is the daemon's, not this module's)."""

    layout: Layout
    module: str
    node: str
    user: UserScripts

    @property
    def bin_dir(self) -> Path:
        return self.layout.module_bin(self.module)

    @property
    def user_var(self) -> Path:
        """SAFEUSERVAR: the module's own variable directory, SAFEVAR/modules/AM in SafeKit."""
        return self.layout.safevar / "modules" / self.module

    def module_log(self) -> ModuleLog:
        return ModuleLog(self.layout.module_log(self.module), self.node)

    def environment(self) -> dict[str, str]:
        """os.environ, then the `<user>` vars, then SafeKit's names: a `<var>` may set PATH
        or anything the application needs, but cannot move SAFE or SAFEMODULE from under the
        `safekit` command."""
        layout, module = self.layout, self.module
        env = dict(os.environ)
        env.update(self.user.env)
        env.update(
            {
                "SAFE": str(layout.home),
                "SAFEBIN": str(layout.safebin),
                "SAFEUSERBIN": str(self.bin_dir),
                "SAFEUSERCONF": str(layout.userconfig(module).parent),
                "SAFEVAR": str(layout.safevar),
                "SAFEUSERVAR": str(self.user_var),
                "SAFEMODULE": module,
                "SAFENODE": self.node,
                ROOT_ENV: str(layout.root),
            }
        )
        # Appended, not prepended: a helper in SAFEBIN must not shadow a system command.
        env["PATH"] = f"{env.get('PATH') or os.defpath}:{layout.safebin}"
        return env


@dataclass(frozen=True)
class ScriptOutcome:
    """One call of `run_script`.

    ran: False when bin/NAME does not exist, which counts as success. For a stop script the
    fields describe the normal run and `force_run` the second one; `ok` then says whether
    the stop is done: the normal run or, failing it, the force run succeeded.
    """

    script: str
    ran: bool
    ok: bool
    returncode: int | None
    timed_out: bool
    detail: str
    force_run: ScriptOutcome | None = None


def time_limit(user: UserScripts, script: str, force: bool = False) -> TimeLimit | None:
    """The limit of one run of `script` (None: unbounded); the module docstring says why."""
    if force:
        return TimeLimit(user.forcestoptimeout, "forcestoptimeout")
    if script in STOP_SCRIPTS or script == "poststop":
        return TimeLimit(user.nicestoptimeout, "nicestoptimeout")
    if script == "prestart":
        both = user.nicestoptimeout + user.forcestoptimeout
        return TimeLimit(both, "nicestoptimeout + forcestoptimeout")
    return None


async def run_script(ctx: ScriptContext, name: str, args: tuple[str, str, str]) -> ScriptOutcome:
    """Run bin/NAME with SafeKit's arguments (current state, next state, action), twice for
    a stop script. Cancelling the caller kills the running script's process group."""
    path = ctx.bin_dir / name
    if not path.is_file():
        return ScriptOutcome(name, False, True, None, False, "not present")
    nice = await _run_once(ctx, path, name, args, time_limit(ctx.user, name))
    if name not in STOP_SCRIPTS:
        return nice
    force = await _run_once(ctx, path, name, (FORCE, *args), time_limit(ctx.user, name, True))
    return ScriptOutcome(
        name,
        True,
        nice.ok or force.ok,
        nice.returncode,
        nice.timed_out,
        f"{nice.detail}; force: {force.detail}",
        force_run=force,
    )


async def _run_once(
    ctx: ScriptContext, path: Path, name: str, args: tuple[str, ...], limit: TimeLimit | None
) -> ScriptOutcome:
    label = " ".join((name, *args))
    log = ctx.module_log()
    argv = [*_command(ctx, path, name), *args]
    ctx.user_var.mkdir(parents=True, exist_ok=True)
    log.info(f"script {label}: started")
    started = trio.current_time()
    try:
        returncode, timed_out = await _execute(ctx, name, label, argv, limit)
    except _NotStarted as e:
        log.error(f"script {label}: {e}")
        return ScriptOutcome(name, True, False, None, False, str(e))
    outcome = _outcome(name, returncode, timed_out, trio.current_time() - started, limit)
    log.write("I" if outcome.ok else "E", f"script {label}: {outcome.detail}")
    return outcome


def _command(ctx: ScriptContext, path: Path, name: str) -> list[str]:
    """How to start the script: itself, or /bin/sh when the kernel could not exec it (not
    executable, or no #! line: a shell runs such a file with sh, so SafeKit users expect it)."""
    with path.open("rb") as f:
        magic = f.read(4)
    if not os.access(path, os.X_OK):
        why = "not executable"
    elif not magic.startswith((b"#!", b"\x7fELF")):
        why = "no #! line"
    else:
        return [str(path)]
    ctx.module_log().warning(f"script {name}: {why}, running it with /bin/sh")
    return ["/bin/sh", str(path)]


class _NotStarted(Exception):
    """The script could not be started (e.g. its #! names a missing interpreter)."""


def _outcome(
    name: str, returncode: int, timed_out: bool, elapsed: float, limit: TimeLimit | None
) -> ScriptOutcome:
    if timed_out and limit is not None:
        detail = f"killed after {limit.seconds:g} s ({limit.name})"
    elif returncode == 0:
        detail = f"exited 0 in {elapsed:.1f} s"
    elif returncode < 0:
        detail = f"failed (killed by {_signal_name(-returncode)})"
    else:
        detail = f"failed (exit {returncode})"
    ok = returncode == 0 and not timed_out
    return ScriptOutcome(name, True, ok, returncode, timed_out, detail)


async def _execute(
    ctx: ScriptContext, name: str, label: str, argv: list[str], limit: TimeLimit | None
) -> tuple[int, bool]:
    """Run argv to its end or its limit; returns (returncode, timed out)."""
    if ctx.user.logging == "none":
        proc = await _spawn(ctx, argv, subprocess.DEVNULL)
        return await _supervise(ctx, label, proc, limit, None)
    read_fd, write_fd = os.pipe()
    try:
        proc = await _spawn(ctx, argv, write_fd)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        # The script holds its own copy; ours would keep the pipe from ever reaching EOF.
        os.close(write_fd)
    userlog = UserLog(ctx.layout.user_log(ctx.module), ctx.node, name)
    output = trio.lowlevel.FdStream(read_fd)
    return await _supervise(ctx, label, proc, limit, (output, userlog))


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal without a name
        return f"signal {number}"


async def _spawn(ctx: ScriptContext, argv: list[str], out: int) -> trio.Process:
    try:
        return await _open_process(ctx, argv, out)
    except OSError as e:
        raise _NotStarted(f"cannot start it: {e.strerror or e}") from e


async def _open_process(ctx: ScriptContext, argv: list[str], out: int) -> trio.Process:
    return await trio.lowlevel.open_process(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT if out != subprocess.DEVNULL else subprocess.DEVNULL,
        cwd=str(ctx.bin_dir),
        env=ctx.environment(),
        # Its own session and process group: at a time limit everything it started is
        # killed with it, and the daemon's terminal signals do not reach it.
        start_new_session=True,
    )


async def _supervise(
    ctx: ScriptContext,
    label: str,
    proc: trio.Process,
    limit: TimeLimit | None,
    output: tuple[trio.lowlevel.FdStream, UserLog] | None,
) -> tuple[int, bool]:
    timed_out = False
    try:
        async with trio.open_nursery() as nursery:
            eof = trio.Event()
            if output is not None:
                nursery.start_soon(_copy_output, *output, eof)
            with trio.move_on_after(limit.seconds if limit else math.inf):
                await proc.wait()
            if proc.returncode is None:
                timed_out = True
                await _end_process_group(proc)
            if output is not None:
                with trio.move_on_after(DRAIN_GRACE):
                    await eof.wait()
            nursery.cancel_scope.cancel()  # the copy, when still waiting (see below)
        if output is not None and not eof.is_set():
            await _hand_off_output(ctx, label, *output)
    finally:
        if proc.returncode is None:
            # Cancelled by the caller: the script must not outlive the call.
            with trio.CancelScope(shield=True):
                await _end_process_group(proc)
                ctx.module_log().warning(f"script {label}: cancelled, process group killed")
        if output is not None:
            output[0].close()
    assert proc.returncode is not None
    return proc.returncode, timed_out


async def _copy_output(output: trio.lowlevel.FdStream, userlog: UserLog, eof: trio.Event) -> None:
    while chunk := await output.receive_some(_CHUNK):
        userlog.feed(chunk)
    userlog.flush()
    eof.set()


async def _hand_off_output(
    ctx: ScriptContext, label: str, output: trio.lowlevel.FdStream, userlog: UserLog
) -> None:
    """The script exited but something it left running (typically the application, started
    with `&`) still holds its output pipe. Closing our end would kill that process with
    SIGPIPE at its next write, and not reading would block it once the pipe is full; so a
    detached `cat` keeps copying into the user log, unstamped, until the last holder exits."""
    userlog.flush()
    fd = output.fileno()
    os.set_blocking(fd, True)  # FdStream made it non-blocking; cat needs it blocking
    # A background command's stdin is /dev/null in a non-interactive sh: pass it through fd 3.
    relay = 'exec 3<&0; cat <&3 >>"$0" 3<&- &'
    await trio.run_process(
        ["/bin/sh", "-c", relay, str(userlog.path)],
        stdin=fd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ctx.module_log().warning(
        f"script {label}: processes it started still hold its output; "
        "their output goes to the user log without timestamps"
    )


async def _end_process_group(proc: trio.Process) -> None:
    """SIGTERM the script's process group, SIGKILL whatever is left after KILL_GRACE, and
    reap the script."""
    pgid = proc.pid  # start_new_session made the script its group's leader
    _signal_group(pgid, signal.SIGTERM)
    with trio.move_on_after(KILL_GRACE):
        await proc.wait()
        while _group_alive(pgid):
            await trio.sleep(_POLL)
    # The pgid cannot have been reused: the kernel keeps it while any member lives.
    if _group_alive(pgid):
        _signal_group(pgid, signal.SIGKILL)
    await proc.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group already exited
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    """Whether a process other than a zombie is left in the group. Zombies are skipped: an
    init that does not reap (as in some containers) would make them look like survivors."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != "zombie":
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


class UserLog:
    """Appends a script's output to the application log, one stamped line per line read:
    `YYYY-MM-DD HH:MM:SS.mmm NODE I SCRIPT: text`, the module log's shape."""

    def __init__(self, path: Path, node: str, script: str) -> None:
        self.path = path
        self.node = node
        self.script = script
        self._partial = b""
        path.parent.mkdir(parents=True, exist_ok=True)

    def feed(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        if len(self._partial) > _MAX_LINE:
            lines.append(self._partial)
            self._partial = b""
        self._append(lines)

    def flush(self) -> None:
        """Writes a last line that has no newline."""
        if self._partial:
            self._append([self._partial])
            self._partial = b""

    def _append(self, lines: list[bytes]) -> None:
        if not lines:
            return
        text = "".join(
            format_line(self.node, "I", f"{self.script}: {_text(line)}") for line in lines
        )
        # One write on O_APPEND, as ModuleLog does: lines from concurrent writers never mix.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


def _text(line: bytes) -> str:
    # "\r" of a CRLF line would otherwise reach the log as a line break (format_line splits).
    return line.rstrip(b"\r").decode(errors="replace")
