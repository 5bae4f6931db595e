"""Fixtures shared by the data path's unit tests."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hafs.replica import ReplicaServer
from hafs.state import StateStore


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ReplicaServer]:
    """A replica server of tmp_path/data on a loopback port, in a thread; stopped after."""
    data = tmp_path / "data"
    data.mkdir()
    srv = ReplicaServer(str(data), ("127.0.0.1", 0), b"k" * 32, StateStore(tmp_path / "state"))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.listener.shutdown(socket.SHUT_RDWR)  # wakes accept(): closing alone does not
    srv.stop()
    thread.join(10)
    assert not thread.is_alive()
