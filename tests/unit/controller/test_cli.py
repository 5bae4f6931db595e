"""Unit tests of controller.cli's exit codes and waits, with the daemon's replies scripted
(control.request replaced): what a script calling `hafs` sees."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from controller import cli, control, modules
from controller.cli import app
from controller.paths import Layout

Reply = dict[str, Any]


def snap(state: str, colour: str, phase: str = "ready", code: int = 0) -> Reply:
    return {"module": "app", "state": state, "colour": colour, "phase": phase,
            "why": f"why {state}", "code": code}  # fmt: skip


class Daemon:
    """Stands for the daemon: answers each request with `answer(cmd, args)`."""

    def __init__(self, answer: Callable[[str, dict[str, Any]], Reply]) -> None:
        self.answer = answer
        self.requests: list[tuple[str, str | None, float, dict[str, Any]]] = []

    def request(
        self, layout: Layout, cmd: str, module: str | None = None, timeout: float = 30.0, **a: Any
    ) -> Reply:
        self.requests.append((cmd, module, timeout, a))
        return self.answer(cmd, a)


def run(
    monkeypatch: pytest.MonkeyPatch, answer: Callable[[str, dict[str, Any]], Reply], *args: str
) -> tuple[Any, Daemon]:
    daemon = Daemon(answer)
    monkeypatch.setattr(control, "request", daemon.request)
    monkeypatch.setattr(cli.time, "sleep", lambda s: None)
    return CliRunner().invoke(app, list(args)), daemon


def states(*snaps: Reply) -> Callable[[str, dict[str, Any]], Reply]:
    """A command accepted, then `state` answering `snaps` in turn (the last one for ever)."""
    left = list(snaps)

    def answer(cmd: str, args: dict[str, Any]) -> Reply:
        if cmd != "state":
            return {"ok": True, "message": f"{cmd} accepted"}
        return {"ok": True, "modules": [left.pop(0) if len(left) > 1 else left[0]]}

    return answer


# ---------------------------------------------------------------- state -lq


def unreachable(cmd: str, args: dict[str, Any]) -> Reply:
    raise control.ControlError("the hafs daemon is not running")


@pytest.mark.parametrize(
    ("answer", "argv", "code", "message"),
    [
        (states(snap("PRIM", "green", code=3)), ["-m", "app"], 3, None),
        (states(snap("STOP", "red", code=0)), [], 0, None),  # the only module
        (unreachable, ["-m", "app"], 10, "not running"),
        (lambda c, a: {"ok": False, "message": "no module 'x'"}, ["-m", "x"], 11, "no module"),
        (lambda c, a: {"ok": True, "modules": []}, [], 11, "exactly one module"),
        (
            lambda c, a: {"ok": True, "modules": [snap("PRIM", "green", code=3)] * 2},
            [],
            11,
            "exactly one module",
        ),
    ],
)
def test_state_lq_errors_are_not_states(
    monkeypatch: pytest.MonkeyPatch,
    answer: Callable[[str, dict[str, Any]], Reply],
    argv: list[str],
    code: int,
    message: str | None,
) -> None:
    result, _ = run(monkeypatch, answer, "state", "-lq", *argv)
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    if message is not None:
        assert message in result.stderr


# ---------------------------------------------------------------- commands and --wait


def test_command_and_state_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    result, daemon = run(monkeypatch, states(snap("ALONE", "green")), "prim", "-m", "app")
    assert result.exit_code == 0, result.output
    assert [(cmd, timeout) for cmd, _, timeout, _ in daemon.requests] == [
        ("prim", cli.COMMAND_TIMEOUT),
        ("state", cli.QUERY_TIMEOUT),
    ]
    assert cli.COMMAND_TIMEOUT >= 600


@pytest.mark.parametrize(
    ("argv", "settled", "code"),
    [
        (["prim", "-m", "app"], snap("ALONE", "green"), 0),
        (["prim", "-m", "app"], snap("STOP", "red"), 1),  # start_prim failed
        (["start", "-m", "app", "--wait", "5"], snap("WAIT", "red", "blocked"), 1),
        (["swap", "-m", "app"], snap("STOP", "red"), 1),
        (["stop", "-m", "app"], snap("STOP", "red"), 0),  # a stop that settles red is done
    ],
)
def test_wait_fails_when_the_module_settles_red_instead_of_running(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], settled: Reply, code: int
) -> None:
    answer = states(snap("PRIM", "orange", "stopping"), snap("WAIT", "orange", "peer"), settled)
    result, _ = run(monkeypatch, answer, *argv)
    assert result.exit_code == code, result.output
    line = f"app: {settled['state']} ({settled['colour']}): why {settled['state']}"
    assert line in result.output


def test_wait_fails_when_the_time_runs_out(monkeypatch: pytest.MonkeyPatch) -> None:
    answer = states(snap("PRIM", "orange", "stopping"))
    result, daemon = run(monkeypatch, answer, "stop", "-m", "app", "--wait", "0.3")
    assert result.exit_code == 1, result.output
    assert "app: still PRIM (orange) after 0.3 s" in result.stderr
    assert len(daemon.requests) > 2


def test_stop_waits_for_the_stop_scripts_by_default() -> None:
    result = CliRunner().invoke(app, ["stop", "--help"])
    assert "900" in result.output


# ---------------------------------------------------------------- failover


@pytest.mark.parametrize(("word", "on"), [("on", True), ("OFF", False), ("Off", False)])
def test_failover_on_off(monkeypatch: pytest.MonkeyPatch, word: str, on: bool) -> None:
    result, daemon = run(monkeypatch, states(snap("PRIM", "green")), "failover", "-m", "a", word)
    assert result.exit_code == 0, result.output
    assert daemon.requests[0][0] == "failover" and daemon.requests[0][3] == {"on": on}


@pytest.mark.parametrize("word", ["of", "yes", "1", ""])
def test_failover_anything_else_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, word: str
) -> None:
    result, daemon = run(monkeypatch, states(snap("PRIM", "green")), "failover", "-m", "a", word)
    assert result.exit_code == 2, result.output
    assert daemon.requests == []


def test_failover_needs_on_or_off(monkeypatch: pytest.MonkeyPatch) -> None:
    result, daemon = run(monkeypatch, states(snap("PRIM", "green")), "failover", "-m", "a")
    assert result.exit_code == 2 and daemon.requests == []


# ---------------------------------------------------------------- module install


@pytest.mark.parametrize(("ok", "code"), [(True, 0), (False, 1)])
def test_install_fails_when_the_reload_reports_problems(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ok: bool, code: int
) -> None:
    layout = Layout(tmp_path)
    layout.control_socket.parent.mkdir(parents=True)
    layout.control_socket.touch()  # a daemon runs
    monkeypatch.setenv("HAFS_ROOT", str(tmp_path))
    monkeypatch.setattr(modules, "install", lambda layout, name, source: tmp_path / name)
    message = "loaded nothing new; module app already loaded: ..."

    def reload(cmd: str, args: dict[str, Any]) -> Reply:
        return {"ok": ok, "message": message}

    result, daemon = run(monkeypatch, reload, "module", "install", "app", str(tmp_path))
    assert result.exit_code == code, result.output
    assert message in result.output
    assert daemon.requests[0][:2] == ("reload", "app")
