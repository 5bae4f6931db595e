"""Operator tools that live beside the package: the persistent test rig (tools/rig)."""
