"""Unit tests of controller.scripts and controller.safekit: real scripts run as real processes
under a node root in tmp_path (trio.run inside plain pytest functions)."""

from __future__ import annotations

import os
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from controller import safekit, scripts
from controller.config import UserScripts
from controller.paths import Layout
from controller.safekit import install_safekit_command
from controller.scripts import ScriptContext, ScriptOutcome, run_script, time_limit

MODULE = "mysql"
NODE = "node1"


def make_ctx(tmp_path: Path, **user: Any) -> ScriptContext:
    layout = Layout(tmp_path / "root")
    layout.module_bin(MODULE).mkdir(parents=True)
    return ScriptContext(layout, MODULE, NODE, UserScripts(**user))


def add_script(ctx: ScriptContext, name: str, body: str, executable: bool = True) -> Path:
    path = ctx.bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755 if executable else 0o644)
    return path


def run(ctx: ScriptContext, name: str, args: tuple[str, str, str]) -> ScriptOutcome:
    return trio.run(run_script, ctx, name, args)


def module_log(ctx: ScriptContext) -> str:
    return ctx.layout.module_log(MODULE).read_text()


def user_log(ctx: ScriptContext) -> str:
    return ctx.layout.user_log(MODULE).read_text()


def group_alive(pgid: int) -> bool:
    """A live (not zombie) process is left in the process group."""
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def wait_for(predicate: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# --------------------------------------------------------------------------- scripts


def test_start_prim_gets_safekit_arguments_and_environment(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, vars=(("MYSQL_PORT", "3306"), ("SAFE", "not allowed")))
    add_script(
        ctx,
        "start_prim",
        'printf "%s\\n" "$@" > "$SAFEVAR/args"; env > "$SAFEVAR/env"; pwd -P > "$SAFEVAR/cwd"\n',
    )
    ctx.layout.safevar.mkdir(parents=True)

    outcome = run(ctx, "start_prim", ("WAIT", "ALONE", "start"))

    assert outcome == ScriptOutcome("start_prim", True, True, 0, False, outcome.detail)
    layout = ctx.layout
    assert (layout.safevar / "args").read_text().split() == ["WAIT", "ALONE", "start"]
    env = dict(
        line.split("=", 1)
        for line in (layout.safevar / "env").read_text().splitlines()
        if "=" in line
    )
    assert env["SAFE"] == str(layout.home)  # a <var> cannot move SAFE
    assert env["SAFEBIN"] == str(layout.safebin)
    assert env["SAFEUSERBIN"] == str(layout.module_bin(MODULE))
    assert env["SAFEVAR"] == str(layout.safevar)
    assert env["SAFEUSERVAR"] == str(layout.safevar / "modules" / MODULE)
    assert env["SAFEMODULE"] == MODULE
    assert env["SAFENODE"] == NODE
    assert env["HAFS_ROOT"] == str(layout.root)
    assert env["MYSQL_PORT"] == "3306"
    assert env["PATH"].endswith(f":{layout.safebin}")
    assert (layout.safevar / "cwd").read_text().strip() == str(layout.module_bin(MODULE).resolve())
    assert f"{NODE} I script start_prim WAIT ALONE start: started" in module_log(ctx)
    assert "script start_prim WAIT ALONE start: exited 0 in" in module_log(ctx)


def test_output_goes_to_the_user_log_stamped_with_the_node(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    add_script(ctx, "start_prim", 'echo "Running start_prim $*"\necho oops >&2\nprintf tail\n')

    assert run(ctx, "start_prim", ("WAIT", "ALONE", "start")).ok

    lines = user_log(ctx).splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == [
        f"{NODE} I start_prim: Running start_prim WAIT ALONE start",
        f"{NODE} I start_prim: oops",
        f"{NODE} I start_prim: tail",
    ]
    assert all(line[:4].isdigit() for line in lines)  # each starts with its timestamp


def test_logging_none_discards_the_output(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, logging="none")
    add_script(ctx, "start_prim", "echo hidden\n")

    assert run(ctx, "start_prim", ("WAIT", "ALONE", "start")).ok
    assert not ctx.layout.user_log(MODULE).exists()


def test_missing_script_is_success(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)

    outcome = run(ctx, "stop_second", ("SECOND", "STOP", "stop"))

    assert outcome == ScriptOutcome("stop_second", False, True, None, False, "not present")


def test_failing_script_reports_its_exit_code(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    add_script(ctx, "start_prim", "exit 3\n")

    outcome = run(ctx, "start_prim", ("WAIT", "ALONE", "start"))

    assert (outcome.ok, outcome.returncode, outcome.timed_out) == (False, 3, False)
    assert f"{NODE} E script start_prim WAIT ALONE start: failed (exit 3)" in module_log(ctx)


def test_script_not_executable_runs_with_sh(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    add_script(ctx, "start_prim", "echo ran\n", executable=False)

    assert run(ctx, "start_prim", ("WAIT", "ALONE", "start")).ok
    assert "start_prim: ran" in user_log(ctx)
    assert "W script start_prim: not executable, running it with /bin/sh" in module_log(ctx)


def test_script_without_shebang_runs_with_sh(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    (ctx.bin_dir / "start_prim").write_text("echo plain\n")
    (ctx.bin_dir / "start_prim").chmod(0o755)

    assert run(ctx, "start_prim", ("WAIT", "ALONE", "start")).ok
    assert "start_prim: plain" in user_log(ctx)
    assert "W script start_prim: no #! line, running it with /bin/sh" in module_log(ctx)


def test_missing_interpreter_is_a_failure_not_an_exception(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    (ctx.bin_dir / "start_prim").write_text("#!/nonexistent/bash\necho never\n")
    (ctx.bin_dir / "start_prim").chmod(0o755)

    outcome = run(ctx, "start_prim", ("WAIT", "ALONE", "start"))

    assert (outcome.ran, outcome.ok, outcome.returncode) == (True, False, None)
    assert outcome.detail.startswith("cannot start it: ")
    assert "E script start_prim WAIT ALONE start: cannot start it" in module_log(ctx)


def test_hung_stop_prim_is_killed_then_forced(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, nicestoptimeout=1, forcestoptimeout=5)
    var = ctx.layout.safevar
    add_script(
        ctx,
        "stop_prim",
        'if [ "$1" = "force" ]; then echo "$@" > "$SAFEVAR/force"; exit 0; fi\n'
        'echo $$ > "$SAFEVAR/pgid"\nsleep 1000\n',
    )

    outcome = run(ctx, "stop_prim", ("PRIM", "STOP", "stop"))

    assert (outcome.ok, outcome.timed_out, outcome.returncode) == (True, True, -15)
    assert outcome.force_run is not None and outcome.force_run.ok
    assert not group_alive(int((var / "pgid").read_text()))  # sleep 1000 went with it
    assert (var / "force").read_text().split() == ["force", "PRIM", "STOP", "stop"]
    log = module_log(ctx)
    assert "E script stop_prim PRIM STOP stop: killed after 1 s (nicestoptimeout)" in log
    assert "I script stop_prim force PRIM STOP stop: exited 0" in log


def test_hung_force_run_is_killed_even_when_it_ignores_sigterm(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, nicestoptimeout=1, forcestoptimeout=1)
    var = ctx.layout.safevar
    add_script(
        ctx,
        "stop_prim",
        '[ "$1" = "force" ] && trap "" TERM\necho $$ > "$SAFEVAR/pgid.$1"\nsleep 1000\n',
    )

    started = time.monotonic()
    outcome = run(ctx, "stop_prim", ("PRIM", "STOP", "stop"))

    assert not outcome.ok
    force = outcome.force_run
    assert force is not None and force.timed_out and force.returncode == -9
    assert force.detail == "killed after 1 s (forcestoptimeout)"
    for name in ("pgid.PRIM", "pgid.force"):
        assert not group_alive(int((var / name).read_text()))
    assert time.monotonic() - started < 1 + 1 + scripts.KILL_GRACE + 3


def test_cancelled_caller_leaves_no_process_behind(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    add_script(ctx, "start_prim", 'echo $$ > "$SAFEVAR/pgid"\nsleep 1000\n')

    async def cancel_soon() -> None:
        with trio.move_on_after(0.5):
            await run_script(ctx, "start_prim", ("WAIT", "ALONE", "start"))

    trio.run(cancel_soon)

    assert not group_alive(int((ctx.layout.safevar / "pgid").read_text()))
    assert "W script start_prim WAIT ALONE start: cancelled, process group killed" in (
        module_log(ctx)
    )


def test_background_process_keeps_writing_to_the_user_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scripts, "DRAIN_GRACE", 0.2)
    ctx = make_ctx(tmp_path)
    add_script(ctx, "start_prim", "echo early\n(sleep 1; echo late) &\nexit 0\n")

    started = time.monotonic()
    outcome = run(ctx, "start_prim", ("WAIT", "ALONE", "start"))

    assert outcome.ok and time.monotonic() - started < 1  # did not wait for the background
    assert "still hold its output" in module_log(ctx)
    assert wait_for(lambda: "late" in user_log(ctx))
    assert "start_prim: early" in user_log(ctx)


def test_time_limits_follow_safekit() -> None:
    user = UserScripts(nicestoptimeout=10, forcestoptimeout=20)
    assert time_limit(user, "stop_prim") == scripts.TimeLimit(10, "nicestoptimeout")
    assert time_limit(user, "stop_second", force=True) == scripts.TimeLimit(20, "forcestoptimeout")
    assert time_limit(user, "poststop") == scripts.TimeLimit(10, "nicestoptimeout")
    assert time_limit(user, "prestart") == scripts.TimeLimit(
        30, "nicestoptimeout + forcestoptimeout"
    )
    assert time_limit(user, "start_prim") is None


# --------------------------------------------------------------------------- safekit command


def test_seed_script_printi_reaches_the_module_log(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    install_safekit_command(ctx.layout)
    add_script(
        ctx,
        "start_prim",
        '$SAFE/safekit printi "MySQL started"\n'
        '$SAFE/safekit printw "Cleaning MySQL processes"\n'
        '$SAFE/safekit printe "start_prim failed"\n',
    )

    assert run(ctx, "start_prim", ("WAIT", "ALONE", "start")).ok

    log = module_log(ctx)
    assert f"{NODE} I MySQL started" in log
    assert f"{NODE} W Cleaning MySQL processes" in log
    assert f"{NODE} E start_prim failed" in log


def test_safekit_command_pins_its_node_root(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "root")
    path = install_safekit_command(layout, python="/usr/bin/python3")

    assert path == layout.safekit_command and os.access(path, os.X_OK)
    assert f"HAFS_ROOT={layout.root}\n" in path.read_text()
    assert 'exec /usr/bin/python3 -P -m controller.safekit "$@"' in path.read_text()


def test_safekit_unknown_verb_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert safekit.main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "frobnicate" in err and "printi, printw, printe, stop, state" in err


def test_safekit_print_without_module_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAFEMODULE", raising=False)
    assert safekit.main(["printi", "hello"]) == 2


def test_safekit_stop_and_state_ask_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[Layout, str, str | None, dict[str, Any]]] = []

    class ControlError(Exception):
        pass

    def request(layout: Layout, cmd: str, module: str | None = None, **args: Any) -> Any:
        calls.append((layout, cmd, module, args))
        if module == "gone":
            raise ControlError("daemon not running")
        if cmd == "state":
            return {"ok": True, "state": "ALONE"}
        return {"ok": module != "refused", "message": "stopping"}

    fake = types.ModuleType("controller.control")
    fake.__dict__.update(ControlError=ControlError, request=request)
    monkeypatch.setitem(sys.modules, "controller.control", fake)
    monkeypatch.setenv("HAFS_ROOT", str(tmp_path))
    monkeypatch.setenv("SAFEMODULE", MODULE)

    assert safekit.main(["stop", "-i", "start_prim"]) == 0
    assert safekit.main(["state"]) == 0
    assert capsys.readouterr().out == f"stopping\n{MODULE}: ALONE\n"
    assert safekit.main(["stop", "-m", "refused"]) == 1
    assert safekit.main(["state", "-m", "gone"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "safekit stop: stopping",
        "safekit state: daemon not running",
    ]
    layout = Layout(tmp_path)
    assert calls == [
        (layout, "stop", MODULE, {"reason": "stop -i start_prim"}),
        (layout, "state", MODULE, {}),
        (layout, "stop", "refused", {"reason": "stop (safekit command)"}),
        (layout, "state", "gone", {}),
    ]
