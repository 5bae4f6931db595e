"""The module log: one line per event, shared by the daemon and `hafs printi|printw|printe`.

Each line is `YYYY-MM-DD HH:MM:SS.mmm NODE L message`, L being I (info), W (warning) or E
(error), as in SafeKit's module log. Lines are appended with one write() on an O_APPEND
descriptor, so the daemon and scripts calling `$SAFE/safekit printi` can write at once
without interleaving.
"""

from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path

LEVELS = {"I": "info", "W": "warning", "E": "error"}


def format_line(node: str, level: str, message: str, now: float | None = None) -> str:
    t = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"
    flat = " ".join(message.splitlines())
    return f"{stamp} {node} {level} {flat}\n"


class ModuleLog:
    """Appends lines to one module's log file."""

    def __init__(self, path: Path, node: str) -> None:
        self.path = path
        self.node = node
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, level: str, message: str) -> None:
        if level not in LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
        line = format_line(self.node, level, message).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def info(self, message: str) -> None:
        self.write("I", message)

    def warning(self, message: str) -> None:
        self.write("W", message)

    def error(self, message: str) -> None:
        self.write("E", message)

    def tail(self, count: int) -> list[str]:
        """The last `count` lines (all when count <= 0)."""
        if not self.path.exists():
            return []
        with self.path.open(errors="replace") as f:
            if count <= 0:
                return f.read().splitlines()
            return list(deque((line.rstrip("\n") for line in f), maxlen=count))
