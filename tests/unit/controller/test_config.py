"""Unit tests of controller.config: cluster.xml and userconfig.xml against the shipped XSDs
and the checks an XSD cannot make, on real files (data/ and variants written to tmp_path)."""

from __future__ import annotations

import shutil
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controller import config
from controller.config import (
    Checks,
    ClusterConfig,
    ClusterNode,
    ConfigError,
    ConfigProblem,
    Heart,
    Heartbeat,
    Lan,
    MonitoredProcess,
    ProcessMonitoring,
    ReplicatedDir,
    Replication,
    Service,
    SplitBrainCheck,
    UserScripts,
    VipInterface,
    VirtualAddress,
)
from hafs.cli import app

DATA = Path(__file__).parent / "data"
SEED_XML = DATA / "seed_userconfig.xml"
FULL_XML = DATA / "full_userconfig.xml"
CLUSTER_XML = DATA / "cluster.xml"
SEED = Path("/work/shared/seed/000_2fe4e5a527644610.txt")


def write(directory: Path, text: str, name: str = "userconfig.xml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def variant(base: Path, old: str, new: str) -> str:
    text = base.read_text()
    assert old in text, f"the variant's anchor {old!r} is not in {base.name}"
    return text.replace(old, new)


def make_module(parent: Path, userconfig: str, name: str = "mysql") -> Path:
    """A module directory as `hafs module install` takes it: conf/userconfig.xml + bin/."""
    module = parent / name
    (module / "conf").mkdir(parents=True)
    (module / "bin").mkdir()
    (module / "conf" / "userconfig.xml").write_text(userconfig)
    for script in ("start_prim", "stop_prim"):
        (module / "bin" / script).write_text("#!/bin/sh\nexit 0\n")
        (module / "bin" / script).chmod(0o755)
    return module


def only_problem(error: pytest.ExceptionInfo[ConfigError]) -> ConfigProblem:
    problems = error.value.problems
    assert len(problems) == 1, "\n".join(map(str, problems))
    return problems[0]


@pytest.fixture(scope="module")
def cluster() -> ClusterConfig:
    return config.load_cluster(CLUSTER_XML)


# ------------------------------------------------------------------ the seed


@pytest.mark.skipif(not SEED.exists(), reason="the shared seed is not on this machine")
def test_fixture_is_the_seed_linux_userconfig_with_only_the_address_filled_in() -> None:
    lines = SEED.read_text().splitlines()
    start = lines.index("userconfig.xml on Linux (description in the User's Guide)") + 1
    end = lines.index("</safe>", start) + 1
    expected = "\n".join(lines[start:end]) + "\n"
    assert expected.count('addr="VIRTUAL_TO_BE_DEFINED"') == 1
    filled = expected.replace('addr="VIRTUAL_TO_BE_DEFINED"', 'addr="10.77.0.100"')
    assert SEED_XML.read_text() == filled


def test_seed_userconfig_loads_into_the_expected_values() -> None:
    module = config.load_userconfig(SEED_XML)
    assert module.source == SEED_XML
    assert module.service == Service(
        mode="mirror", defaultprim="alone", maxloop=3, loop_interval=24 * 3600.0, failover=True
    )
    # pulse="700" and timeout="30000" are milliseconds, SafeKit's unit for <heart>.
    assert module.heart == Heart(
        pulse=0.7, timeout=30.0, heartbeats=(Heartbeat("default", "flow", 0.7, 30.0),)
    )
    assert module.heart.heartbeats[0].carries_replication
    assert module.vip is not None
    assert module.vip.interfaces == (
        VipInterface(
            (VirtualAddress(IPv4Address("10.77.0.100"), where="one_side_alias"),),
            check=True,
            arpreroute=True,
        ),
    )
    # polltimer="10" is seconds, SafeKit's unit for <errd>.
    assert module.errd == ProcessMonitoring(
        (MonitoredProcess("mysqld", action="restart", monitor_class="prim", atleast=1),),
        polltimer=10.0,
    )
    assert module.rfs == Replication(
        (ReplicatedDir("/var/lib/mysql", read_only=True),),
        async_mode="second",
        acl=False,
        nbrei=3,
        mountover=False,
    )
    assert module.user == UserScripts(
        nicestoptimeout=300.0, forcestoptimeout=300.0, logging="userlog", vars=()
    )
    assert module.check == Checks()
    assert module.check.splitbrain is None
    assert module.failover is None and module.vhost == () and module.macros == ()


def test_seed_module_directory_loads_against_the_cluster(
    tmp_path: Path, cluster: ClusterConfig
) -> None:
    module_dir = make_module(tmp_path, SEED_XML.read_text())
    module = config.load_module(module_dir, cluster)
    assert module.name == "mysql"
    assert module.source == module_dir / "conf" / "userconfig.xml"
    assert module.bin_dir == module_dir / "bin"
    assert cluster.lan(module.heart.heartbeats[0].name).name == "default"
    assert config.check(CLUSTER_XML, module_dir) == []


def test_the_placeholder_the_seed_ships_with_is_refused_clearly(tmp_path: Path) -> None:
    path = write(tmp_path, variant(SEED_XML, 'addr="10.77.0.100"', 'addr="VIRTUAL_TO_BE_DEFINED"'))
    with pytest.raises(ConfigError) as error:
        config.load_userconfig(path)
    problem = only_problem(error)
    assert (problem.file, problem.line) == (str(path), 18)
    assert (problem.element, problem.attribute) == ("virtual_addr", "addr")
    assert "still the template placeholder VIRTUAL_TO_BE_DEFINED" in problem.message
    assert "replace it with the virtual IP address" in problem.message
    assert str(problem).startswith(f"{path}:18: <virtual_addr> addr ")


# ------------------------------------------------------------------ broken userconfig.xml

# (id, text to replace in the seed, replacement, line, element, attribute, words in message)
BROKEN = [
    ("typo_in_element", '<heartbeat name="default" ident="flow">\n</heartbeat>',
     '<hearbeat name="default" ident="flow">\n</hearbeat>', 7, "hearbeat", None,
     ["<heart> has no element <hearbeat> (did you mean <heartbeat>?)", "allowed: <heartbeat>"]),
    ("wrong_enumeration", 'failover="on"', 'failover="yes"', 3, "service", "failover",
     ['<service> failover="yes" is not allowed', "expected on or off"]),
    ("missing_required_attribute", '<heartbeat name="default" ident="flow">',
     '<heartbeat ident="flow">', 7, "heartbeat", "name", ["<heartbeat> needs attribute 'name'"]),
    ("malformed_xml", "</errd>", "</errdd>", 27, None, None,
     ["malformed XML: mismatched tag", "<errd> of line 24 is still open"]),
    ("unknown_proc_action", 'action="restart"', 'action="reboot"', 26, "proc", "action",
     ['<proc> action="reboot" is not allowed', "restart, stopstart, stop or noaction",
      "handler script"]),
    ("negative_timeout", 'timeout="30000"', 'timeout="-30000"', 6, "heart", "timeout",
     ['<heart> timeout="-30000" is not allowed', "a whole number of milliseconds"]),
    ("zero_pulse", 'pulse="700"', 'pulse="0"', 6, "heart", "pulse",
     ['<heart> pulse="0" must be a positive duration']),
    ("timeout_not_after_pulse", 'timeout="30000"', 'timeout="700"', 6, "heart", "timeout",
     ["timeout (0.7s) must be longer than pulse (0.7s)"]),
    ("bad_ip", '"10.77.0.100"', '"10.77.0.300"', 18, "virtual_addr", "addr",
     ['<virtual_addr> addr="10.77.0.300" is not an IP address', "IPv4", "IPv6"]),
    ("host_name_for_vip", '"10.77.0.100"', '"vip.example.com"', 18, "virtual_addr", "addr",
     ["is not an IP address", "hafs resolves no host names"]),
    ("unknown_ack_mode", 'nbrei="3"', 'nbrei="3" ack="sync"', 32, "rfs", "ack",
     ['<rfs> ack="sync" is not allowed', "expected one of applied, fsync, receipt"]),
    ("unknown_attribute", 'nbrei="3"', 'nbrei="3" nbreii="4"', 32, "rfs", "nbreii",
     ["<rfs> has no attribute 'nbreii' (did you mean 'nbrei'?)", "allowed: async, acl, nbrei"]),
    ("relative_replicated_dir", 'dir="/var/lib/mysql"', 'dir="var/lib/mysql"', 33,
     "replicated", "dir", ['<replicated> dir="var/lib/mysql" is not allowed', "absolute path"]),
    ("root_replicated_dir", 'dir="/var/lib/mysql"', 'dir="/"', 33, "replicated", "dir",
     ["not the root"]),
    ("unknown_section", "vip>", "vipp>", 14, "vipp", None,
     ["<service> has no element <vipp> (did you mean <vip>?)", "allowed: <heart>, <rfs>"]),
    ("section_twice", "</heart>", '</heart>\n<heart><heartbeat name="x"/></heart>', 10,
     "heart", None, ["<heart> is not allowed here in <service>"]),
    ("missing_heart", '<heart pulse="700" timeout="30000">\n<heartbeat name="default" '
     'ident="flow">\n</heartbeat>\n</heart>', "", 3, "service", None,
     ["<service> needs <heart>"]),
    ("farm_mode", 'mode="mirror"', 'mode="farm"', 3, "service", "mode",
     ["expected mirror", "farm and light modes are not implemented"]),
    ("text_among_elements", '<heart pulse="700" timeout="30000">',
     '<heart pulse="700" timeout="30000">junk', 6, "heart", None,
     ["<heart> contains text ('junk')"]),
    ("atleast_below_minus_one", 'atleast="1"', 'atleast="-2"', 26, "proc", "atleast",
     ["-1 for no limit"]),
    ("bad_regex", 'class="prim"', 'class="prim" argregex="(["', 26, "proc", "argregex",
     ['<proc> argregex="([" is not a regular expression']),
    ("port_out_of_range", 'pulse="700"', 'pulse="700" port="70000"', 6, "heart", "port",
     ["a port number from 1 to 65535"]),
    ("flow_without_rfs", '<rfs mountover="off" async="second" acl="off" nbrei="3">\n'
     '<replicated dir="/var/lib/mysql" mode="read_only" />\n</rfs>', "", 7, "heartbeat",
     "ident", ['ident="flow" puts replication on this lan, but there is no <rfs>']),
    ("dtd_entities", "<!DOCTYPE safe>", '<!DOCTYPE safe [<!ENTITY big "xxxxxxxx">]>', 1, None,
     None, ["a DOCTYPE may only name the root"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("old", "new", "line", "element", "attribute", "words"),
    [case[1:] for case in BROKEN],
    ids=[case[0] for case in BROKEN],
)
def test_broken_userconfig_names_file_line_element_and_what_is_allowed(
    tmp_path: Path,
    old: str,
    new: str,
    line: int,
    element: str | None,
    attribute: str | None,
    words: list[str],
) -> None:
    path = write(tmp_path, variant(SEED_XML, old, new))
    with pytest.raises(ConfigError) as error:
        config.load_userconfig(path)
    problem = only_problem(error)
    assert (problem.file, problem.line) == (str(path), line), str(problem)
    assert (problem.element, problem.attribute) == (element, attribute), str(problem)
    for word in words:
        assert word in problem.message
    assert str(problem) == f"{path}:{line}: {problem.message}"
    assert error.value.file == str(path) and error.value.line == line


def test_every_problem_is_reported_at_once_in_line_order(tmp_path: Path) -> None:
    text = variant(SEED_XML, 'pulse="700"', 'pulse="0"').replace(
        'action="restart"', 'action="reboot"'
    )
    with pytest.raises(ConfigError) as error:
        config.load_userconfig(write(tmp_path, text))
    assert [(p.line, p.attribute) for p in error.value.problems] == [(6, "pulse"), (26, "action")]


@pytest.mark.parametrize(
    ("old", "new", "line", "element", "attribute", "words"),
    [
        ('defaultprim="alone"', 'defaultprim="node3"', 3, "service", "defaultprim",
         ["expected alone, lastprim or a node of", "(node1, node2)"]),
        ('name="default" ident', 'name="private" ident', 7, "heartbeat", "name",
         ['<heartbeat name="private"> is not allowed', "(default, repli)"]),
        ('"10.77.0.100"', '"10.77.0.2"', 18, "virtual_addr", "addr",
         ["is the address of node node2"]),
    ],
    ids=["defaultprim_not_a_node", "heartbeat_not_a_lan", "vip_is_a_node_address"],
)  # fmt: skip
def test_userconfig_names_are_checked_against_cluster_xml(
    tmp_path: Path,
    cluster: ClusterConfig,
    old: str,
    new: str,
    line: int,
    element: str,
    attribute: str,
    words: list[str],
) -> None:
    path = write(tmp_path, variant(SEED_XML, old, new))
    config.load_userconfig(path)  # valid on its own: only cluster.xml tells
    with pytest.raises(ConfigError) as error:
        config.load_userconfig(path, cluster)
    problem = only_problem(error)
    assert (problem.line, problem.element, problem.attribute) == (line, element, attribute)
    for word in words:
        assert word in problem.message


def test_defaultprim_takes_a_node_name_lastprim_or_alone(
    tmp_path: Path, cluster: ClusterConfig
) -> None:
    for value in ("alone", "lastprim", "node2"):
        text = variant(SEED_XML, 'defaultprim="alone"', f'defaultprim="{value}"')
        path = write(tmp_path, text, f"{value}.xml")
        assert config.load_userconfig(path, cluster).service.defaultprim == value


# ------------------------------------------------------------------ the whole vocabulary


def test_every_documented_element_loads_with_its_units(
    tmp_path: Path, cluster: ClusterConfig
) -> None:
    module_dir = make_module(tmp_path, FULL_XML.read_text(), name="app")
    handler = module_dir / "bin" / "restart_agent"
    handler.write_text("#!/bin/sh\nexit 0\n")
    module = config.load_module(module_dir, cluster)

    assert module.service.defaultprim == "node1" and module.service.failover is False
    assert (module.service.boot_delay, module.service.loop_interval) == (5.0, 12 * 3600.0)
    assert module.heart.port == 8888
    assert module.heart.heartbeats == (
        Heartbeat("default", "flow", 0.5, 10.0),
        Heartbeat("repli", "backup", 1.0, 20.0),  # timeout="20000": milliseconds
    )
    assert module.vip is not None
    assert [a.addr for a in module.vip.addresses] == [
        IPv4Address("10.77.0.100"),
        IPv6Address("fd00:77::100"),
    ]
    assert module.vip.interfaces[0].name == "eth0"
    assert module.vip.interfaces[0].arpelapse == 600.0  # bare number: seconds
    assert module.errd is not None and module.errd.polltimer == 1.5
    agent = module.errd.procs[1]
    assert (agent.action, agent.handler, agent.monitor_class) == ("handler", handler, "agents")
    assert module.rfs is not None
    assert module.rfs.dirs == ("/srv/app/db", "/srv/app/logs")  # macro expanded, normalised
    assert module.rfs.replicated[0].notreplicated_regex == (r".*\.pid$",)
    assert module.rfs.syncdelta == 600.0  # bare number: minutes
    assert module.rfs.checktime == 220.0
    assert ("roflags", "0x10") in module.rfs.safekit_only
    assert module.rfs.reiallowedbw == 20000  # KB/s: the resync's maxrate
    assert (module.rfs.ack, module.rfs.xattrs) == ("fsync", False)  # hafs's own attributes
    assert module.user is not None and module.user.nicestoptimeout == 60.0
    assert module.user.env == {"MYSQL_SOCKET": "/run/mysqld/mysqld.sock", "APP_DATA": "/srv/app"}
    assert module.check.tcp[0].port == 3306 and module.check.tcp[0].timeout == 2.0
    assert module.check.ping[0].addr == IPv4Address("10.77.0.254")
    assert module.check.intf[0].local_addr == IPv4Address("10.77.0.1")
    assert module.check.module[0].port == 9010
    assert module.check.splitbrain == SplitBrainCheck(
        "witness", (IPv4Address("10.77.0.254"), IPv6Address("fd00:77::fe"))
    )
    assert module.failover is not None
    assert module.failover.rules == "disk_failure: if (custom.disk == down) then restart();"
    assert (module.failover.period, module.failover.handle_time) == (5.0, 15.0)
    assert module.vhost[0].name == "dbhost"
    assert module.macros == (("DATA", "/srv/app"),)


def test_a_handler_action_must_exist_in_bin(tmp_path: Path) -> None:
    module_dir = make_module(tmp_path, FULL_XML.read_text(), name="app")
    with pytest.raises(ConfigError) as error:
        config.load_module(module_dir)
    problem = only_problem(error)
    assert (problem.line, problem.element, problem.attribute) == (38, "proc", "action")
    assert str(module_dir / "bin" / "restart_agent") in problem.message


def test_undefined_macro_falls_back_to_the_environment(tmp_path: Path) -> None:
    text = variant(SEED_XML, 'dir="/var/lib/mysql"', 'dir="%MYSQL_DATA%"')
    path = write(tmp_path, text)
    module = config.load_userconfig(path, environ={"MYSQL_DATA": "/data/mysql"})
    assert module.rfs is not None and module.rfs.dirs == ("/data/mysql",)
    with pytest.raises(ConfigError) as error:
        config.load_userconfig(path, environ={})
    assert 'dir="%MYSQL_DATA%" is not allowed' in only_problem(error).message


def test_one_splitbrain_checker_with_ip_witnesses(tmp_path: Path) -> None:
    check = (
        '<check>\n<splitbrain ident="w" exec="ping" arg="10.0.0.254 router"/>\n'
        '<splitbrain ident="w2" exec="ping" arg="10.0.0.253"/>\n</check>\n</service>'
    )
    path = write(tmp_path, variant(SEED_XML, "</service>", check))
    with pytest.raises(ConfigError) as error:
        config.load_userconfig(path)
    assert [(p.line, p.attribute) for p in error.value.problems] == [(38, "arg"), (39, None)]
    assert "arg entry 'router' is not an IP address" in error.value.problems[0].message
    assert "only one <splitbrain>" in error.value.problems[1].message


def test_splitbrain_exec_is_ping(tmp_path: Path) -> None:
    check = '<check><splitbrain ident="w" exec="arping" arg="10.0.0.254"/></check>\n</service>'
    with pytest.raises(ConfigError) as error:
        config.load_userconfig(write(tmp_path, variant(SEED_XML, "</service>", check)))
    problem = only_problem(error)
    assert (problem.element, problem.attribute) == ("splitbrain", "exec")
    assert "expected ping" in problem.message


def test_arbitrating_witness_takes_one_address_and_a_port(tmp_path: Path) -> None:
    check = (
        '<check><splitbrain ident="w" exec="arbitrate" arg="10.0.0.3" port="5000"/>'
        "</check>\n</service>"
    )
    module = config.load_userconfig(write(tmp_path, variant(SEED_XML, "</service>", check)))
    assert module.check.splitbrain == SplitBrainCheck(
        "w", (IPv4Address("10.0.0.3"),), arbitrate=True, port=5000
    )
    two = check.replace('arg="10.0.0.3"', 'arg="10.0.0.3 10.0.0.4"')
    with pytest.raises(ConfigError) as error:
        config.load_userconfig(write(tmp_path, variant(SEED_XML, "</service>", two)))
    problem = only_problem(error)
    assert (problem.line, problem.element, problem.attribute) == (37, "splitbrain", "arg")
    assert "exactly one witness address" in problem.message


# ------------------------------------------------------------------ cluster.xml


def test_cluster_loads_into_the_expected_values(cluster: ClusterConfig) -> None:
    assert cluster == ClusterConfig(
        source=CLUSTER_XML,
        nodes=("node1", "node2"),
        lans=(
            Lan(
                "default",
                (
                    ClusterNode("node1", IPv4Address("10.77.0.1")),
                    ClusterNode("node2", IPv4Address("10.77.0.2")),
                ),
                command=True,
            ),
            Lan(
                "repli",
                (
                    ClusterNode("node1", IPv4Address("10.78.0.1")),
                    ClusterNode("node2", IPv6Address("fd00:78::2"), IPv6Address("fd00:78::12")),
                ),
            ),
        ),
    )
    assert cluster.peer("node1") == "node2"
    assert cluster.lan("repli").node("node2").local_addr == IPv6Address("fd00:78::12")
    with pytest.raises(KeyError):
        cluster.lan("private")


@pytest.mark.parametrize(
    ("old", "new", "line", "element", "attribute", "words"),
    [
        ('<node name="node2" addr="10.77.0.2"/>',
         '<node name="node2" addr="10.77.0.2"/>\n      <node name="node3" addr="10.77.0.3"/>',
         7, "node", None, ['a third <node> in <lan name="default">', "exactly two nodes"]),
        ('      <node name="node2" addr="10.77.0.2"/>\n', "", 4, "lan", None,
         ['<lan name="default"> has 1 <node>', "exactly two nodes"]),
        ("10.78.0.1", "node1.example.com", 9, "node", "addr",
         ['<node> addr="node1.example.com" is not an IP address']),
        ("fd00:78::12", "fd00:78::zz", 10, "node", "laddr", ["is not an IP address"]),
        ('<node name="node1" addr="10.78.0.1"/>', '<node name="nodeA" addr="10.78.0.1"/>', 8,
         "lan", None, ["has nodes nodeA, node2 but", "same name on every lan"]),
        ('<node name="node2" addr="10.77.0.2"/>', '<node name="node1" addr="10.77.0.2"/>', 6,
         "node", "name", ['<node> name="node1" is given twice in <lan name="default">']),
        ('<lan name="repli">', '<lan name="default">', 8, "lan", "name",
         ['<lan> name="default" is given twice (first at line 4)']),
        ('<node name="node2" addr="10.77.0.2"/>', '<node name="node2"/>', 6, "node", "addr",
         ["<node> needs attribute 'addr': an IP address"]),
        ('<lan name="repli">', '<lan name="repli" comand="on">', 8, "lan", "comand",
         ["<lan> has no attribute 'comand' (did you mean 'command'?)"]),
        ('<lan name="repli">', '<lan name="repli" command="on">', 8, "lan", "command",
         ['only one <lan> may have command="on"']),
        ('<lan name="repli">', '<lan name="repli" command="yes">', 8, "lan", "command",
         ["expected on or off"]),
        ("<lans>", "<lans><lan>", 12, None, None,
         ["malformed XML: mismatched tag", "<lan> of line 3 is still open"]),
    ],
    ids=["three_nodes", "one_node", "host_name", "bad_laddr", "names_differ_across_lans",
         "node_twice", "lan_twice", "missing_addr", "unknown_attribute", "two_command_lans",
         "wrong_enumeration", "malformed"],
)  # fmt: skip
def test_broken_cluster_names_file_line_element_and_what_is_allowed(
    tmp_path: Path,
    old: str,
    new: str,
    line: int,
    element: str | None,
    attribute: str | None,
    words: list[str],
) -> None:
    path = write(tmp_path, variant(CLUSTER_XML, old, new), "cluster.xml")
    with pytest.raises(ConfigError) as error:
        config.load_cluster(path)
    problem = only_problem(error)
    assert problem.file == str(path)
    assert (problem.line, problem.element, problem.attribute) == (line, element, attribute)
    for word in words:
        assert word in problem.message


def test_a_cluster_file_is_not_a_userconfig_and_back() -> None:
    with pytest.raises(ConfigError) as error:
        config.load_cluster(SEED_XML)
    assert (
        only_problem(error).message == "root element is <safe>; cluster.xml starts with <cluster>"
    )
    with pytest.raises(ConfigError) as error:
        config.load_userconfig(CLUSTER_XML)
    assert only_problem(error).line == 2


# ------------------------------------------------------------------ check() and modules


def test_check_detects_each_kind_by_its_root(tmp_path: Path) -> None:
    assert config.detect(CLUSTER_XML) == "cluster"
    assert config.detect(SEED_XML) == "userconfig"
    assert config.detect(tmp_path) == "module"
    other = write(tmp_path, "<?xml version='1.0'?>\n<config/>\n", "other.xml")
    problems = config.check(other, tmp_path / "missing.xml")
    assert [(p.file, p.line) for p in problems] == [
        (str(other), 2),
        (str(tmp_path / "missing.xml"), None),
    ]
    assert "neither <safe>" in problems[0].message
    assert str(problems[1]) == f"{tmp_path / 'missing.xml'}: no such file or directory"
    second = write(tmp_path, CLUSTER_XML.read_text(), "cluster.xml")
    assert [str(p) for p in config.check(CLUSTER_XML, second)] == [
        f"{second}: a second cluster.xml: the modules are checked against {CLUSTER_XML}"
    ]


def test_a_module_needs_conf_userconfig_and_bin(tmp_path: Path) -> None:
    module_dir = make_module(tmp_path, SEED_XML.read_text())
    shutil.rmtree(module_dir / "bin")
    with pytest.raises(ConfigError) as error:
        config.load_module(module_dir)
    assert str(only_problem(error)) == (
        f"{module_dir}: no bin/ directory: a module is a directory with conf/userconfig.xml "
        "and bin/"
    )
    (module_dir / "conf" / "userconfig.xml").unlink()
    (module_dir / "bin").mkdir()
    with pytest.raises(ConfigError) as error:
        config.load_module(module_dir)
    assert "no conf/userconfig.xml" in only_problem(error).message


def test_empty_and_unreadable_files(tmp_path: Path) -> None:
    empty = write(tmp_path, "")
    with pytest.raises(ConfigError) as error:
        config.load_userconfig(empty)
    assert str(only_problem(error)) == f"{empty}:1: malformed XML: no element found (column 1)"
    with pytest.raises(ConfigError) as error:
        config.load_userconfig(tmp_path / "absent.xml")
    assert only_problem(error).message.startswith("cannot read")


def test_the_schemas_ship_in_the_package() -> None:
    assert sorted(p.name for p in config.SCHEMA_DIR.glob("*.xsd")) == [
        "cluster.xsd",
        "userconfig.xsd",
    ]


# ------------------------------------------------------------------ hafs config check


def test_cli_prints_ok_for_valid_files_and_exits_0(tmp_path: Path) -> None:
    module_dir = make_module(tmp_path, SEED_XML.read_text())
    result = CliRunner().invoke(app, ["config", "check", str(CLUSTER_XML), str(module_dir)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [f"ok: {CLUSTER_XML}", f"ok: {module_dir}"]


def test_cli_prints_file_line_message_and_exits_1(tmp_path: Path) -> None:
    text = variant(SEED_XML, 'action="restart"', 'action="reboot"')
    module_dir = make_module(tmp_path, text.replace('defaultprim="alone"', 'defaultprim="n3"'))
    result = CliRunner().invoke(app, ["config", "check", str(module_dir), str(CLUSTER_XML)])
    assert result.exit_code == 1, result.output
    userconfig = module_dir / "conf" / "userconfig.xml"
    lines = result.output.splitlines()
    assert lines[0].startswith(f'{userconfig}:3: <service> defaultprim="n3" is not allowed')
    assert lines[1].startswith(f'{userconfig}:26: <proc> action="reboot" is not allowed')
    assert lines[2:] == [f"ok: {CLUSTER_XML}"]


def test_cli_checks_a_single_userconfig_or_cluster_file(tmp_path: Path) -> None:
    for path in (SEED_XML, CLUSTER_XML):
        result = CliRunner().invoke(app, ["config", "check", str(path)])
        assert (result.exit_code, result.output) == (0, f"ok: {path}\n")
    broken = write(tmp_path, variant(CLUSTER_XML, "10.77.0.2", "10.77.0.1"), "cluster.xml")
    result = CliRunner().invoke(app, ["config", "check", str(broken)])
    assert result.exit_code == 1
    assert result.output.startswith(f'{broken}:6: <node> addr="10.77.0.1" is given twice')


def test_cli_refuses_a_path_that_does_not_exist(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["config", "check", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "no such file or directory" in result.output
