"""Where a node keeps everything: one root, so two nodes can share a machine.

The default root "/" gives the Debian layout of design.md section 4: /etc/hafs (cluster.xml,
the cluster key), /var/lib/hafs (installed modules, persisted state, the `safekit` command),
/var/log/hafs (module and application logs) and /run/hafs (the control socket, pid files).
`--root R` or HAFS_ROOT=R puts the same tree under R; the rig gives each node its own root.

SafeKit's script environment maps onto it: SAFE is the node's hafs home (it holds the
`safekit` command the seed's scripts call as `$SAFE/safekit`), SAFEUSERBIN a module's bin/,
SAFEVAR the node's variable directory and SAFEBIN a directory of helper commands.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT_ENV = "HAFS_ROOT"


@dataclass(frozen=True)
class Layout:
    """Every path of one node, derived from its root."""

    root: Path

    @classmethod
    def from_env(cls, root: str | Path | None = None) -> Layout:
        """The layout for `root`, else $HAFS_ROOT, else "/"."""
        chosen = root if root is not None else os.environ.get(ROOT_ENV) or "/"
        return cls(Path(chosen))

    # ------------------------------------------------------------------ node-wide

    @property
    def etc(self) -> Path:
        return self.root / "etc/hafs"

    @property
    def cluster_xml(self) -> Path:
        return self.etc / "cluster.xml"

    @property
    def cluster_key(self) -> Path:
        return self.etc / "cluster.key"

    @property
    def home(self) -> Path:
        """SAFE: the node's hafs home."""
        return self.root / "var/lib/hafs"

    @property
    def safekit_command(self) -> Path:
        """`$SAFE/safekit`: SafeKit's command for the seed's scripts (printi, stop -i ...)."""
        return self.home / "safekit"

    @property
    def safebin(self) -> Path:
        """SAFEBIN: helper commands for scripts."""
        return self.home / "private/bin"

    @property
    def safevar(self) -> Path:
        """SAFEVAR: the node's variable directory, shared by its modules."""
        return self.home / "var"

    @property
    def modules(self) -> Path:
        return self.home / "modules"

    @property
    def logs(self) -> Path:
        return self.root / "var/log/hafs"

    @property
    def run(self) -> Path:
        return self.root / "run/hafs"

    @property
    def control_socket(self) -> Path:
        return self.run / "control.sock"

    @property
    def daemon_log(self) -> Path:
        return self.logs / "daemon.log"

    # ------------------------------------------------------------------ per module

    def module_dir(self, module: str) -> Path:
        """The installed module: conf/userconfig.xml and bin/ (SAFEUSERBIN)."""
        return self.modules / module

    def userconfig(self, module: str) -> Path:
        return self.module_dir(module) / "conf/userconfig.xml"

    def module_bin(self, module: str) -> Path:
        return self.module_dir(module) / "bin"

    @property
    def witness_state(self) -> Path:
        """`hafs witness serve`'s lease holders."""
        return self.home / "state" / "witness.json"

    def module_state(self, module: str) -> Path:
        """The module's persisted state (I7) and its data processes' state dirs."""
        return self.home / "state" / module

    def module_log(self, module: str) -> Path:
        """Every state change with its reason, every action and its outcome."""
        return self.logs / module / "module.log"

    def user_log(self, module: str) -> Path:
        """What the module's scripts print (SafeKit's userlog)."""
        return self.logs / module / "userlog.log"

    def module_run(self, module: str) -> Path:
        return self.run / module
