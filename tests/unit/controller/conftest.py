"""Fixtures for the controller's unit tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.support.netns import NetnsLab


@pytest.fixture
def netns_lab() -> Iterator[NetnsLab]:
    """An empty lab (add_bridge, add_node ...), torn down after the test, even a failed one."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    for tool in ("ip", "nft", "ping"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (make install-system)")
    with NetnsLab() as lab:
        yield lab
