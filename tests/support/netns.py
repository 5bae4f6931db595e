"""Network namespaces for tests: the rig's library (tools/riglib/netns.py), under the name
the tests import it by."""

from tools.riglib.netns import SWITCH, Bridge, LabError, Link, NetnsLab, Node

__all__ = ["SWITCH", "Bridge", "LabError", "Link", "NetnsLab", "Node"]
