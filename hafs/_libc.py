"""System calls Python's os module lacks."""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
]
_libc.fchownat.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
    ctypes.c_uint,
    ctypes.c_int,
]

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_EMPTY_PATH = 0x1000


def _check(ret: int) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def renameat2(olddir: int, old: bytes, newdir: int, new: bytes, flags: int) -> None:
    _check(_libc.renameat2(olddir, old, newdir, new, flags))


def fchown_fd(fd: int, uid: int, gid: int) -> None:
    """chown the file an fd (O_PATH included, symlinks included) refers to."""
    _check(_libc.fchownat(fd, b"", uid, gid, AT_EMPTY_PATH))
