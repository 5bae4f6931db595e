"""Unit tests of controller.modules: replacing an installed module never leaves its scripts
missing, and the push server answers and goes on whatever one push raises."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import pytest

from controller import modules
from controller.paths import Layout

USERCONFIG = (
    '<safe><service mode="mirror"><heart><heartbeat name="default"/></heart></service></safe>'
)


def make_module(parent: Path, version: str, name: str = "app") -> Path:
    module = parent / version / name
    (module / "conf").mkdir(parents=True)
    (module / "bin").mkdir()
    (module / "conf" / "userconfig.xml").write_text(USERCONFIG)
    for script in ("start_prim", "stop_prim"):
        (module / "bin" / script).write_text(f"#!/bin/sh\n# {version}\nexit 0\n")
    for i in range(50):  # enough files that a copy in place would take a while
        (module / "bin" / f"helper{i}").write_text(f"# {version}\n")
    return module


def leftovers(layout: Layout) -> list[str]:
    return sorted(p.name for p in layout.modules.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two renames"])
def test_reinstall_swaps_the_module_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    if not exchange:
        monkeypatch.setattr(modules, "_rename_exchange", lambda a, b: False)
    layout = Layout(tmp_path / "root")
    target = modules.install(layout, "app", make_module(tmp_path, "v1"))
    script = target / "bin" / "start_prim"
    assert "v1" in script.read_text() and os.access(script, os.X_OK)

    target = modules.install(layout, "app", make_module(tmp_path, "v2"))
    assert "v2" in script.read_text() and os.access(script, os.X_OK)
    assert "v2" in (target / "bin" / "helper49").read_text()
    assert leftovers(layout) == []


def test_a_script_is_never_missing_while_the_module_is_replaced(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "root")
    sources = [make_module(tmp_path, v) for v in ("v1", "v2")]
    modules.install(layout, "app", sources[0])
    script = layout.module_bin("app") / "start_prim"
    missing: list[int] = []
    done = threading.Event()

    def look_up() -> None:  # the daemon running a script meanwhile
        while not done.is_set():
            if not script.exists():
                missing.append(1)

    watcher = threading.Thread(target=look_up)
    watcher.start()
    try:
        for i in range(20):
            modules.install(layout, "app", sources[i % 2])
    finally:
        done.set()
        watcher.join()
    assert missing == []
    assert leftovers(layout) == []


def test_a_bad_module_replaces_nothing(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "root")
    modules.install(layout, "app", make_module(tmp_path, "v1"))
    bad = make_module(tmp_path, "v2")
    (bad / "conf" / "userconfig.xml").write_text("<safe/>")
    with pytest.raises(modules.ModuleError, match="not installed"):
        modules.install(layout, "app", bad)
    assert "v1" in (layout.module_bin("app") / "start_prim").read_text()
    assert leftovers(layout) == []


# ---------------------------------------------------------------- the push server


def test_push_server_answers_an_unexpected_error_and_goes_on(tmp_path: Path) -> None:
    key = os.urandom(32)
    layout = Layout(tmp_path / "root")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    calls: list[str] = []

    def installed(name: str) -> str:
        calls.append(name)
        if len(calls) == 1:
            raise RuntimeError("the daemon's loop is gone")
        return "loaded app"

    server = modules.PushServer(layout, key, [("127.0.0.1", port)], installed)
    server.start()
    try:
        payload = b'{"name": "app"}\n' + modules.zip_module(make_module(tmp_path, "v1"))
        with pytest.raises(modules.ModuleError, match="RuntimeError: the daemon's loop is gone"):
            modules._exchange(("127.0.0.1", port), key, payload)
        with pytest.raises(modules.ModuleError, match="KeyError"):
            modules._exchange(("127.0.0.1", port), key, json.dumps({}).encode() + b"\n")
        answer = modules._exchange(("127.0.0.1", port), key, payload)  # still accepting
        assert answer.startswith("installed app in ") and answer.endswith("; loaded app")
    finally:
        server.close()
