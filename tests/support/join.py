"""A replica + mount pair driven through `hafs fs mirror|alone|verify` (the join and
resync tests)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from tests.support.cluster import Pair, wait_until  # noqa: F401  (the join tests' helper)


@dataclass
class Counters:
    files_checked: int
    files_copied: int
    bytes_sent: int
    seconds: float
    passes: int  # live passes, then the paused last one
    paused_seconds: float  # how long the last pass held the application's writes


class Join(Pair):
    """A pair whose tests drive `hafs fs mirror|alone|verify`."""

    def hafs(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.hafs_bin), *args], capture_output=True, text=True, timeout=timeout
        )

    def mirror(self) -> Counters:
        """`hafs fs mirror`, which must succeed; its counters."""
        result = self.hafs("fs", "mirror", "--state-dir", str(self.mount_state))
        assert result.returncode == 0, result.stderr + result.stdout
        line = result.stdout.splitlines()[-1]
        assert line.startswith("resync: "), result.stdout
        fields = dict(pair.split("=") for pair in line.removeprefix("resync: ").split())
        return Counters(
            int(fields["files_checked"]),
            int(fields["files_copied"]),
            int(fields["bytes_sent"]),
            float(fields["seconds"]),
            int(fields["passes"]),
            float(fields["paused_seconds"]),
        )

    def alone(self, reason: str) -> subprocess.CompletedProcess[str]:
        args = ("fs", "alone", "--state-dir", str(self.mount_state), "--reason", reason)
        return self.hafs(*args)

    def assert_identical(self) -> None:
        result = self.hafs("fs", "verify", str(self.primary_dir), "--peer", self.peer,
                           "--key", str(self.key))  # fmt: skip
        assert result.returncode == 0, f"not identical:\n{result.stdout}{result.stderr}"
        assert result.stdout.startswith("identical:"), result.stdout
