"""The intf checker: the link under the virtual IP is down (`<interface check="on">`)."""

from __future__ import annotations

from dataclasses import dataclass

from controller.checkers import CheckResult
from controller.vip import link_up, operstate


@dataclass(frozen=True)
class InterfaceChecker:
    interface: str
    interval: float = 10.0  # SafeKit's checkers test every 10 s

    @property
    def name(self) -> str:
        return f"intf.{self.interface}"

    async def check(self) -> CheckResult:
        # Two small sysfs reads: not worth a thread.
        if link_up(self.interface):
            return CheckResult(True, f"{self.interface}: link up")
        return CheckResult(False, f"{self.interface}: link {operstate(self.interface)}")
