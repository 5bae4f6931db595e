"""Fixtures of the two-daemon tests: a rig per test, torn down even when the test fails."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.rig import Rig, two_node_rig


@pytest.fixture
def rig_base() -> Iterator[Path]:
    """A short base path: unix socket paths under a node's root must stay below 108 bytes."""
    base = Path(tempfile.mkdtemp(prefix="hr", dir="/var/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)  # the nodes' mounts died with their namespaces


@pytest.fixture
def rig(rig_base: Path) -> Iterator[Rig]:
    with two_node_rig(rig_base) as r:
        yield r
