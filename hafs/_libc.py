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


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_libc.syncfs.argtypes = [ctypes.c_int]

AT_FDCWD = -100
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
    for value in (uid, gid):
        # ctypes would silently wrap 2**32 to 0 (root); -1 means "leave unchanged".
        if not -1 <= value < 1 << 32:
            raise OverflowError(f"uid/gid {value} out of range")
    _check(_libc.fchownat(fd, b"", uid, gid, AT_EMPTY_PATH))


def utimens_fd(fd: int, atime_ns: int, mtime_ns: int) -> None:
    """Set the times of the file an fd (O_PATH included, symlinks included) refers to."""
    times = (_Timespec * 2)(
        _Timespec(*divmod(atime_ns, 1_000_000_000)), _Timespec(*divmod(mtime_ns, 1_000_000_000))
    )
    _check(_libc.utimensat(fd, b"", times, AT_EMPTY_PATH))


def syncfs(fd: int) -> None:
    """Flush the whole file system holding fd (an fd opened for reading, not O_PATH)."""
    _check(_libc.syncfs(fd))


def syncfs_dir(dir_fd: int) -> None:
    """Flush the whole file system holding a directory given by any fd, O_PATH too."""
    fd = os.open(f"/proc/self/fd/{dir_fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.syncfs(fd))
    finally:
        os.close(fd)
