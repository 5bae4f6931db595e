"""The daemon's local control API: JSON over a unix socket that only root can open.

One request per connection: the client sends one JSON object on one line, `{"cmd": "stop",
"module": "mysql", ...}`, and reads one JSON object back, `{"ok": true, "message": "..."}`
plus whatever the command returns. The socket is created mode 0600 in a 0700 directory,
so file permissions are the authentication, as for systemd's and SafeKit's local sockets.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from controller.paths import Layout

MAX_REQUEST = 1 << 20
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(Exception):
    """The daemon could not be reached, or answered something that is not a reply."""


def request(
    layout: Layout, cmd: str, module: str | None = None, timeout: float = 30.0, **args: Any
) -> dict[str, Any]:
    """Send one command to the local daemon and return its reply."""
    message = {"cmd": cmd, **({"module": module} if module else {}), **args}
    path = layout.control_socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(json.dumps(message).encode() + b"\n")
            s.shutdown(socket.SHUT_WR)
            data = _read_all(s)
    except FileNotFoundError:
        raise ControlError(f"the hafs daemon is not running (no {path})") from None
    except ConnectionRefusedError:
        raise ControlError(f"the hafs daemon is not running ({path} refuses)") from None
    except OSError as e:
        raise ControlError(f"cannot talk to the hafs daemon at {path}: {e}") from None
    try:
        reply: dict[str, Any] = json.loads(data)
    except ValueError:
        raise ControlError(f"the daemon's reply is not JSON: {data[:200]!r}") from None
    return reply


def _read_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


async def serve(path: Path, handle: Handler, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Accept requests on `path` until cancelled; `handle` answers each one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    if path.exists() or path.is_symlink():
        path.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        await sock.bind(str(path))
        path.chmod(0o600)
        sock.listen(16)
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await sock.accept()
                nursery.start_soon(_answer, conn, handle)


async def _answer(conn: trio.socket.SocketType, handle: Handler) -> None:
    with conn:
        try:
            with trio.fail_after(10):
                data = await _receive_request(conn)
            req = json.loads(data)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ValueError("a request is a JSON object with a string 'cmd'")
            reply = await handle(req)
        except (ValueError, trio.TooSlowError) as e:
            reply = {"ok": False, "message": f"bad request: {e}"}
        except Exception as e:  # a failing command must not take the daemon down
            logging.getLogger(__name__).exception("control request failed")
            reply = {"ok": False, "message": f"internal error: {e}"}
        # A client that went away gets no reply; nothing else to do.
        with contextlib.suppress(OSError, trio.BrokenResourceError):
            await trio.SocketStream(conn).send_all(json.dumps(reply).encode() + b"\n")


async def _receive_request(conn: trio.socket.SocketType) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await conn.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if b"\n" in chunk:
            break
        if size > MAX_REQUEST:
            raise ValueError("request too large")
    return b"".join(chunks).split(b"\n", 1)[0]
