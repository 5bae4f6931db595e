"""Unit tests of controller.daemon's shell: one daemon per root, modules that cannot load or
start are left out (the module itself is a stand-in: controller.module is not under test
here), a command's crash becomes an error reply, signals during the stop."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from controller import daemon as daemon_module
from controller import statemachine as sm
from controller.config import ClusterConfig, ModuleConfig
from controller.daemon import Daemon, DaemonError, lock_root
from controller.heartbeat import HeartbeatError
from controller.paths import Layout

CLUSTER_XML = """<?xml version="1.0"?>
<cluster>
  <lans>
    <lan name="default">
      <node name="node1" addr="127.0.0.1"/>
      <node name="node2" addr="127.0.0.2"/>
    </lan>
  </lans>
</cluster>
"""


def userconfig(port: int | None = None, dirs: int = 0) -> str:
    heart = f'<heart port="{port}">' if port else "<heart>"
    replicated = "".join(f'<replicated dir="/srv/d{i}" mode="read_only"/>' for i in range(dirs))
    rfs = f"<rfs>{replicated}</rfs>" if dirs else ""
    return (
        f'<safe><service mode="mirror">{heart}<heartbeat name="default"/></heart>{rfs}'
        "</service></safe>"
    )


def install(layout: Layout, name: str, text: str) -> None:
    module = layout.module_dir(name)
    (module / "conf").mkdir(parents=True)
    (module / "bin").mkdir()
    (module / "conf" / "userconfig.xml").write_text(text)


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path)
    layout.etc.mkdir(parents=True)
    layout.cluster_xml.write_text(CLUSTER_XML)
    layout.cluster_key.write_text(os.urandom(32).hex() + "\n")
    return layout


class StandIn:
    """Takes controller.module.Module's place: fails where its name says."""

    def __init__(
        self, layout: Layout, cluster: ClusterConfig, config: ModuleConfig, node: str, key: bytes
    ) -> None:
        if config.name == "corrupt":
            raise KeyError("copy")  # what a durable.json without its "copy" gives
        self.config = config
        self.name = config.name

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery():  # as Module.run: trio wraps what fails in a group
            if self.name == "busy":
                raise HeartbeatError("heartbeat network default: cannot bind 127.0.0.1:4800")
            task_status.started()
            await trio.sleep_forever()

    async def command(self, event: sm.Event) -> sm.Transition:
        raise RuntimeError("a bug in the module")

    def snapshot(self) -> dict[str, Any]:
        return {"module": self.name}


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon_module, "Module", StandIn)


def run_daemon_shell(d: Daemon, body: Any) -> None:
    """Runs `body` with the daemon's nursery set up as Daemon.run sets it."""

    async def main() -> None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                d._nursery = nursery
                await body()
                nursery.cancel_scope.cancel()

    trio.run(main)


# ---------------------------------------------------------------- one daemon per root


def test_one_daemon_per_root(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    fd = lock_root(layout)
    try:
        with pytest.raises(DaemonError, match=rf"root {tmp_path} \(pid {os.getpid()}\)"):
            lock_root(layout)
    finally:
        os.close(fd)
    os.close(lock_root(layout))  # released with its descriptor


# ---------------------------------------------------------------- loading modules


def test_modules_sharing_ports_are_refused(layout: Layout) -> None:
    install(layout, "a", userconfig(dirs=2))  # heartbeat 4800, replication 4900 and 4901
    install(layout, "b", userconfig())  # heartbeat 4800 too
    install(layout, "c", userconfig(port=4801, dirs=1))  # replication 4901, a's second
    install(layout, "d", userconfig(port=4802, dirs=1))  # 4802, 4902: free
    install(layout, ".d.new-1234", userconfig(port=4803))  # an install in progress
    d = Daemon(layout, "node1")
    configs, problems = d.load_modules({})
    assert [c.name for c in configs] == ["a", "d"]
    assert len(problems) == 2, problems
    assert "module b not loaded: its heartbeat port 4800 is module a's too" in problems[0]
    assert "module c not loaded: its replication ports 4901 are module a's too" in problems[1]
    assert all("set distinct <heart port>" in p for p in problems)

    # Against the modules already running, as a reload sees them.
    configs, problems = d.load_modules({"a": configs[0]})
    assert [c.name for c in configs] == ["d"] and len(problems) == 2


def test_a_module_that_cannot_start_is_left_out(layout: Layout, stand_in: None) -> None:
    for name, port in (("busy", 4800), ("corrupt", 4810), ("good", 4820)):
        install(layout, name, userconfig(port=port))
    d = Daemon(layout, "node1")

    async def body() -> None:
        configs, problems = d.load_modules({})
        assert problems == []
        problems = await d._start_modules(configs)
        assert set(d.modules) == {"good"}
        assert problems == [
            "module busy not loaded: heartbeat network default: cannot bind 127.0.0.1:4800",
            "module corrupt not loaded: KeyError: 'copy'",
        ]
        reply = await d.handle({"cmd": "stop", "module": "busy"})
        assert reply["ok"] is False and "no module 'busy'" in reply["message"]

    run_daemon_shell(d, body)
    assert "cannot bind" in layout.module_log("busy").read_text()  # for `hafs log -m busy`


def test_reload_reports_problems_and_what_applies_when(layout: Layout, stand_in: None) -> None:
    install(layout, "good", userconfig(port=4820))
    d = Daemon(layout, "node1")

    async def body() -> None:
        reply = await d._reload("good")
        assert reply == {"ok": True, "message": "loaded good"}
        install(layout, "busy", userconfig(port=4800))
        reply = await d.handle({"cmd": "reload", "module": "good"})
        assert reply["ok"] is False
        assert reply["message"] == (
            "loaded nothing new; module good already loaded: bin/ scripts apply now, "
            "conf/userconfig.xml at the next daemon restart; module busy not loaded: "
            "heartbeat network default: cannot bind 127.0.0.1:4800"
        )

    run_daemon_shell(d, body)


# ---------------------------------------------------------------- commands and signals


def test_a_command_that_crashes_gets_an_error_reply(
    layout: Layout, stand_in: None, caplog: Any
) -> None:
    install(layout, "good", userconfig(port=4820))
    d = Daemon(layout, "node1")

    async def body() -> None:
        await d._reload()
        reply = await d.handle({"cmd": "start", "module": "good"})
        assert reply == {
            "ok": False,
            "message": "internal error: RuntimeError: a bug in the module",
        }
        assert (await d.handle({"cmd": "state"}))["modules"] == [{"module": "good"}]

    run_daemon_shell(d, body)
    assert any(r.exc_info and "command 'start' failed" in r.getMessage() for r in caplog.records)


def test_a_signal_during_the_stop_is_only_logged(layout: Layout, caplog: Any) -> None:
    d = Daemon(layout, "node1")

    async def main() -> None:
        stopping = trio.Event()
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(d._watch_signals, stopping)
                os.kill(os.getpid(), signal.SIGTERM)
                await stopping.wait()
                os.kill(os.getpid(), signal.SIGINT)  # not a KeyboardInterrupt
                os.kill(os.getpid(), signal.SIGTERM)  # not the end of the test run
                while len([r for r in caplog.records if "already stopping" in r.message]) < 2:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()

    with caplog.at_level(logging.INFO, logger="controller.daemon"):
        trio.run(main)
