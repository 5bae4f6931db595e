"""`hafs verify -m` with the daemon's replies scripted: what it prints and its exit codes
(0 identical, 1 differences, 2 not verified)."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from controller import control
from controller.cli import app
from controller.module import _verify_outcome
from hafs.verify import Verdict

IDENTICAL = Verdict(3, (), (), ("db",), 1, 2)
DIFFERENT = Verdict(3, ("differs: a: size 1 != 2",), ("a",), (), 0, 1)
REPAIR = {"ok": True, "message": "repaired 1 paths: 1 files copied", "paused_seconds": 0.05}


def ask(monkeypatch: pytest.MonkeyPatch, reply: dict[str, Any], *args: str) -> Any:
    requests = []

    def request(layout: Any, cmd: str, module: str | None = None, timeout: float = 30.0,
                **a: Any) -> dict[str, Any]:  # fmt: skip
        requests.append((cmd, module, timeout, a))
        return reply

    monkeypatch.setattr(control, "request", request)
    result = CliRunner().invoke(app, ["verify", "-m", "app", *args])
    return result, requests


def dirs(*results: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "message": "", "dirs": list(results)}


def test_identical_with_a_busy_file(monkeypatch: pytest.MonkeyPatch) -> None:
    result, requests = ask(monkeypatch, dirs({"dir": "/d", "verdict": IDENTICAL.to_json()}))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "app: /d: identical: 3 entries (1 busy: being written, not compared)",
        "app: /d: busy (being written; not compared): db",
    ]
    assert requests == [("verify", "app", 3600.0, {"repair": False})]


def test_differences_exit_1(monkeypatch: pytest.MonkeyPatch) -> None:
    result, _ = ask(monkeypatch, dirs({"dir": "/d", "verdict": DIFFERENT.to_json()}))
    assert result.exit_code == 1
    assert result.stdout.splitlines() == ["app: /d: differs: a: size 1 != 2"]


def test_repaired_then_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    done = {"dir": "/d", "verdict": IDENTICAL.to_json(), "before": DIFFERENT.to_json(),
            "repair": REPAIR}  # fmt: skip
    result, requests = ask(monkeypatch, dirs(done), "--repair")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "app: /d: differs: a: size 1 != 2"
    assert lines[1] == "app: /d: repair: repaired 1 paths: 1 files copied (writes paused 0.050 s)"
    assert lines[2].startswith("app: /d: identical: 3 entries")
    assert requests[0][3] == {"repair": True}
    assert _verify_outcome(done) == "/d: repair: repaired 1 paths: 1 files copied; then identical"


@pytest.mark.parametrize(
    "reply",
    [
        {"ok": False, "message": "verify runs on the PRIM ...: node2 is SECOND"},
        dirs({"dir": "/d", "error": "cannot compare: connection refused"}),
    ],
)
def test_not_verified_exits_2(monkeypatch: pytest.MonkeyPatch, reply: dict[str, Any]) -> None:
    result, _ = ask(monkeypatch, reply)
    assert result.exit_code == 2
    assert "PRIM" in result.stderr or "not verified: cannot compare" in result.stderr


def test_the_module_log_names_what_differs() -> None:
    many = Verdict(9, (), tuple("abcdefg"), (), 0, 1)
    line = _verify_outcome({"dir": "/d", "verdict": many.to_json()})
    assert line == "/d: 7 paths differ: a, b, c, d, e, ..."
