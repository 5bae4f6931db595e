"""Per-directory persistent state of a mount or a replica (the up-to-date flag, I7).

Each replicated directory gets a state directory of its own (default
$HAFS_ROOT/var/lib/hafs/fs/<escaped path>, HAFS_ROOT being the node's root, default /),
holding state.json,
the ALONE journal and the status socket, so two mounts or a mount and a replica on one
machine never collide.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path

STATE_SUBDIR = "var/lib/hafs/fs"  # under the node's root, as controller.paths lays it out


def default_state_dir(data_dir: str) -> Path:
    root = os.environ.get("HAFS_ROOT") or "/"
    escaped = os.path.abspath(data_dir).strip("/").replace("-", "\\x2d").replace("/", "-")
    return Path(root) / STATE_SUBDIR / (escaped or "root")


@dataclass(frozen=True)
class NodeState:
    """What must survive a crash of the process or of the node.

    mode: MIRROR (every change reached the peer), ALONE (changes since are journaled, the
    peer is stale) or STANDALONE (no peer configured).
    uptodate: this copy holds every acknowledged change. A replica sets it false when a
    session starts and true at the session's RESYNC_DONE (after a resync, or at once for a
    mount that starts in MIRROR if it was true before); a refused op sets it false.
    session_open: a mirror session started and has not ended cleanly; found true at start,
    it means this process crashed and ops may have been in flight.
    session: a mount's: the token of its last session whose RESYNC_DONE the replica made
    durable. The ALONE journal since then covers every change (hafs.resync trusts it).
    replica_of: a replica's: "<token>@<st_dev>:<st_ino of its root>" of the last session it
    completed; cleared when any session or mount starts on the directory.
    exact: a replica's: when its copy was last made identical to a primary's and durable
    (a RESYNC_DONE), what then described this directory's history (hafs.replica
    `history`); "" if never. While that description still holds, every file's size and
    mtime tell its content, and a resync may compare by them alone (hafs.resync).
    applying: a replica's: a session is applying ops and its copy is not yet synced to
    disk; found true at start, the replica or its node crashed: `exact` no longer holds.
    """

    role: str = ""
    mode: str = "MIRROR"
    uptodate: bool = True
    session_open: bool = False
    generation: int = 0
    session: str = ""
    replica_of: str = ""
    exact: str = ""
    applying: bool = False


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = state_dir / "state.json"
        self.current = self._load()
        # A replica updates from its apply thread and its fsync threads: one writer at a
        # time, or two would share the temporary file.
        self._lock = threading.Lock()

    def _load(self) -> NodeState:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return NodeState()
        except (OSError, ValueError) as e:
            raise RuntimeError(f"{self.path}: unreadable state ({e}); remove it to reset") from e
        known = {k: v for k, v in data.items() if k in NodeState.__dataclass_fields__}
        return NodeState(**known)

    def update(self, **changes: object) -> NodeState:
        """Persist durably (write, fsync, rename, fsync dir) before returning."""
        with self._lock:
            return self._write(replace(self.current, **changes))  # type: ignore[arg-type]

    def _write(self, new: NodeState) -> NodeState:
        write_json_durably(self.path, asdict(new))
        self.current = new
        return new


def write_json_durably(path: Path, data: object) -> None:
    """Replace `path` with `data` as JSON: written aside, fsynced, renamed, the directory
    fsynced, so a crash leaves the old content or the new, never a mix."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
