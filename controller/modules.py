"""Installing modules, and pushing one to the peer (`hafs module apply`).

A module is a directory `conf/userconfig.xml` + `bin/`; a `.safe` file is a zip of it
(SafeKit's packaging). Installing validates the module against this node's cluster.xml
before it replaces anything, so a bad module never replaces a good one, and swaps the new
directory in with one rename: a script the daemon looks up meanwhile is the old one or the
new one, never missing.

`apply` zips the installed module and sends it to the peer's daemon over the cluster's
authenticated channel (hafs.protocol: both sides prove they hold the cluster key, every
frame is MACed), on the admin port (cluster.xml `<cluster port>`, default 4700); the peer
installs it the same way and answers with the outcome.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controller.config import ClusterConfig, ConfigError, load_cluster, load_module
from controller.paths import Layout
from hafs import protocol as p
from hafs import wire

log = logging.getLogger(__name__)

DEFAULT_ADMIN_PORT = 4700
PUSH_TIMEOUT = 30.0


class ModuleError(Exception):
    """A module could not be installed or pushed; the message says why."""


# ---------------------------------------------------------------------- installing


def install(layout: Layout, name: str, source: Path) -> Path:
    """Install (or replace) module `name` from a directory or a .safe file."""
    if not name or "/" in name or name.startswith("."):
        raise ModuleError(f"bad module name {name!r}")
    with tempfile.TemporaryDirectory(prefix="hafs-module-") as tmp:
        staged = Path(tmp) / name
        _stage(source, staged)
        cluster = load_cluster(layout.cluster_xml) if layout.cluster_xml.exists() else None
        try:
            load_module(staged, cluster, name=name)
        except ConfigError as e:
            raise ModuleError(f"module {name} not installed:\n{e}") from None
        target = layout.module_dir(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Beside the target (a dot name the daemon skips): the swap is a rename, never a copy.
        new = target.with_name(f".{name}.new-{secrets.token_hex(4)}")
        try:
            shutil.copytree(staged, new, symlinks=True)
            for script in (new / "bin").iterdir():
                if script.is_file() and not script.is_symlink():  # never chmod a link's target
                    script.chmod(script.stat().st_mode | 0o755)
            old = _swap_in(new, target)
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _swap_in(new: Path, target: Path) -> Path | None:
    """Put directory `new` at `target`; return where the old `target` went (None: none)."""
    if not target.exists():
        new.rename(target)
        return None
    if _rename_exchange(new, target):
        return new
    # No atomic exchange on this kernel or filesystem: the old one goes aside, the new one
    # in, with a window of one rename where the target is missing.
    aside = new.with_name(new.name.replace(".new-", ".old-", 1))
    target.rename(aside)
    try:
        new.rename(target)
    except OSError:
        aside.rename(target)
        raise
    return aside


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap `a` and `b` atomically (Linux renameat2 RENAME_EXCHANGE); False where the C
    library, kernel or filesystem cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if done == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _stage(source: Path, staged: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, staged, symlinks=True)
        return
    if not source.is_file() or not zipfile.is_zipfile(source):
        raise ModuleError(f"{source}: neither a module directory nor a .safe (zip) file")
    with zipfile.ZipFile(source) as z:
        _extract(z, staged, str(source))


def _extract(z: zipfile.ZipFile, staged: Path, what: str) -> None:
    """Extract a module zip, refusing paths that leave the directory; accept a zip whose
    single top-level directory holds the module (SafeKit's .safe files have one)."""
    for member in z.namelist():
        if member.startswith("/") or ".." in Path(member).parts:
            raise ModuleError(f"{what}: refusing the unsafe path {member!r}")
    z.extractall(staged)
    inner = list(staged.iterdir())
    if not (staged / "conf").is_dir() and len(inner) == 1 and inner[0].is_dir():
        holder = staged.with_name(staged.name + ".inner")
        inner[0].rename(holder)
        staged.rmdir()
        holder.rename(staged)


def zip_module(directory: Path) -> bytes:
    """The module directory as a zip (symlinks stored as links would be lost: followed)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(directory).as_posix())
    return buf.getvalue()


# ---------------------------------------------------------------------- pushing


def admin_port(cluster: ClusterConfig) -> int:
    return cluster.port or DEFAULT_ADMIN_PORT


def push(layout: Layout, name: str, node: str) -> str:
    """Send installed module `name` to the peer of `node`; return the peer's answer."""
    directory = layout.module_dir(name)
    if not directory.is_dir():
        raise ModuleError(f"no module {name!r} installed here ({directory})")
    cluster = load_cluster(layout.cluster_xml)
    key = p.read_key(str(layout.cluster_key))
    peer = cluster.peer(node)
    payload = json.dumps({"name": name}).encode() + b"\n" + zip_module(directory)
    if len(payload) > p.MAX_PAYLOAD:
        raise ModuleError(f"module {name} is {len(payload)} bytes zipped, over {p.MAX_PAYLOAD}")
    errors = []
    for lan in cluster.lans:  # the first lan that answers
        addr = (str(lan.node(peer).addr), admin_port(cluster))
        try:
            return _exchange(addr, key, payload)
        except (OSError, p.ProtocolError) as e:
            errors.append(f"{lan.name} {addr[0]}:{addr[1]}: {e}")
    raise ModuleError(f"cannot reach {peer}'s daemon: " + "; ".join(errors))


def _exchange(addr: tuple[str, int], key: bytes, payload: bytes) -> str:
    sock, keys = wire.connect(addr, key, p.Purpose.ADMIN, PUSH_TIMEOUT)
    with sock:
        sock.settimeout(PUSH_TIMEOUT)
        writer, reader = p.FrameWriter(keys.send), p.FrameReader(keys.recv)
        sock.sendall(b"".join(writer.seal(p.FrameType.MODULE, payload)))
        frames = wire.recv_frames(sock, reader)
    if not frames or frames[0].ftype is not p.FrameType.MODULE_RESULT:
        raise p.ProtocolError("no answer from the peer's daemon")
    reply: dict[str, Any] = json.loads(bytes(frames[0].payload))
    if not reply.get("ok"):
        raise ModuleError(f"the peer refused: {reply.get('message')}")
    return str(reply.get("message", ""))


class PushServer:
    """Accepts `module apply` from the peer on the admin port, in a thread of its own (the
    install is blocking file work; `on_installed` hands the news to the daemon's loop)."""

    def __init__(
        self,
        layout: Layout,
        key: bytes,
        addrs: list[tuple[str, int]],
        on_installed: Callable[[str], str],
    ) -> None:
        self.layout = layout
        self.key = key
        self.on_installed = on_installed
        self._socks = [socket.create_server(a) for a in addrs]
        self._threads = [
            threading.Thread(target=self._serve, args=(s,), daemon=True) for s in self._socks
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def close(self) -> None:
        for s in self._socks:
            s.close()

    def _serve(self, server: socket.socket) -> None:
        while True:
            try:
                conn, peer = server.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    self._handle(conn)
                except (OSError, p.ProtocolError, ValueError) as e:
                    log.warning("module push from %s rejected: %s", peer[0], e)
                except Exception:  # a bug in one push must not end the accept thread
                    log.exception("module push from %s failed", peer[0])

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(PUSH_TIMEOUT)
        keys, purpose = wire.server_handshake(conn, self.key)
        writer = p.FrameWriter(keys.send)
        try:
            if purpose is not p.Purpose.ADMIN:
                raise p.ProtocolError(f"unexpected purpose {purpose.name} on the admin port")
            frames = wire.recv_frames(conn, p.FrameReader(keys.recv))
            if not frames or frames[0].ftype is not p.FrameType.MODULE:
                raise p.ProtocolError("expected a MODULE frame")
            reply = self._install(bytes(frames[0].payload))
        except Exception as e:
            # Authenticated: the peer is told why, rather than seeing the connection drop.
            with contextlib.suppress(Exception):
                self._reply(conn, writer, {"ok": False, "message": f"{type(e).__name__}: {e}"})
            raise
        self._reply(conn, writer, reply)

    @staticmethod
    def _reply(conn: socket.socket, writer: p.FrameWriter, reply: dict[str, Any]) -> None:
        conn.sendall(b"".join(writer.seal(p.FrameType.MODULE_RESULT, json.dumps(reply).encode())))

    def _install(self, payload: bytes) -> dict[str, Any]:
        header, _, data = payload.partition(b"\n")
        name = str(json.loads(header)["name"])
        try:
            with tempfile.NamedTemporaryFile(suffix=".safe") as f:
                f.write(data)
                f.flush()
                target = install(self.layout, name, Path(f.name))
        except ModuleError as e:
            return {"ok": False, "message": str(e)}
        loaded = self.on_installed(name)
        log.info("module %s installed from the peer in %s", name, target)
        return {"ok": True, "message": f"installed {name} in {target}; {loaded}"}
