"""The two-node rig's library: network namespaces (netns), nodes with their own PID and mount
namespaces (node), shared by tools/rig and the tests (tests/support)."""
