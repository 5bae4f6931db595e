"""`hafs daemon`: one per node. Loads cluster.xml, the cluster key and the installed modules,
runs each module (controller.module) and answers the CLI on the control socket.

SIGTERM/SIGINT stop every module as `hafs stop` would (a primary hands over to its
synchronised SECOND), say goodbye to the peer and exit; another signal during that stop is
only logged. A daemon killed outright leaves the data processes and the application running
(design.md section 2) and the next start cleans up after it.

One daemon per root: `run/hafs/daemon.lock` is held (flock) for the daemon's life. A module
that cannot be loaded or started (a bad configuration, a heartbeat port taken, another
module's ports, a corrupt durable.json) is left out with an error; the others run.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import sys
from collections.abc import Mapping
from typing import Any

import psutil
import trio

from controller import control
from controller import statemachine as sm
from controller.config import ClusterConfig, ConfigError, ModuleConfig, load_cluster, load_module
from controller.heartbeat import HeartbeatError
from controller.module import DEFAULT_HEART_PORT, REPLICATION_PORT_OFFSET, Module
from controller.modulelog import ModuleLog
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


def lock_root(layout: Layout) -> int:
    """Take the root's daemon lock; it is held while the returned descriptor stays open.

    Raises DaemonError when another daemon holds it: two daemons on one root would bind the
    same ports, run the same scripts and overwrite each other's pidfile and control socket.
    """
    path = layout.run / "daemon.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Not inherited (os.open's default): a data process or script outliving the daemon
        # must not keep its successor from starting.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise DaemonError(f"cannot open the daemon lock {path}: {e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DaemonError(
            f"another hafs daemon runs with root {layout.root} (pid {holder})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


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
        # Held while modules are loaded and started: two reloads at once would start the
        # same new module twice.
        self._loading = trio.Lock()

    def _start_push_server(self, token: trio.lowlevel.TrioToken) -> None:
        """Accept `hafs module apply` from the peer on this node's lan addresses."""
        port = admin_port(self.cluster)
        addrs = [(str(lan.node(self.node).local_addr), port) for lan in self.cluster.lans]

        def installed(name: str) -> str:
            reply = trio.from_thread.run(self._reload, name, trio_token=token)
            return str(reply["message"])

        self._push = PushServer(self.layout, self.key, addrs, installed)
        self._push.start()

    def load_modules(
        self, loaded: Mapping[str, ModuleConfig]
    ) -> tuple[list[ModuleConfig], list[str]]:
        """Read every installed module not in `loaded`; return their configurations and the
        problems found. Blocking (xmlschema): the daemon runs it in a thread once started."""
        configs: list[ModuleConfig] = []
        problems: list[str] = []
        if not self.layout.modules.is_dir():
            return configs, problems
        taken = dict(loaded)
        for directory in sorted(self.layout.modules.iterdir()):
            # A dot name is an install in progress (controller.modules.install).
            name = directory.name
            if name in loaded or name.startswith(".") or not directory.is_dir():
                continue
            try:
                config = load_module(directory, self.cluster)
            except ConfigError as e:
                problems.append(f"module {directory.name} not loaded: {e}")
                continue
            clash = _port_clash(config, taken)
            if clash is not None:
                problems.append(clash)
                continue
            taken[config.name] = config
            configs.append(config)
        return configs, problems

    async def _start_modules(self, configs: list[ModuleConfig]) -> list[str]:
        """Start each module in the daemon's nursery; one that fails is left out (its
        commands then answer "no module") and its problem returned. Hold self._loading."""
        assert self._nursery is not None
        problems = []
        for config in configs:
            try:
                module = Module(self.layout, self.cluster, config, self.node, self.key)
                await self._nursery.start(module.run)
            except Exception as e:  # a bad module must not stop the daemon or the others
                problem = f"module {config.name} not loaded: {_describe(e)}"
                log.error("%s", problem, exc_info=not _expected(e))
                with contextlib.suppress(OSError):  # where `hafs log -m` shows it
                    ModuleLog(self.layout.module_log(config.name), self.node).error(problem)
                problems.append(problem)
                continue
            self.modules[config.name] = module
        return problems

    async def run(self) -> None:
        from controller.safekit import install_safekit_command

        for d in (self.layout.run, self.layout.logs, self.layout.home):
            d.mkdir(parents=True, exist_ok=True)
        lock = lock_root(self.layout)  # before the pidfile and the control socket
        pidfile = self.layout.run / "daemon.pid"
        try:
            install_safekit_command(self.layout)
            pidfile.write_text(f"{os.getpid()}\n")
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                stopping = trio.Event()
                await nursery.start(self._watch_signals, stopping)
                configs, problems = self.load_modules({})
                await nursery.start(control.serve, self.layout.control_socket, self.handle)
                self._start_push_server(trio.lowlevel.current_trio_token())
                async with self._loading:
                    problems += await self._start_modules(configs)
                for problem in problems:
                    log.error("%s", problem)
                modules = ", ".join(self.modules) or "none"
                log.info("hafs daemon on %s: modules %s", self.node, modules)
                await stopping.wait()
                await self._shutdown()
                nursery.cancel_scope.cancel()
        finally:
            if self._push is not None:
                self._push.close()
            pidfile.unlink(missing_ok=True)
            self.layout.control_socket.unlink(missing_ok=True)
            os.close(lock)

    async def _watch_signals(
        self, stopping: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Own SIGTERM/SIGINT for the daemon's whole life: the first one sets `stopping`;
        one during the stop (an impatient operator, systemd) must not kill the daemon
        halfway through its modules' stop scripts."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if stopping.is_set():
                    log.warning("signal %s: already stopping the modules", name)
                else:
                    log.info("signal %s: stopping the modules", name)
                    stopping.set()

    async def _shutdown(self) -> None:
        async with trio.open_nursery() as nursery:
            for module in self.modules.values():
                nursery.start_soon(module.shutdown)

    # ------------------------------------------------------------------ control API

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._dispatch(req)
        except Exception as e:  # one command's bug must not kill the daemon
            log.exception("command %r failed", req.get("cmd"))
            return {"ok": False, "message": f"internal error: {_describe(e)}"}

    async def _dispatch(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req["cmd"]
        if cmd == "ping":
            return {"ok": True, "node": self.node, "pid": os.getpid()}
        name = req.get("module")
        if cmd == "reload":
            return await self._reload(name if isinstance(name, str) else None)
        if cmd == "state":
            chosen = [m for n, m in self.modules.items() if name in (None, n)]
            if name is not None and not chosen:
                return self._unknown(name)
            return {"ok": True, "node": self.node, "modules": [m.snapshot() for m in chosen]}
        if name not in self.modules:
            return self._unknown(name)
        if cmd == "verify":
            return await self.modules[name].verify(bool(req.get("repair", False)))
        event = _event(cmd, req)
        if event is None:
            return {"ok": False, "message": f"unknown command {cmd!r}"}
        module = self.modules[name]
        t = await module.command(event)
        return {"ok": not t.refused, "message": t.reason, "state": module.snapshot()}

    def _unknown(self, name: object) -> dict[str, Any]:
        known = ", ".join(self.modules) or "none installed"
        return {"ok": False, "message": f"no module {name!r} on {self.node} ({known})"}

    async def _reload(self, installed: str | None = None) -> dict[str, Any]:
        """Load the modules installed since; `installed`: the module just (re)installed."""
        async with self._loading:
            before = set(self.modules)
            loaded = {n: m.config for n, m in self.modules.items()}
            configs, problems = await trio.to_thread.run_sync(self.load_modules, loaded)
            problems += await self._start_modules(configs)
        added = [n for n in self.modules if n not in before]
        notes = [f"loaded {', '.join(added) or 'nothing new'}"]
        if installed in before:
            # A running module keeps the configuration it was built from; its scripts are
            # looked up in bin/ each time they run.
            notes.append(
                f"module {installed} already loaded: bin/ scripts apply now, "
                "conf/userconfig.xml at the next daemon restart"
            )
        return {"ok": not problems, "message": "; ".join([*notes, *problems])}


def _ports(config: ModuleConfig) -> tuple[int, set[int]]:
    """The module's heartbeat port (UDP) and replication ports (TCP)."""
    heart = config.heart.port or DEFAULT_HEART_PORT
    dirs = config.rfs.replicated if config.rfs else ()
    return heart, {heart + REPLICATION_PORT_OFFSET + i for i in range(len(dirs))}


def _port_clash(config: ModuleConfig, loaded: Mapping[str, ModuleConfig]) -> str | None:
    """Why `config` cannot run beside the `loaded` modules, or None if it can."""
    heart, replication = _ports(config)
    for other in loaded.values():
        other_heart, other_replication = _ports(other)
        if heart == other_heart:
            used = f"its heartbeat port {heart} is module {other.name}'s too"
        elif replication & other_replication:
            ports = ", ".join(map(str, sorted(replication & other_replication)))
            used = f"its replication ports {ports} are module {other.name}'s too"
        else:
            continue
        return (
            f"module {config.name} not loaded: {used}; set distinct <heart port> in "
            f"the userconfig.xml of {config.name} and {other.name}"
        )
    return None


def _describe(e: BaseException) -> str:
    """The error's message; the leaves of a group (trio wraps errors of nursery tasks)."""
    if isinstance(e, BaseExceptionGroup):
        return "; ".join(_describe(leaf) for leaf in e.exceptions)
    return str(e) if isinstance(e, HeartbeatError) else f"{type(e).__name__}: {e}"


def _expected(e: BaseException) -> bool:
    """Errors a module's configuration or state explains, as opposed to a bug."""
    if isinstance(e, BaseExceptionGroup):
        return all(_expected(leaf) for leaf in e.exceptions)
    return isinstance(e, HeartbeatError | OSError | ValueError | KeyError)


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
