# hafs: two-node high availability with synchronous file replication.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := fuse3 libfuse3-dev pkg-config python3-venv python3-dev gcc \
	mariadb-server mariadb-client sysbench fio iproute2 nftables attr psmisc iputils-ping strace

.PHONY: install install-system install-python test lint unit bench-fs bench-failover clean \
	demo rig-up rig-down rig-status install-remote start-remote status-remote bench-resync \
	bench bench-quick bench-commit

install: install-system install-python

install-system:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "apt: installing$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@modprobe fuse 2>/dev/null || true

install-python:
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[dev]'
	@$(VENV)/bin/hafs --help >/dev/null && echo "installed: $(VENV)/bin/hafs"

lint:
	$(VENV)/bin/ruff check hafs controller tests bench tools
	$(VENV)/bin/ruff format --check hafs controller tests bench tools
	$(VENV)/bin/mypy hafs controller

test: install lint
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

unit: install
	$(VENV)/bin/pytest -q tests/unit

bench-fs: install
	$(PY) bench/fs.py $(BENCH_ARGS)

bench-failover: install
	$(PY) bench/failover.py $(BENCH_ARGS)

bench-resync: install
	$(PY) bench/resync.py $(BENCH_ARGS)

# Issue 6: MariaDB on hafs vs local, standalone FUSE and semi-sync replication, on two network
# namespaces, with failover and data path figures (bench/README.md). bench-quick: < 5 minutes.
bench: install
	$(PY) bench/mysql.py $(BENCH_ARGS)

bench-quick: install
	$(PY) bench/mysql.py --quick $(BENCH_ARGS)

# What one commit (4 KiB write + fdatasync) costs each hafs process, per ack mode, against a
# standalone mount (bench/commit_path.py; BENCH_ARGS="--strace" adds the syscall counts).
bench-commit: install
	$(PY) bench/commit_path.py $(BENCH_ARGS)

# The main job (tools/demo): rig up, client writes through the VIP, node1 loses power, failover
# to node2 timed and checked, node1 reintegrates, swap back, summary, rig down (also on failure).
demo: install
	$(PY) tools/demo

# The persistent two-node MySQL rig (docs/rig.md): namespaces hafs-node1, hafs-node2,
# hafs-witness, hafs-client; node1 PRIM, node2 SECOND, MariaDB on the virtual IP.
rig-up: install
	tools/rig up

rig-down:
	tools/rig down

rig-status:
	tools/rig status

# Two real Debian servers over ssh (docs/rig.md): NODE1, NODE2 their LAN addresses, VIP free
# in the same subnet; ssh as $(SSH_USER) (default root) with a key.
install-remote: install-python
	@test -n "$(NODE1)" -a -n "$(NODE2)" -a -n "$(VIP)" || \
		{ echo "make install-remote NODE1=ADDR NODE2=ADDR VIP=ADDR"; exit 2; }
	tools/remote install $(NODE1) $(NODE2) $(VIP)

start-remote:
	tools/remote start $(NODE1) $(NODE2)

status-remote:
	tools/remote status $(NODE1) $(NODE2)

clean:
	rm -rf $(VENV) build *.egg-info
