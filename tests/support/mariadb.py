"""A throwaway MariaDB server on a given datadir, for tests and benchmarks.

The datadir may be a hafs mount; everything else (my.cnf, socket, pid file, error log) lives
in a separate run dir so that only InnoDB's own files go through the file system under test.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

START_TIMEOUT = 120.0  # bootstrap + InnoDB recovery on a slow FUSE datadir
STOP_TIMEOUT = 60.0  # a clean shutdown flushes the buffer pool
SQL_TIMEOUT = 120.0


class MariaDBError(RuntimeError):
    """The server did not install, start, answer or stop as expected."""


def _binary(name: str, debian_path: str) -> str:
    found = shutil.which(name) or (debian_path if os.access(debian_path, os.X_OK) else None)
    if found is None:
        raise MariaDBError(f"{name} not found (apt package mariadb-server / mariadb-client)")
    return found


def _chown(path: Path, user: str) -> None:
    shutil.chown(path, user, user)


def _make_reachable(path: Path, user: str) -> None:
    """Let USER reach PATH: add the search (x) bit to ancestors that deny it.

    pytest's tmp dirs (/tmp/pytest-of-root, 0700) are the usual culprit. Search only: nobody
    gains the right to list them.
    """
    if _user_can(user, "-x", path):
        return
    for parent in reversed(path.resolve().parents):
        mode = parent.stat().st_mode
        if not mode & 0o001:
            os.chmod(parent, mode | 0o001)
    if not _user_can(user, "-x", path):
        # What is left: a FUSE mount without allow_other, or permissions inside it.
        raise MariaDBError(f"user {user} cannot reach {path} (FUSE mount without allow_other?)")


def _user_can(user: str, test_flag: str, path: Path) -> bool:
    if user == "root":
        return True
    cmd = ["runuser", "-u", user, "--", "test", test_flag, str(path)]
    return subprocess.run(cmd, capture_output=True, timeout=10, check=False).returncode == 0


def parse_sysbench(output: str) -> dict[str, float]:
    """tps, p95_ms, avg_ms, transactions, errors from `sysbench ... run` output."""
    patterns = {
        "transactions": r"transactions:\s+(\d+)",
        "tps": r"transactions:\s+\d+\s+\(([\d.]+) per sec",
        "errors": r"ignored errors:\s+(\d+)",
        "avg_ms": r"avg:\s+([\d.]+)",
        "p95_ms": r"95th percentile:\s+([\d.]+)",
    }
    result = {}
    for key, pattern in patterns.items():
        m = re.search(pattern, output)
        if m is None:
            raise MariaDBError(f"sysbench output has no {key}:\n{output[-2000:]}")
        result[key] = float(m.group(1))
    return result


@dataclass
class MariaDB:
    """One mariadbd. Use as a context manager (installs if the datadir is empty, starts,
    always stops and removes its run dir), or call start()/stop()/kill()/close() yourself."""

    datadir: Path
    port: int | None = None  # None: skip-networking, unix socket only
    binlog: bool = False
    user: str = "mysql"
    buffer_pool_size: str = "256M"
    log_file_size: str = "64M"
    flush_method: str | None = None  # None: the server default (O_DIRECT since 10.6)
    extra_cnf: dict[str, str] = field(default_factory=dict)
    run_dir: Path | None = None  # None: a fresh temp dir, removed by stop()
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _own_run_dir: bool = field(default=False, init=False, repr=False)
    _prepared: set[tuple[int, int]] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        self.mariadbd = _binary("mariadbd", "/usr/sbin/mariadbd")
        self.install_db = _binary("mariadb-install-db", "/usr/bin/mariadb-install-db")
        self.client = _binary("mariadb", "/usr/bin/mariadb")
        self.admin = _binary("mariadb-admin", "/usr/bin/mariadb-admin")
        if self.run_dir is None:
            # Under /tmp, short: the socket path must fit in sun_path (108 bytes).
            self.run_dir = Path(tempfile.mkdtemp(prefix="hafs-mdb-", dir="/tmp"))
            self._own_run_dir = True

    @property
    def rundir(self) -> Path:
        assert self.run_dir is not None  # set in __post_init__
        return self.run_dir

    @property
    def socket(self) -> Path:
        return self.rundir / "mysqld.sock"

    @property
    def cnf(self) -> Path:
        return self.rundir / "my.cnf"

    @property
    def error_log(self) -> Path:
        return self.rundir / "error.log"

    def _cnf_text(self) -> str:
        settings = {
            "datadir": str(self.datadir),
            "socket": str(self.socket),
            "pid-file": str(self.rundir / "mysqld.pid"),
            "log-error": str(self.error_log),
            "innodb_buffer_pool_size": self.buffer_pool_size,
            "innodb_flush_log_at_trx_commit": "1",  # every commit is an fdatasync to replicate
            "innodb_log_file_size": self.log_file_size,
            "skip-name-resolve": "",
        }
        if self.port is None:
            settings["skip-networking"] = ""
        else:
            settings.update({"port": str(self.port), "bind-address": "127.0.0.1"})
        if self.flush_method is not None:
            settings["innodb_flush_method"] = self.flush_method
        if self.binlog:
            settings.update({"log-bin": "mysql-bin", "server-id": "1", "sync_binlog": "1"})
        else:
            settings["skip-log-bin"] = ""
        settings.update(self.extra_cnf)
        lines = [f"{k} = {v}" if v else k for k, v in settings.items()]
        client = [f"socket = {self.socket}", "user = root"]
        return "\n".join(["[mysqld]", *lines, "", "[client]", *client, ""])

    def _prepare_dirs(self) -> None:
        self.datadir.mkdir(parents=True, exist_ok=True)
        self.rundir.mkdir(parents=True, exist_ok=True)
        self.cnf.write_text(self._cnf_text())
        for d in (self.datadir, self.rundir):
            _chown(d, self.user)
            _make_reachable(d, self.user)

    def installed(self) -> bool:
        return (self.datadir / "mysql").is_dir()

    def install(self) -> None:
        """mariadb-install-db into the (empty) datadir."""
        self._prepare_dirs()
        cmd = [
            self.install_db,
            f"--defaults-file={self.cnf}",  # the same log size etc. as the server will use
            f"--user={self.user}",
            f"--datadir={self.datadir}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=START_TIMEOUT)
        if result.returncode != 0:
            raise MariaDBError(
                f"mariadb-install-db failed ({result.returncode}):\n"
                f"{result.stdout[-2000:]}{result.stderr[-2000:]}\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.error_log.read_text(errors="replace")
        except OSError:
            return "(no error log)"
        return "\n".join(text.splitlines()[-lines:])

    def ping(self) -> bool:
        cmd = [self.admin, "--no-defaults", f"--socket={self.socket}", "-uroot", "ping"]
        try:
            result = subprocess.run(cmd, capture_output=True, timeout=10, check=False)
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start mariadbd (installing first if needed) and wait until it answers a ping."""
        if not self.installed():
            self.install()
        self._prepare_dirs()
        cmd = [self.mariadbd, f"--defaults-file={self.cnf}", f"--user={self.user}"]
        with open(self.rundir / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None:
                raise MariaDBError(f"mariadbd exited ({self.proc.returncode}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise MariaDBError(f"mariadbd not answering after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.2)

    def sql(self, query: str, database: str | None = None, timeout: float = SQL_TIMEOUT) -> str:
        """Run QUERY with the mariadb client; tab-separated rows without column names."""
        cmd = [self.client, "--no-defaults", f"--socket={self.socket}", "-uroot", "-N", "-B"]
        cmd += [database] if database else []
        result = subprocess.run(
            [*cmd, "-e", query], capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise MariaDBError(f"SQL failed: {query!r}: {result.stderr.strip()}")
        return result.stdout

    def _sysbench(self, test: str, action: str, args: list[str], timeout: float) -> str:
        cmd = ["sysbench", test, "--db-driver=mysql", f"--mysql-socket={self.socket}"]
        cmd += ["--mysql-user=root", "--mysql-db=sbtest", *args, action]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise MariaDBError(
                f"sysbench {test} {action} failed ({result.returncode}):\n"
                f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
        return result.stdout

    def sysbench(
        self,
        test: str = "oltp_write_only",
        threads: int = 4,
        seconds: int = 20,
        tables: int = 2,
        rows: int = 20000,
    ) -> dict[str, float]:
        """Prepare the sbtest tables (once per size) and run TEST; returns parse_sysbench()."""
        shape = [f"--tables={tables}", f"--table-size={rows}"]
        if (tables, rows) not in self._prepared:
            self.sql("DROP DATABASE IF EXISTS sbtest; CREATE DATABASE sbtest")
            self._sysbench(test, "prepare", shape, timeout=600)
            self._prepared = {(tables, rows)}  # the DROP above removed any other size
        args = [*shape, f"--threads={threads}", f"--time={seconds}", "--percentile=95"]
        out = self._sysbench(test, "run", args, timeout=seconds + 300)
        return parse_sysbench(out)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """mariadb-admin shutdown, SIGKILL if it does not go within TIMEOUT."""
        if self.proc is None or self.proc.poll() is not None:
            return
        cmd = [self.admin, "--no-defaults", f"--socket={self.socket}", "-uroot", "shutdown"]
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def kill(self) -> None:
        """SIGKILL, as a crash would; start() again runs InnoDB crash recovery."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        """stop(), and remove the run dir if we made it."""
        try:
            self.stop()
        finally:
            if self._own_run_dir:
                shutil.rmtree(self.rundir, ignore_errors=True)

    def __enter__(self) -> MariaDB:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
