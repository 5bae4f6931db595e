"""What is mounted where, from /proc/self/mountinfo, without touching the mount points
(stat() on a dead FUSE mount fails with ENOTCONN), and how to remove a mount whose
process is dead or hung."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from pathlib import Path


class UnmountError(Exception):
    """A mount stayed in place after every way of removing it."""


def _unescape(field_: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def mounts() -> list[tuple[str, str]]:
    """(mount point, fs type) for every mount visible to this process."""
    result = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            result.append((_unescape(left.split()[4]), right.split()[0]))
    return result


def normal(path: Path | str) -> str:
    # Resolve only the parent: stat()ing a dead FUSE mount point itself fails with ENOTCONN.
    p = Path(os.path.abspath(path))
    return str(p.parent.resolve() / p.name) if p.name else str(p)


def is_mounted(path: Path | str) -> bool:
    """True if PATH is a mount point."""
    target = normal(path)
    return any(mp == target for mp, _ in mounts())


def is_fuse_mounted(path: Path | str) -> bool:
    """True if a FUSE file system (hafs) is mounted at PATH."""
    target = normal(path)
    return any(mp == target and fstype.startswith("fuse") for mp, fstype in mounts())


def fuse_mounts_under(base: Path | str) -> list[str]:
    """FUSE mount points at or below BASE, deepest first (the order to unmount them in)."""
    root = normal(base)
    found = [
        mp
        for mp, fstype in mounts()
        if fstype.startswith("fuse") and (mp == root or mp.startswith(root + "/"))
    ]
    return sorted(found, key=len, reverse=True)


def force_unmount(path: Path | str) -> None:
    """Remove a mount even if its process is dead or hung: fusermount3 -u -z, then umount -l."""
    for cmd in (["fusermount3", "-u", "-z"], ["umount", "-l"]):
        if not is_mounted(path):
            return
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run([*cmd, str(path)], capture_output=True, timeout=10, check=False)
    if is_mounted(path):
        raise UnmountError(f"could not unmount {path}")
