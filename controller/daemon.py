"""`hafs daemon`: one per node. Loads cluster.xml, the cluster key and the installed modules,
runs each module (controller.module) and answers the CLI on the control socket.

SIGTERM/SIGINT stop every module as `hafs stop` would (a primary hands over to its
synchronised SECOND), say goodbye to the peer and exit; a daemon killed outright leaves the
data processes and the application running (design.md section 2) and the next start cleans
up after it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

import psutil
import trio

from controller import control
from controller import statemachine as sm
from controller.config import ClusterConfig, ConfigError, load_cluster, load_module
from controller.module import Module
from controller.modules import PushServer, admin_port
from controller.paths import Layout
from hafs import protocol

log = logging.getLogger(__name__)


class DaemonError(Exception):
    """The daemon cannot start: bad configuration, no key, unknown node."""


def local_addresses() -> set[str]:
    return {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}


def detect_node(cluster: ClusterConfig) -> str:
    """This node's name: the cluster.xml node one of whose addresses is local."""
    mine = local_addresses()
    found = {n.name for lan in cluster.lans for n in lan.nodes if str(n.local_addr) in mine}
    if len(found) != 1:
        which = "none" if not found else " and ".join(sorted(found))
        raise DaemonError(
            f"cannot tell which node of {cluster.source} this is: the local addresses match "
            f"{which}; give --node NAME"
        )
    return found.pop()


class Daemon:
    def __init__(self, layout: Layout, node: str | None = None) -> None:
        self.layout = layout
        try:
            self.cluster = load_cluster(layout.cluster_xml)
        except ConfigError as e:
            raise DaemonError(str(e)) from None
        except FileNotFoundError:
            raise DaemonError(f"no cluster configuration: {layout.cluster_xml}") from None
        try:
            self.key = protocol.read_key(str(layout.cluster_key))
        except (OSError, protocol.AuthError) as e:
            raise DaemonError(f"cluster key {layout.cluster_key}: {e}") from None
        self.node = node or detect_node(self.cluster)
        if self.node not in self.cluster.nodes:
            raise DaemonError(f"node {self.node!r} is not in {self.cluster.source}")
        self.modules: dict[str, Module] = {}
        self._nursery: trio.Nursery | None = None
        self._push: PushServer | None = None

    def _start_push_server(self, token: trio.lowlevel.TrioToken) -> None:
        """Accept `hafs module apply` from the peer on this node's lan addresses."""
        port = admin_port(self.cluster)
        addrs = [(str(lan.node(self.node).local_addr), port) for lan in self.cluster.lans]

        def installed(name: str) -> str:
            reply = trio.from_thread.run(self._reload, trio_token=token)
            return str(reply["message"])

        self._push = PushServer(self.layout, self.key, addrs, installed)
        self._push.start()

    def load_modules(self) -> list[str]:
        """Load every installed module not loaded yet; return the problems found."""
        problems: list[str] = []
        if not self.layout.modules.is_dir():
            return problems
        for directory in sorted(self.layout.modules.iterdir()):
            if directory.name in self.modules or not directory.is_dir():
                continue
            try:
                config = load_module(directory, self.cluster)
            except ConfigError as e:
                problems.append(f"module {directory.name} not loaded: {e}")
                continue
            self.modules[config.name] = Module(
                self.layout, self.cluster, config, self.node, self.key
            )
        return problems

    async def run(self) -> None:
        from controller.safekit import install_safekit_command

        for d in (self.layout.run, self.layout.logs, self.layout.home):
            d.mkdir(parents=True, exist_ok=True)
        install_safekit_command(self.layout)
        pidfile = self.layout.run / "daemon.pid"
        pidfile.write_text(f"{os.getpid()}\n")
        for problem in self.load_modules():
            log.error("%s", problem)
        log.info("hafs daemon on %s: modules %s", self.node, ", ".join(self.modules) or "none")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(control.serve, self.layout.control_socket, self.handle)
                self._start_push_server(trio.lowlevel.current_trio_token())
                for module in self.modules.values():
                    await nursery.start(module.run)
                await self._until_signal()
                await self._shutdown()
                nursery.cancel_scope.cancel()
        finally:
            if self._push is not None:
                self._push.close()
            pidfile.unlink(missing_ok=True)
            self.layout.control_socket.unlink(missing_ok=True)

    async def _until_signal(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal %s: stopping the modules", signal.Signals(signum).name)
                return

    async def _shutdown(self) -> None:
        async with trio.open_nursery() as nursery:
            for module in self.modules.values():
                nursery.start_soon(module.shutdown)

    # ------------------------------------------------------------------ control API

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req["cmd"]
        if cmd == "ping":
            return {"ok": True, "node": self.node, "pid": os.getpid()}
        if cmd == "reload":
            return await self._reload()
        name = req.get("module")
        if cmd == "state":
            chosen = [m for n, m in self.modules.items() if name in (None, n)]
            if name is not None and not chosen:
                return self._unknown(name)
            return {"ok": True, "node": self.node, "modules": [m.snapshot() for m in chosen]}
        if name not in self.modules:
            return self._unknown(name)
        event = _event(cmd, req)
        if event is None:
            return {"ok": False, "message": f"unknown command {cmd!r}"}
        module = self.modules[name]
        t = await module.command(event)
        return {"ok": not t.refused, "message": t.reason, "state": module.snapshot()}

    def _unknown(self, name: object) -> dict[str, Any]:
        known = ", ".join(self.modules) or "none installed"
        return {"ok": False, "message": f"no module {name!r} on {self.node} ({known})"}

    async def _reload(self) -> dict[str, Any]:
        before = set(self.modules)
        problems = self.load_modules()
        added = [n for n in self.modules if n not in before]
        assert self._nursery is not None
        for name in added:
            await self._nursery.start(self.modules[name].run)
        message = f"loaded {', '.join(added) or 'nothing new'}"
        return {"ok": not problems, "message": "; ".join([message, *problems])}


def _event(cmd: str, req: dict[str, Any]) -> sm.Event | None:
    match cmd:
        case "start":
            return sm.Start()
        case "stop":
            return sm.Stop()
        case "prim":
            return sm.Prim(force=bool(req.get("force", False)))
        case "second":
            return sm.Second(fullsync=bool(req.get("fullsync", False)))
        case "swap":
            return sm.Swap()
        case "restart":
            return sm.Restart()
        case "stopstart":
            return sm.StopStart()
        case "failover":
            return sm.SetFailover(bool(req.get("on", True)))
    return None


def run(layout: Layout, node: str | None, verbose: bool) -> None:
    """Run the daemon in the foreground (systemd's Type=simple)."""
    layout.logs.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        handlers=[logging.StreamHandler(sys.stderr), logging.FileHandler(layout.daemon_log)],
    )
    daemon = Daemon(layout, node)
    trio.run(daemon.run)
