# Shared by start_prim and stop_prim (sourced): how MariaDB runs on this node.
#
# With systemd (a real Debian server) MariaDB is the `mariadb` unit: disable it at boot
# (`systemctl disable mariadb`), hafs starts it on the primary only. Without systemd (the
# test rig: each node's PID 1 is a small init) mariadbd runs directly, as a child of this
# script left in the background, with conf/mariadb.cnf as its extra defaults file.

MARIADBD=/usr/sbin/mariadbd
SOCKET=/run/mysqld/mysqld.sock
CNF="${SAFEUSERCONF:-$(dirname "$0")/../conf}/mariadb.cnf"
MARIADB_LOG="${SAFEUSERVAR:-/var/log}/mariadbd.log"
START_WAIT=240   # seconds: InnoDB crash recovery after a failover can take a while
STOP_WAIT=240    # below <user nicestoptimeout="300">: the force stop comes after it

# The module log's line is written in the background: `safekit` is a Python program, a
# fifth of a second that a failover's start_prim would otherwise wait for, line by line.
log() { "$SAFE/safekit" printi "$*" & echo "$*"; }
warn() { "$SAFE/safekit" printw "$*" & echo "$*"; }

# systemd runs only when it is PID 1: in a rig node, /run/systemd is the host's.
with_systemd() {
    [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ] && command -v systemctl >/dev/null
}

running() { pgrep -x mariadbd >/dev/null; }

answers() { mariadb-admin --socket="$SOCKET" --connect-timeout=2 ping >/dev/null 2>&1; }

# wait_for CONDITION SECONDS: poll every tenth of a second (a failover waits on it)
wait_for() {
    n=$(($2 * 10))
    while [ "$n" -gt 0 ]; do
        $1 && return 0
        sleep 0.1
        n=$((n - 1))
    done
    return 1
}

stopped() { ! running; }

# kill_all SIGNAL: every mariadbd of this node (on a rig node, of its PID namespace only)
kill_all() {
    pkill "-$1" -x mariadbd
    pkill "-$1" -x mysqld_safe
    return 0
}
