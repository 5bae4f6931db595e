"""The mount command line the daemon builds from `<rfs>` is one the data path accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from controller.datapath import DataPath, Replicated
from hafs.cli import app


def mount_params(argv: list[str]) -> dict[str, object]:
    """Parse a daemon-built `python -m hafs.cli fs mount ...` as the CLI would."""
    assert argv[1:3] == ["-m", "hafs.cli"], argv
    fs = typer.main.get_command(app).commands["fs"]  # type: ignore[attr-defined]
    mount = fs.commands["mount"]
    ctx = mount.make_context("mount", argv[5:])
    return dict(ctx.params)


@pytest.mark.parametrize(("ack", "xattrs"), [("applied", True), ("receipt", False)])
def test_rfs_ack_and_xattrs_reach_the_mount(tmp_path: Path, ack: str, xattrs: bool) -> None:
    d = Replicated(tmp_path, tmp_path / "state", ("10.0.0.1", 7700), ("10.0.0.2", 7700))
    dp = DataPath([d], tmp_path / "key", tmp_path / "log", 3.0, ack=ack, xattrs=xattrs)
    (tmp_path / "key").write_bytes(b"k" * 32)
    params = mount_params(dp._mount_argv(d, alone=True))
    assert (params["ack"], params["xattrs"]) == (ack, xattrs)
    assert params["fence"] and params["alone"]
