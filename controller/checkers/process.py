"""errd's process checker (`<errd><proc>`): too few or too many processes of a kind.

A process is of the kind when
- its name is `name`: the kernel's name for it (psutil's, which recovers names longer than
  the 15 characters of /proc/PID/comm) or the basename of its executable or of argv[0],
  when `name` is set;
- one of those names matches `nameregex`, when set;
- its arguments (argv[1:] joined by spaces) match `argregex`, when set.
Regexes match anywhere in the text (re.search), as POSIX regexec() does; anchor them with
^ and $ for a whole match. Zombies are not counted: they run nothing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import psutil
import trio

from controller.checkers import CheckResult

# Types only: importing the config module pulls in xmlschema, a second at start-up.
if TYPE_CHECKING:
    from controller.config import MonitoredProcess, ProcessMonitoring

_ATTRS = ["name", "exe", "cmdline", "status"]


@dataclass(frozen=True)
class ProcessChecker:
    proc: MonitoredProcess
    interval: float = 30.0  # errd's polltimer
    _name_re: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    _arg_re: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for attr, regex in (("_name_re", self.proc.nameregex), ("_arg_re", self.proc.argregex)):
            object.__setattr__(self, attr, re.compile(regex) if regex else None)

    @property
    def label(self) -> str:
        """How the operator named the processes: their name, or else the regexes."""
        p = self.proc
        return p.name or " ".join(
            f"{k}={v}" for k, v in (("nameregex", p.nameregex), ("argregex", p.argregex)) if v
        )

    @property
    def name(self) -> str:
        return f"errd.{self.label}"

    async def check(self) -> CheckResult:
        # A scan reads /proc for every process: off the event loop. Abandoning it on cancel
        # is safe, it has no effect.
        count = await trio.to_thread.run_sync(self.count, abandon_on_cancel=True)
        p = self.proc
        if count < p.atleast:
            return CheckResult(
                False, f"{self.label}: {count} running, at least {p.atleast} expected"
            )
        if p.atmax >= 0 and count > p.atmax:
            return CheckResult(False, f"{self.label}: {count} running, at most {p.atmax} expected")
        return CheckResult(True, f"{self.label}: {count} running")

    def count(self) -> int:
        """How many processes of the kind run now (blocking)."""
        return sum(1 for info in _processes() if self.matches(info))

    def matches(self, info: dict[str, object]) -> bool:
        """`info`: psutil's as_dict() with name, exe and cmdline."""
        if info.get("status") == psutil.STATUS_ZOMBIE:
            return False
        cmdline = info.get("cmdline")
        argv = [str(a) for a in cmdline] if isinstance(cmdline, list) else []
        names = {str(info.get("name") or "")}
        for path in (info.get("exe"), argv[0] if argv else None):
            if isinstance(path, str) and path:
                names.add(os.path.basename(path))
        names.discard("")
        if self.proc.name and self.proc.name not in names:
            return False
        if self._name_re is not None and not any(self._name_re.search(n) for n in names):
            return False
        return self._arg_re is None or bool(self._arg_re.search(" ".join(argv[1:])))


def process_checkers(errd: ProcessMonitoring) -> list[ProcessChecker]:
    return [ProcessChecker(p, errd.polltimer) for p in errd.procs]


def _processes() -> list[dict[str, object]]:
    # process_iter() skips processes that exit during the scan and gives None for what it
    # may not read (AccessDenied), so a busy or locked-down host does not fail the check.
    return [p.info for p in psutil.process_iter(_ATTRS, ad_value=None)]
