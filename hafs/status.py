"""The status and command interface: a unix socket, one exchange per connection.

A client either sends nothing (it half-closes, or just waits) and gets the status snapshot,
or sends one JSON request line, `{"cmd": NAME, ...}`, and gets one JSON reply line. The
server waits REQUEST_WAIT for a request before it takes silence for a status query, so old
clients that never half-close still work; `query` half-closes and is answered at once.

Each connection is served on a thread of its own, away from the data path's event loop: a
status query must be answered while the loop is busy, and while a long command (a resync)
holds another connection.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REQUEST_WAIT = 0.25  # seconds a silent client waits for its snapshot
# A mount's answer to a command before its loop runs: ask again in a moment.
STARTING = "the mount is still starting"
MAX_REQUEST = 64 << 10

Snapshot = Callable[[], dict[str, Any]]
CommandHandler = Callable[[dict[str, Any]], dict[str, Any]]


class BadRequest(ValueError):
    """A request line that is not a JSON object with a string "cmd"."""


class StatusServer:
    def __init__(
        self, path: Path, snapshot: Snapshot, commands: CommandHandler | None = None
    ) -> None:
        self.path = path
        self._snapshot = snapshot
        self._commands = commands
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._thread = threading.Thread(target=self._serve, name="status", daemon=True)

    def start(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()
        self._sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self._sock.listen(8)
        self._thread.start()

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            conn_thread = threading.Thread(
                target=self._answer, args=(conn,), name="status-conn", daemon=True
            )
            conn_thread.start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                reply = self._reply(conn)
                conn.settimeout(REQUEST_WAIT * 20)  # a client that stops reading is dropped
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except Exception as e:  # a status query must never kill the process
                log.warning("status request failed: %s", e)

    def _reply(self, conn: socket.socket) -> dict[str, Any]:
        try:
            request = read_request(conn)
        except BadRequest as e:
            return {"ok": False, "message": f"bad request: {e}"}
        if request is None or request["cmd"] == "status":
            return self._snapshot()
        if self._commands is None:
            return {"ok": False, "message": "this process takes no commands"}
        return self._commands(request)


def read_request(conn: socket.socket) -> dict[str, Any] | None:
    """The client's request, or None when it sent nothing within REQUEST_WAIT."""
    conn.settimeout(REQUEST_WAIT)
    data = b""
    try:
        while b"\n" not in data and len(data) <= MAX_REQUEST:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        pass
    line = data.split(b"\n", 1)[0].strip()
    if not line:
        return None
    if len(line) > MAX_REQUEST:
        raise BadRequest(f"longer than {MAX_REQUEST} bytes")
    try:
        request = json.loads(line)
    except ValueError as e:
        raise BadRequest(f"not JSON: {e}") from None
    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
        raise BadRequest('expected a JSON object with a string "cmd"')
    return request


def _exchange(path: Path, request: bytes, timeout: float | None) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)  # "that is all": the server answers without waiting
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    result = json.loads(b"".join(chunks))
    if not isinstance(result, dict):
        raise ValueError(f"{path}: the reply is not a JSON object")
    return result


def query(path: Path, timeout: float = 5.0) -> dict[str, Any]:
    """The status snapshot of the process serving PATH."""
    return _exchange(path, b"", timeout)


def command(path: Path, request: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """Send one command (e.g. {"cmd": "mirror"}) and return its reply; timeout None waits
    as long as the command runs. Raises OSError or ValueError when no valid reply comes."""
    return _exchange(path, json.dumps(request).encode() + b"\n", timeout)
