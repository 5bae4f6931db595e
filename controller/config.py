"""Configuration of the node controller, in SafeKit 8.2's vocabulary.

Two kinds of files, each validated with xmlschema against an XSD shipped in
controller/schemas/, then checked for what an XSD cannot say:

- cluster.xml: the two nodes and their addresses on each network (`<lan>`);
- a module: a directory with conf/userconfig.xml (what to run and how to fail over) and
  bin/ (the scripts: prestart, start_prim, stop_prim ...).

Loaders return frozen dataclasses or raise ConfigError, which lists every problem with
its file, line, element and attribute and says what is allowed. `check` returns the same
problems as a list, for `hafs config check`.

Durations are float seconds, whatever unit the file used: SafeKit reads a bare number in
the attribute's own unit (pulse="700" is 700 ms, polltimer="10" is 10 s, loop_interval="24"
is 24 h) and, since 8.2.5, accepts a unit suffix (700ms, 30s, 24h). Addresses are
ipaddress objects: hafs resolves no host names, so a failover never waits on DNS.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import os
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias, TypeVar
from xml.etree import ElementTree as ET
from xml.parsers import expat

import xmlschema
from xmlschema.validators import XsdAttributeGroup, XsdElement

from controller.arbiter import WITNESS_PORT

SCHEMA_DIR = Path(__file__).parent / "schemas"

# What SafeKit's module templates and the seed carry until the operator fills it in.
VIP_PLACEHOLDER = "VIRTUAL_TO_BE_DEFINED"

PROC_ACTIONS = ("restart", "stopstart", "stop", "noaction")

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

# unit: (multiplier, divisor) to seconds; dividing keeps 700ms at 0.7, not 0.7000000000000001
_UNIT_SECONDS = {
    "d": (86400, 1),
    "h": (3600, 1),
    "m": (60, 1),
    "s": (1, 1),
    "ms": (1, 1000),
    "us": (1, 1000000),
}
_DURATION = re.compile(r"([0-9]+)(d|h|m|s|ms|us)?")
_MACRO_REF = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)%")

_T = TypeVar("_T")


# ---------------------------------------------------------------- problems


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in one file: `str()` gives `FILE:LINE: message`."""

    file: str
    line: int | None
    message: str
    element: str | None = None
    attribute: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """The configuration is invalid; `problems` holds every problem found, by line."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = tuple(sorted(problems, key=lambda p: p.line or 0))
        super().__init__("\n".join(str(p) for p in self.problems))

    @property
    def file(self) -> str:
        return self.problems[0].file

    @property
    def line(self) -> int | None:
        return self.problems[0].line

    @property
    def element(self) -> str | None:
        return self.problems[0].element

    @property
    def attribute(self) -> str | None:
        return self.problems[0].attribute

    @property
    def message(self) -> str:
        return self.problems[0].message


# ---------------------------------------------------------------- cluster.xml


@dataclass(frozen=True)
class ClusterNode:
    """`<node name addr [laddr]>`: a node's address on one lan."""

    name: str
    addr: IPAddress
    laddr: IPAddress | None = None  # the local address behind NAT, when it differs

    @property
    def local_addr(self) -> IPAddress:
        """The address this node binds on the lan."""
        return self.laddr or self.addr


@dataclass(frozen=True)
class Lan:
    """`<lan name>`: one network joining the two nodes; heartbeats name it."""

    name: str
    nodes: tuple[ClusterNode, ...]
    command: bool = False

    def node(self, name: str) -> ClusterNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r} on lan {self.name!r}")


@dataclass(frozen=True)
class ClusterConfig:
    """cluster.xml: two nodes (`nodes`, their names) on one or more lans."""

    source: Path
    nodes: tuple[str, ...]
    lans: tuple[Lan, ...]
    port: int | None = None

    def lan(self, name: str) -> Lan:
        for lan in self.lans:
            if lan.name == name:
                return lan
        raise KeyError(f"no lan {name!r} in {self.source}")

    def peer(self, node: str) -> str:
        """The other node's name."""
        if node not in self.nodes:
            raise KeyError(f"no node {node!r} in {self.source}")
        return next(n for n in self.nodes if n != node)


# ---------------------------------------------------------------- userconfig.xml


@dataclass(frozen=True)
class Service:
    """`<service>` attributes."""

    mode: str = "mirror"
    boot: str = "ignore"
    boot_delay: float = 0.0
    failover: bool = True
    defaultprim: str = "alone"  # alone | lastprim | a node name
    maxloop: int = 3
    loop_interval: float = 24 * 3600.0  # 0: no limit
    automatic_reboot: bool = False


@dataclass(frozen=True)
class Heartbeat:
    """`<heartbeat name ident>`: heartbeats on the cluster.xml lan `name`."""

    name: str
    ident: str
    pulse: float
    timeout: float

    @property
    def carries_replication(self) -> bool:
        """ident="flow": the replication stream uses this lan too."""
        return self.ident == "flow"


@dataclass(frozen=True)
class Heart:
    """`<heart pulse timeout>`: the peer is lost after `timeout` without a heartbeat."""

    pulse: float
    timeout: float
    heartbeats: tuple[Heartbeat, ...]
    port: int | None = None
    permanent_arp: bool = True


@dataclass(frozen=True)
class VirtualAddress:
    """`<virtual_addr addr where>`."""

    addr: IPAddress
    where: str = "one_side_alias"
    check: bool = False
    connections: bool = False


@dataclass(frozen=True)
class VipInterface:
    """`<interface>`: virtual addresses set on one interface of the primary."""

    addresses: tuple[VirtualAddress, ...]
    name: str | None = None  # None: the interface whose subnet holds the address
    check: bool = True
    arpreroute: bool = False
    arpinterval: float = 60.0
    arpelapse: float = 1200.0


@dataclass(frozen=True)
class Vip:
    """`<vip>`: the virtual IP addresses that follow the primary."""

    interfaces: tuple[VipInterface, ...]
    tcpreset: bool = True

    @property
    def addresses(self) -> tuple[VirtualAddress, ...]:
        return tuple(a for i in self.interfaces for a in i.addresses)


@dataclass(frozen=True)
class MonitoredProcess:
    """`<proc>`: fewer than `atleast` (or more than `atmax`) processes run `action`."""

    name: str
    action: str = "stopstart"  # one of PROC_ACTIONS, or "handler" (see `handler`)
    monitor_class: str = "prim"  # SafeKit's class: when monitoring is on
    atleast: int = 1
    atmax: int = -1
    nameregex: str | None = None
    argregex: str | None = None
    service: bool = False
    start_after: int = 0
    restart_services: str | None = None
    handler: Path | None = None  # the script to run, when `action` is "handler"


@dataclass(frozen=True)
class ProcessMonitoring:
    """`<errd polltimer>`: process checks every `polltimer`."""

    procs: tuple[MonitoredProcess, ...]
    polltimer: float = 30.0


@dataclass(frozen=True)
class ReplicatedDir:
    """`<replicated dir mode>` with its `<tocheck>` and `<notreplicated>` filters."""

    dir: str
    read_only: bool = False
    tocheck: tuple[str, ...] = ()
    notreplicated: tuple[str, ...] = ()
    notreplicated_regex: tuple[str, ...] = ()


@dataclass(frozen=True)
class Replication:
    """`<rfs>`: the replicated directories and the replication settings hafs uses."""

    replicated: tuple[ReplicatedDir, ...]
    # SafeKit's: read, not used; hafs acks as `ack` says (its default is protocol C,
    # SafeKit's async="second" default is protocol B).
    async_mode: str = "second"
    ack: str = "applied"  # hafs: when a call returns (hafs.replicator.Ack)
    xattrs: bool = True  # hafs: off answers ENOSYS to xattr calls (faster MariaDB)
    acl: bool = False
    nbrei: int = 6
    nbremconn: int = 1
    mountover: bool | None = None
    syncdelta: float = 0.0  # 0: a stale node never becomes primary on its own
    locktimeout: float = 100.0
    sendtimeout: float = 30.0
    reitimeout: float = 150.0
    checktime: float = 220.0
    checkintv: float = 120.0
    reiallowedbw: int = 0  # KB/s a resync may send at most; 0: as fast as it can
    # Attributes SafeKit defines for its NFS and Windows implementation: accepted so
    # SafeKit modules load unchanged, not used by hafs.
    safekit_only: tuple[tuple[str, str], ...] = ()

    @property
    def dirs(self) -> tuple[str, ...]:
        return tuple(r.dir for r in self.replicated)


@dataclass(frozen=True)
class UserScripts:
    """`<user>`: run the module's scripts, with `vars` in their environment."""

    nicestoptimeout: float = 300.0
    forcestoptimeout: float = 300.0
    logging: str = "userlog"
    userlogsize: int = 2048  # KiB
    vars: tuple[tuple[str, str], ...] = ()

    @property
    def env(self) -> dict[str, str]:
        return dict(self.vars)


@dataclass(frozen=True)
class TcpCheck:
    ident: str
    when: str
    addr: IPAddress
    port: int
    action: str = "restart"
    interval: float = 10.0
    timeout: float = 5.0


@dataclass(frozen=True)
class PingCheck:
    ident: str
    addr: IPAddress
    when: str = "pre"
    action: str = "wait"
    interval: float = 10.0
    timeout: float = 5.0


@dataclass(frozen=True)
class InterfaceCheck:
    ident: str
    local_addr: IPAddress


@dataclass(frozen=True)
class IpCheck:
    ident: str
    addr: IPAddress
    when: str = "prim"
    interval: float = 10.0


@dataclass(frozen=True)
class CustomCheck:
    ident: str
    exec: str
    arg: str = ""
    when: str = "prim"
    action: str = "noaction"


@dataclass(frozen=True)
class ModuleCheck:
    name: str
    ident: str
    addr: IPAddress | None = None  # None: this node
    port: int | None = None
    interval: float = 10.0
    timeout: float = 5.0
    secure: bool = False


@dataclass(frozen=True)
class SplitBrainCheck:
    """`<splitbrain ident exec arg port>`: exec="ping", witnesses pinged when every
    heartbeat is lost; exec="arbitrate" (hafs), one witness running `hafs witness serve` on
    UDP `port` that grants the primary role to one node at a time (controller/arbiter.py)."""

    ident: str
    witnesses: tuple[IPAddress, ...]
    arbitrate: bool = False
    port: int = WITNESS_PORT


@dataclass(frozen=True)
class Checks:
    """`<check>`."""

    tcp: tuple[TcpCheck, ...] = ()
    ping: tuple[PingCheck, ...] = ()
    intf: tuple[InterfaceCheck, ...] = ()
    ip: tuple[IpCheck, ...] = ()
    custom: tuple[CustomCheck, ...] = ()
    module: tuple[ModuleCheck, ...] = ()
    splitbrain: SplitBrainCheck | None = None


@dataclass(frozen=True)
class FailoverRules:
    """`<failover period handle_time>` and its rule text."""

    rules: str = ""
    period: float = 5.0
    handle_time: float = 15.0


@dataclass(frozen=True)
class VirtualHostname:
    """`<virtualhostname name envfile when>`."""

    name: str
    envfile: str
    when: str = "prim"


@dataclass(frozen=True)
class ModuleConfig:
    """A module: its userconfig.xml. Fields are named after the SafeKit tags."""

    name: str
    source: Path
    bin_dir: Path | None
    service: Service
    heart: Heart
    vip: Vip | None = None
    errd: ProcessMonitoring | None = None
    rfs: Replication | None = None
    user: UserScripts | None = None
    check: Checks = Checks()
    failover: FailoverRules | None = None
    vhost: tuple[VirtualHostname, ...] = ()
    macros: tuple[tuple[str, str], ...] = ()


# ---------------------------------------------------------------- public entry points


def load_cluster(path: str | Path) -> ClusterConfig:
    """Read and validate cluster.xml; raise ConfigError."""
    path = Path(path)
    root = _parse(path)
    _expect_root(str(path), root, "cluster")
    schema = _schema("cluster")
    _validate(str(path), root, schema)
    reader = _Reader(str(path), schema)
    cluster = _cluster(reader, root, path)
    reader.raise_problems()
    return cluster


def load_userconfig(
    path: str | Path,
    cluster: ClusterConfig | None = None,
    *,
    name: str | None = None,
    bin_dir: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> ModuleConfig:
    """Read and validate a userconfig.xml; raise ConfigError.

    With `cluster`, heartbeat networks and defaultprim must name its lans and nodes.
    `bin_dir` (default: ../bin next to a conf/ directory) holds process-check handlers.
    `%NAME%` expands to `<macro name="NAME">`, else to the variable from `environ`.
    """
    path = Path(path)
    in_conf = path.parent.name == "conf"
    if bin_dir is None and in_conf:
        bin_dir = path.parent.parent / "bin"
    root = _parse(path)
    _expect_root(str(path), root, "safe")
    macros = _expand_macros(root, os.environ if environ is None else environ)
    schema = _schema("userconfig")
    _validate(str(path), root, schema)
    reader = _Reader(str(path), schema)
    module = _module(
        reader,
        root,
        name=name or (path.parent.parent.name if in_conf else path.stem),
        source=path,
        bin_dir=Path(bin_dir) if bin_dir is not None else None,
        cluster=cluster,
        macros=macros,
    )
    reader.raise_problems()
    return module


def load_module(
    directory: str | Path,
    cluster: ClusterConfig | None = None,
    *,
    name: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> ModuleConfig:
    """Read a module directory (conf/userconfig.xml + bin/); raise ConfigError."""
    directory = Path(directory)
    shape = "a module is a directory with conf/userconfig.xml and bin/"
    if not directory.is_dir():
        raise ConfigError([ConfigProblem(str(directory), None, f"not a directory: {shape}")])
    problems = []
    conf = directory / "conf" / "userconfig.xml"
    bin_dir = directory / "bin"
    if not bin_dir.is_dir():
        problems.append(ConfigProblem(str(directory), None, f"no bin/ directory: {shape}"))
    if not conf.is_file():
        problems.append(ConfigProblem(str(directory), None, f"no conf/userconfig.xml: {shape}"))
        raise ConfigError(problems)
    try:
        module = load_userconfig(
            conf, cluster, name=name or directory.name, bin_dir=bin_dir, environ=environ
        )
    except ConfigError as e:
        raise ConfigError([*problems, *e.problems]) from None
    if problems:
        raise ConfigError(problems)
    return module


Kind = Literal["module", "userconfig", "cluster"]


def detect(path: str | Path) -> Kind:
    """What `path` is: a module directory, a userconfig.xml or a cluster.xml (by root)."""
    path = Path(path)
    if path.is_dir():
        return "module"
    if not path.exists():
        raise ConfigError([ConfigProblem(str(path), None, "no such file or directory")])
    root = _parse(path)
    if root.tag == "safe":
        return "userconfig"
    if root.tag == "cluster":
        return "cluster"
    raise ConfigError(
        [
            ConfigProblem(
                str(path),
                root.sourceline,
                f"root element <{root.tag}> is neither <safe> (a module's userconfig.xml) "
                "nor <cluster> (cluster.xml)",
                root.tag,
            )
        ]
    )


def check(*paths: str | Path) -> list[ConfigProblem]:
    """Validate module directories, userconfig.xml and cluster.xml files; nothing runs.

    A cluster.xml among `paths` is the one the modules' lans and nodes are checked against.
    Returns every problem found; an empty list means all are valid.
    """
    problems: list[ConfigProblem] = []
    kinds: list[tuple[Path, Kind]] = []
    for path in map(Path, paths):
        try:
            kinds.append((path, detect(path)))
        except ConfigError as e:
            problems.extend(e.problems)
    cluster: ClusterConfig | None = None
    clusters = [path for path, kind in kinds if kind == "cluster"]
    for path in clusters[1:]:
        message = f"a second cluster.xml: the modules are checked against {clusters[0]}"
        problems.append(ConfigProblem(str(path), None, message))
    if clusters:
        try:
            cluster = load_cluster(clusters[0])
        except ConfigError as e:
            problems.extend(e.problems)
    for path, kind in kinds:
        try:
            if kind == "module":
                load_module(path, cluster)
            elif kind == "userconfig":
                load_userconfig(path, cluster)
        except ConfigError as e:
            problems.extend(e.problems)
    return problems


# ---------------------------------------------------------------- parsing


class _Element(ET.Element):
    """An element that knows where it is: xmlschema reports `sourceline` in its errors."""

    sourceline: int = 0
    path: str = ""


def _parse(path: Path) -> _Element:
    """Parse with expat directly: ElementTree keeps no line numbers."""
    file = str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError([ConfigProblem(file, None, f"cannot read: {e.strerror}")]) from None
    parser = expat.ParserCreate()
    parser.buffer_text = True
    stack: list[_Element] = []
    roots: list[_Element] = []

    def start(tag: str, attrs: dict[str, str]) -> None:
        elem = _Element(tag, attrs)
        elem.sourceline = parser.CurrentLineNumber
        elem.path = f"{stack[-1].path}/{tag}" if stack else f"/{tag}"
        (stack[-1].append if stack else roots.append)(elem)
        stack.append(elem)

    def end(tag: str) -> None:
        stack.pop()

    def text(data: str) -> None:
        if not stack:
            return
        if len(stack[-1]):
            last = stack[-1][-1]
            last.tail = (last.tail or "") + data
        else:
            stack[-1].text = (stack[-1].text or "") + data

    def refuse(*_: object) -> None:
        # An internal DTD subset can declare entities that expand without bound.
        raise _Refused(parser.CurrentLineNumber)

    def doctype(name: str, sysid: str | None, pubid: str | None, internal: bool) -> None:
        if sysid or pubid or internal:
            refuse()

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    parser.StartDoctypeDeclHandler = doctype
    parser.EntityDeclHandler = refuse
    try:
        parser.Parse(data, True)
    except expat.ExpatError as e:
        message = f"malformed XML: {expat.ErrorString(e.code)} (column {e.offset + 1})"
        if e.code == expat.errors.codes[expat.errors.XML_ERROR_TAG_MISMATCH] and stack:
            message += f"; <{stack[-1].tag}> of line {stack[-1].sourceline} is still open"
        raise ConfigError([ConfigProblem(file, e.lineno, message)]) from None
    except _Refused as e:
        message = "a DOCTYPE may only name the root (<!DOCTYPE safe>): no DTD, no entities"
        raise ConfigError([ConfigProblem(file, e.line, message)]) from None
    root = roots[0]
    for elem in root.iter():
        # Whitespace between elements is layout; SafeKit files have no mixed content.
        if elem.text is not None and not elem.text.strip():
            elem.text = None
        if elem.tail is not None and not elem.tail.strip():
            elem.tail = None
    return root


class _Refused(Exception):
    def __init__(self, line: int) -> None:
        self.line = line


def _expect_root(file: str, root: _Element, tag: str) -> None:
    if root.tag != tag:
        what = {"safe": "a module's userconfig.xml", "cluster": "cluster.xml"}[tag]
        message = f"root element is <{root.tag}>; {what} starts with <{tag}>"
        raise ConfigError([ConfigProblem(file, root.sourceline, message, root.tag)])


def _expand_macros(root: _Element, environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Expand %NAME% in attributes and text, as SafeKit does before reading the file."""
    macros = {m.get("name", ""): m.get("value", "") for m in root.findall("macro")}

    def expand(text: str) -> str:
        return _MACRO_REF.sub(lambda m: macros.get(m[1], environ.get(m[1], m[0])), text)

    for elem in root.iter():
        if elem.tag == "macro":
            continue
        for key, value in list(elem.attrib.items()):
            elem.attrib[key] = expand(value)
        if elem.text:
            elem.text = expand(elem.text)
    return tuple(macros.items())


# ---------------------------------------------------------------- the XSD


@functools.cache
def _schema(name: str) -> xmlschema.XMLSchema10:
    return xmlschema.XMLSchema10(str(SCHEMA_DIR / f"{name}.xsd"))


def _decl(schema: xmlschema.XMLSchema10, elem: _Element) -> XsdElement | None:
    decl = schema.find(elem.path)
    return decl if isinstance(decl, XsdElement) else None


def _validate(file: str, root: _Element, schema: xmlschema.XMLSchema10) -> None:
    problems: list[ConfigProblem] = []
    for error in schema.iter_errors(root):
        for problem in _explain(file, schema, error):
            if problem not in problems:
                problems.append(problem)
    if problems:
        raise ConfigError(problems)


def _explain(
    file: str, schema: xmlschema.XMLSchema10, error: xmlschema.XMLSchemaValidationError
) -> list[ConfigProblem]:
    """Turn an xmlschema error into problems that name the element, attribute and what
    is allowed; xmlschema's own reasons speak of facets and content models."""
    elem = error.elem
    if not isinstance(elem, _Element):
        return [ConfigProblem(file, None, error.reason or str(error))]
    if isinstance(error, xmlschema.XMLSchemaChildrenValidationError):
        return [_content_problem(file, schema, elem, error)]
    if isinstance(error.validator, XsdAttributeGroup):
        return _attribute_problems(file, elem, error.validator)
    decl = _decl(schema, elem)
    if decl is None:  # pragma: no cover - xmlschema only reports on declared elements
        return [ConfigProblem(file, elem.sourceline, f"<{elem.tag}>: {error.reason}", elem.tag)]
    problems = _value_problems(file, elem, decl.attributes)
    texts = [elem.text, *(child.tail for child in elem)]
    stray = next((t.strip() for t in texts if t), None)
    if not problems and stray and not decl.type.has_simple_content():
        message = f"<{elem.tag}> contains text ({stray[:40]!r}); only elements belong there"
        problems.append(ConfigProblem(file, elem.sourceline, message, elem.tag))
    return problems or [ConfigProblem(file, elem.sourceline, f"<{elem.tag}>: {error.reason}")]


def _content_problem(
    file: str,
    schema: xmlschema.XMLSchema10,
    elem: _Element,
    error: xmlschema.XMLSchemaChildrenValidationError,
) -> ConfigProblem:
    expected = _tags(getattr(x, "local_name", None) for x in error.expected or ())
    decl = _decl(schema, elem)
    content = getattr(decl.type, "content", None) if decl is not None else None
    allowed = [e.local_name for e in content.iter_elements()] if content is not None else []
    if error.index >= len(elem):
        needed = " or ".join(expected) or "more elements"
        return ConfigProblem(file, elem.sourceline, f"<{elem.tag}> needs {needed}", elem.tag)
    child = elem[error.index]
    if not isinstance(child, _Element):  # pragma: no cover - _parse builds only _Element
        raise TypeError(child)
    if child.tag in allowed:
        message = f"<{child.tag}> is not allowed here in <{elem.tag}>"
        message += f"; expected {' or '.join(expected)}" if expected else " (one too many)"
    elif allowed:
        message = f"<{elem.tag}> has no element <{child.tag}>"
        message += _did_you_mean(child.tag, allowed, "<{}>")
        message += f"; allowed: {', '.join(_tags(allowed))}"
    else:
        message = f"<{elem.tag}> has no child elements; remove <{child.tag}>"
    return ConfigProblem(file, child.sourceline, message, child.tag)


def _attribute_problems(
    file: str, elem: _Element, declared: XsdAttributeGroup
) -> list[ConfigProblem]:
    names = [name for name in declared if name]
    problems = []
    for name in elem.attrib:
        if name not in declared:
            if names:
                message = f"<{elem.tag}> has no attribute '{name}'"
                message += _did_you_mean(name, names, "'{}'")
                message += f"; allowed: {', '.join(names)}"
            else:
                message = f"<{elem.tag}> takes no attributes; remove '{name}'"
            problems.append(ConfigProblem(file, elem.sourceline, message, elem.tag, name))
    for key, attr in declared.items():
        if key and attr.use == "required" and key not in elem.attrib:
            message = f"<{elem.tag}> needs attribute '{key}': {_allowed(attr.type)}"
            problems.append(ConfigProblem(file, elem.sourceline, message, elem.tag, key))
    return problems


def _value_problems(file: str, elem: _Element, declared: XsdAttributeGroup) -> list[ConfigProblem]:
    problems = []
    for name, value in elem.attrib.items():
        attr = declared.get(name)
        if attr is not None and attr.type is not None and not attr.type.is_valid(value):
            message = (
                f'<{elem.tag}> {name}="{value}" is not allowed: expected {_allowed(attr.type)}'
            )
            problems.append(ConfigProblem(file, elem.sourceline, message, elem.tag, name))
    return problems


def _allowed(xsd_type: object) -> str:
    """What a simple type accepts, in words: its documentation, else its enumeration."""
    annotation = getattr(xsd_type, "annotation", None)
    docs = getattr(annotation, "documentation", None) or []
    if docs and docs[0].text:
        return " ".join(docs[0].text.split())
    values = [str(v) for v in getattr(xsd_type, "enumeration", None) or []]
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return f"{values[0]} or {values[1]}"
    if values:
        return "one of " + ", ".join(values)
    return "a value"


def _tags(names: Iterable[str | None]) -> list[str]:
    return [f"<{name}>" for name in names if name]


def _did_you_mean(name: str, options: Sequence[str], quote: str) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.75)
    return f" (did you mean {quote.format(close[0])}?)" if close else ""


# ---------------------------------------------------------------- reading values


class _Reader:
    """Reads typed values from a valid tree and collects the problems XSD cannot see."""

    def __init__(self, file: str, schema: xmlschema.XMLSchema10) -> None:
        self.file = file
        self.schema = schema
        self.problems: list[ConfigProblem] = []

    def problem(self, elem: _Element, message: str, attribute: str | None = None) -> None:
        self.problems.append(
            ConfigProblem(self.file, elem.sourceline, message, elem.tag, attribute)
        )

    def raise_problems(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)

    def flag(self, elem: _Element, name: str, default: bool) -> bool:
        value = elem.get(name)
        return default if value is None else value in ("on", "yes")

    def integer(self, elem: _Element, name: str, default: int) -> int:
        value = elem.get(name)
        return default if value is None else int(value)

    def duration(self, elem: _Element, name: str, default: float, *, zero: bool = False) -> float:
        """Seconds; the XSD already matched [0-9]+(unit)?, so only zero is left to refuse."""
        value = elem.get(name)
        if value is None:
            return default
        match = _DURATION.fullmatch(value)
        if match is None:  # pragma: no cover - the XSD pattern is the same
            raise ValueError(value)
        multiplier, divisor = _UNIT_SECONDS[match[2] or self._unit(elem, name)]
        seconds = int(match[1]) * multiplier / divisor
        if seconds <= 0 and not zero:
            self.problem(elem, f'<{elem.tag}> {name}="{value}" must be a positive duration', name)
        return seconds

    def _unit(self, elem: _Element, name: str) -> str:
        # The default unit is in the XSD type's name: duration-ms, duration-s ...
        decl = _decl(self.schema, elem)
        xsd_type = decl.attributes[name].type if decl is not None else None
        return (getattr(xsd_type, "local_name", None) or "duration-s").removeprefix("duration-")

    def address(self, elem: _Element, name: str, value: str | None = None) -> IPAddress | None:
        """An IP address; IPv6 may be bracketed as SafeKit writes it ([2001:db8::1])."""
        text = elem.get(name, "") if value is None else value
        bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        try:
            return ipaddress.ip_address(bare)
        except ValueError:
            shown = f'{name}="{text}"' if value is None else f"{name} entry '{text}'"
            self.problem(
                elem,
                f"<{elem.tag}> {shown} is not an IP address: give an IPv4 address (10.0.0.1) "
                "or an IPv6 address ([2001:db8::1]); hafs resolves no host names",
                name,
            )
            return None

    def unique(self, elems: Sequence[_Element], attribute: str, scope: str = "") -> None:
        """Refuse a value of `attribute` given twice among `elems`."""
        seen: dict[str, _Element] = {}
        for elem in elems:
            value = elem.get(attribute, "")
            if value in seen:
                first = seen[value].sourceline
                message = f'<{elem.tag}> {attribute}="{value}" is given twice{scope}'
                self.problem(elem, f"{message} (first at line {first})", attribute)
            else:
                seen[value] = elem


# ---------------------------------------------------------------- cluster.xml checks


def _cluster(r: _Reader, root: _Element, source: Path) -> ClusterConfig:
    lans_elem = _child(root, "lans")
    lan_elems = _children(lans_elem, "lan")
    r.unique(lan_elems, "name")
    commands = [e for e in lan_elems if e.get("command") == "on"]
    for extra in commands[1:]:
        r.problem(extra, 'only one <lan> may have command="on"', "command")
    lans = tuple(_lan(r, e) for e in lan_elems)
    pairs = [lan for lan in lans if len({n.name for n in lan.nodes}) == len(lan.nodes) == 2]
    pair = pairs[0] if pairs else None
    names = tuple(n.name for n in pair.nodes) if pair else ()
    for lan, elem in zip(lans, lan_elems, strict=True):
        if pair and lan in pairs and {n.name for n in lan.nodes} != set(names):
            r.problem(
                elem,
                f'<lan name="{lan.name}"> has nodes {", ".join(n.name for n in lan.nodes)} '
                f'but <lan name="{pair.name}"> has {", ".join(names)}: give each node the '
                "same name on every lan",
            )
    port = lans_elem.get("port")
    return ClusterConfig(source, names, lans, int(port) if port else None)


def _lan(r: _Reader, elem: _Element) -> Lan:
    name = elem.get("name", "")
    node_elems = _children(elem, "node")
    if len(node_elems) < 2:
        r.problem(
            elem,
            f'<lan name="{name}"> has {len(node_elems)} <node>: a hafs cluster '
            "has exactly two nodes, give both on every lan",
        )
    for extra in node_elems[2:]:
        r.problem(
            extra, f'a third <node> in <lan name="{name}">: a hafs cluster has exactly two nodes'
        )
    r.unique(node_elems, "name", f' in <lan name="{name}">')
    r.unique(node_elems, "addr", f' in <lan name="{name}">')
    nodes = []
    for node in node_elems:
        addr = r.address(node, "addr")
        laddr = r.address(node, "laddr") if "laddr" in node.attrib else None
        if addr is not None:
            nodes.append(ClusterNode(node.get("name", ""), addr, laddr))
    return Lan(name, tuple(nodes), r.flag(elem, "command", False))


# ---------------------------------------------------------------- userconfig.xml checks


def _module(
    r: _Reader,
    root: _Element,
    *,
    name: str,
    source: Path,
    bin_dir: Path | None,
    cluster: ClusterConfig | None,
    macros: tuple[tuple[str, str], ...],
) -> ModuleConfig:
    service_elem = _child(root, "service")
    sections = {child.tag: child for child in _children(service_elem)}
    rfs = _rfs(r, sections["rfs"]) if "rfs" in sections else None
    heart = _heart(r, sections["heart"], cluster)
    for hb, elem in zip(heart.heartbeats, _children(sections["heart"], "heartbeat"), strict=True):
        if hb.carries_replication and rfs is None:
            r.problem(
                elem, 'ident="flow" puts replication on this lan, but there is no <rfs>', "ident"
            )
    return ModuleConfig(
        name=name,
        source=source,
        bin_dir=bin_dir,
        service=_service(r, service_elem, cluster),
        heart=heart,
        vip=_vip(r, sections["vip"], cluster) if "vip" in sections else None,
        errd=_errd(r, sections["errd"], bin_dir) if "errd" in sections else None,
        rfs=rfs,
        user=_user(r, sections["user"]) if "user" in sections else None,
        check=_checks(r, sections["check"]) if "check" in sections else Checks(),
        failover=_failover(r, sections["failover"]) if "failover" in sections else None,
        vhost=_vhosts(sections["vhost"]) if "vhost" in sections else (),
        macros=macros,
    )


def _service(r: _Reader, e: _Element, cluster: ClusterConfig | None) -> Service:
    defaultprim = e.get("defaultprim", "alone")
    if cluster and defaultprim not in ("alone", "lastprim", *cluster.nodes):
        r.problem(
            e,
            f'<service> defaultprim="{defaultprim}" is not allowed: expected alone, lastprim '
            f"or a node of {cluster.source} ({', '.join(cluster.nodes)})",
            "defaultprim",
        )
    return Service(
        mode=e.get("mode", "mirror"),
        boot=e.get("boot", "ignore"),
        boot_delay=r.duration(e, "boot_delay", 0.0, zero=True),
        failover=r.flag(e, "failover", True),
        defaultprim=defaultprim,
        maxloop=r.integer(e, "maxloop", 3),
        loop_interval=r.duration(e, "loop_interval", 24 * 3600.0, zero=True),
        automatic_reboot=r.flag(e, "automatic_reboot", False),
    )


def _heart(r: _Reader, e: _Element, cluster: ClusterConfig | None) -> Heart:
    pulse = r.duration(e, "pulse", 0.7)
    timeout = r.duration(e, "timeout", 30.0)
    _timeout_after_pulse(r, e, pulse, timeout)
    hb_elems = _children(e, "heartbeat")
    r.unique(hb_elems, "name")
    flows = [h for h in hb_elems if h.get("ident") == "flow"]
    for extra in flows[1:]:
        r.problem(extra, 'only one <heartbeat> may carry the replication (ident="flow")', "ident")
    heartbeats = []
    for hb in hb_elems:
        lan = hb.get("name", "")
        if cluster and lan not in (x.name for x in cluster.lans):
            r.problem(
                hb,
                f'<heartbeat name="{lan}"> is not allowed: expected a <lan> of '
                f"{cluster.source} ({', '.join(x.name for x in cluster.lans)})",
                "name",
            )
        hb_pulse = r.duration(hb, "pulse", pulse)
        hb_timeout = r.duration(hb, "timeout", timeout)
        if "pulse" in hb.attrib or "timeout" in hb.attrib:
            _timeout_after_pulse(r, hb, hb_pulse, hb_timeout)
        heartbeats.append(Heartbeat(lan, hb.get("ident", lan), hb_pulse, hb_timeout))
    port = e.get("port")
    return Heart(
        pulse=pulse,
        timeout=timeout,
        heartbeats=tuple(heartbeats),
        port=int(port) if port else None,
        permanent_arp=r.flag(e, "permanent_arp", True),
    )


def _timeout_after_pulse(r: _Reader, e: _Element, pulse: float, timeout: float) -> None:
    if 0 < timeout <= pulse:
        r.problem(
            e,
            f"<{e.tag}> timeout ({timeout:g}s) must be longer than pulse ({pulse:g}s): the "
            "peer counts as lost after timeout without a heartbeat",
            "timeout",
        )


def _vip(r: _Reader, e: _Element, cluster: ClusterConfig | None) -> Vip:
    node_addrs = {n.addr: n.name for lan in cluster.lans for n in lan.nodes} if cluster else {}
    interfaces = []
    for itf in _children(_child(e, "interface_list"), "interface"):
        addresses = []
        for va in _children(_child(itf, "real_interface"), "virtual_addr"):
            if va.get("addr") == VIP_PLACEHOLDER:
                r.problem(
                    va,
                    f"<virtual_addr> addr is still the template placeholder {VIP_PLACEHOLDER}: "
                    "replace it with the virtual IP address clients use, in the nodes' subnet",
                    "addr",
                )
                continue
            addr = r.address(va, "addr")
            if addr is None:
                continue
            if addr in node_addrs:
                r.problem(
                    va,
                    f'<virtual_addr> addr="{addr}" is the address of node '
                    f"{node_addrs[addr]}: the virtual address must be a free one",
                    "addr",
                )
            addresses.append(
                VirtualAddress(
                    addr,
                    where=va.get("where", "one_side_alias"),
                    check=r.flag(va, "check", False),
                    connections=r.flag(va, "connections", False),
                )
            )
        interfaces.append(
            VipInterface(
                tuple(addresses),
                name=itf.get("name"),
                check=r.flag(itf, "check", True),
                arpreroute=r.flag(itf, "arpreroute", False),
                arpinterval=r.duration(itf, "arpinterval", 60.0),
                arpelapse=r.duration(itf, "arpelapse", 1200.0),
            )
        )
    return Vip(tuple(interfaces), tcpreset=r.flag(e, "tcpreset", True))


def _errd(r: _Reader, e: _Element, bin_dir: Path | None) -> ProcessMonitoring:
    procs = []
    for p in _children(e, "proc"):
        action = p.get("action", "stopstart")
        handler = None
        if action not in PROC_ACTIONS:
            handler = _handler(r, p, action, bin_dir)
            action = "handler"
        for attr in ("nameregex", "argregex"):
            _regex(r, p, attr, p.get(attr))
        procs.append(
            MonitoredProcess(
                name=p.get("name", ""),
                action=action,
                monitor_class=p.get("class", "prim"),
                atleast=r.integer(p, "atleast", 1),
                atmax=r.integer(p, "atmax", -1),
                nameregex=p.get("nameregex"),
                argregex=p.get("argregex"),
                service=r.flag(p, "service", False),
                start_after=r.integer(p, "start_after", 0),
                restart_services=p.get("restart_services"),
                handler=handler,
            )
        )
    return ProcessMonitoring(tuple(procs), polltimer=r.duration(e, "polltimer", 30.0))


def _handler(r: _Reader, p: _Element, action: str, bin_dir: Path | None) -> Path | None:
    """A SafeKit special handler: an absolute path, or a path relative to bin/."""
    path = Path(action)
    if not path.is_absolute() and bin_dir is not None:
        path = bin_dir / path
    if (path.is_absolute() or bin_dir is not None) and path.is_file():
        return path
    where = "" if Path(action).is_absolute() or bin_dir is None else f" ({path})"
    r.problem(
        p,
        f'<proc> action="{action}" is not allowed: expected {", ".join(PROC_ACTIONS[:-1])} '
        f"or {PROC_ACTIONS[-1]}, or a handler script: an absolute path or a file in the "
        f"module's bin/; there is no such file{where}",
        "action",
    )
    return None


def _regex(r: _Reader, e: _Element, name: str, pattern: str | None) -> None:
    if pattern is None:
        return
    try:
        re.compile(pattern)
    except re.error as err:
        r.problem(e, f'<{e.tag}> {name}="{pattern}" is not a regular expression: {err}', name)


# The <rfs> attributes Replication has fields for; the others go to safekit_only.
_RFS_USED = {
    "async",
    "ack",
    "xattrs",
    "acl",
    "nbrei",
    "nbremconn",
    "mountover",
    "syncdelta",
    "locktimeout",
    "sendtimeout",
    "reitimeout",
    "checktime",
    "checkintv",
    "reiallowedbw",
}


def _rfs(r: _Reader, e: _Element) -> Replication:
    dir_elems = _children(e, "replicated")
    dirs = [_replicated(r, d) for d in dir_elems]
    for i, (a, a_elem) in enumerate(zip(dirs, dir_elems, strict=True)):
        for b, b_elem in zip(dirs[:i], dir_elems[:i], strict=True):
            if a.dir == b.dir or _inside(a.dir, b.dir) or _inside(b.dir, a.dir):
                r.problem(
                    a_elem,
                    f'<replicated> dir="{a.dir}" overlaps dir="{b.dir}" of '
                    f"line {b_elem.sourceline}",
                    "dir",
                )
    mountover = e.get("mountover")
    return Replication(
        replicated=tuple(dirs),
        async_mode=e.get("async", "second"),
        ack=e.get("ack", "applied"),
        xattrs=r.flag(e, "xattrs", True),
        acl=r.flag(e, "acl", False),
        nbrei=r.integer(e, "nbrei", 6),
        nbremconn=r.integer(e, "nbremconn", 1),
        mountover=None if mountover is None else mountover == "on",
        syncdelta=r.duration(e, "syncdelta", 0.0, zero=True),
        locktimeout=r.duration(e, "locktimeout", 100.0),
        sendtimeout=r.duration(e, "sendtimeout", 30.0),
        reitimeout=r.duration(e, "reitimeout", 150.0),
        checktime=r.duration(e, "checktime", 220.0),
        checkintv=r.duration(e, "checkintv", 120.0),
        reiallowedbw=r.integer(e, "reiallowedbw", 0),
        safekit_only=tuple((k, v) for k, v in e.attrib.items() if k not in _RFS_USED),
    )


def _replicated(r: _Reader, e: _Element) -> ReplicatedDir:
    raw = e.get("dir", "")
    directory = posixpath.normpath(raw)
    if not posixpath.isabs(raw):
        r.problem(
            e,
            f'<replicated> dir="{raw}" is not allowed: expected an absolute path (/var/lib/mysql)',
            "dir",
        )
    elif directory == "/":
        r.problem(
            e, '<replicated> dir="/" is not allowed: replicate directories, not the root', "dir"
        )
    tocheck: list[str] = []
    excluded: list[str] = []
    excluded_regex: list[str] = []
    for child in _children(e):
        path, regex = child.get("path"), child.get("regexpath")
        if child.tag == "notreplicated" and (path is None) == (regex is None):
            r.problem(child, "<notreplicated> needs exactly one of path or regexpath")
        if path is not None:
            if posixpath.isabs(path) or ".." in path.split("/"):
                r.problem(
                    child,
                    f'<{child.tag}> path="{path}" is not allowed: expected a path '
                    f"relative to {directory}, without ..",
                    "path",
                )
            (tocheck if child.tag == "tocheck" else excluded).append(path)
        if regex is not None:
            # A leading ! inverts the filter (replicate only what matches).
            _regex(r, child, "regexpath", regex.removeprefix("!"))
            excluded_regex.append(regex)
    return ReplicatedDir(
        directory,
        read_only=e.get("mode") == "read_only",
        tocheck=tuple(tocheck),
        notreplicated=tuple(excluded),
        notreplicated_regex=tuple(excluded_regex),
    )


def _inside(path: str, parent: str) -> bool:
    return path.startswith(parent.rstrip("/") + "/")


def _user(r: _Reader, e: _Element) -> UserScripts:
    var_elems = _children(e, "var")
    r.unique(var_elems, "name")
    return UserScripts(
        nicestoptimeout=r.duration(e, "nicestoptimeout", 300.0),
        forcestoptimeout=r.duration(e, "forcestoptimeout", 300.0),
        logging=e.get("logging", "userlog"),
        userlogsize=r.integer(e, "userlogsize", 2048),
        vars=tuple((v.get("name", ""), v.get("value", "")) for v in var_elems),
    )


def _checks(r: _Reader, e: _Element) -> Checks:
    by_kind: dict[str, list[_Element]] = {}
    for child in _children(e):
        by_kind.setdefault(child.tag, []).append(child)
    for kind, elems in by_kind.items():
        if kind != "module":
            r.unique(elems, "ident")
    splitbrains = by_kind.get("splitbrain", [])
    for extra in splitbrains[1:]:
        r.problem(extra, "only one <splitbrain> per module: list several witnesses in its arg")
    splitbrain = _each(r, splitbrains[:1], _splitbrain)
    return Checks(
        tcp=_each(r, by_kind.get("tcp", []), _tcp),
        ping=_each(r, by_kind.get("ping", []), _ping),
        intf=_each(r, by_kind.get("intf", []), _intf),
        ip=_each(r, by_kind.get("ip", []), _ip),
        custom=_each(r, by_kind.get("custom", []), _custom),
        module=_each(r, by_kind.get("module", []), _module_check),
        splitbrain=splitbrain[0] if splitbrain else None,
    )


def _each(
    r: _Reader, elems: list[_Element], build: Callable[[_Reader, _Element], _T | None]
) -> tuple[_T, ...]:
    # None: an address was refused, and the problem is already recorded.
    return tuple(x for x in (build(r, e) for e in elems) if x is not None)


def _tcp(r: _Reader, c: _Element) -> TcpCheck | None:
    to = _child(c, "to")
    addr = r.address(to, "addr")
    if addr is None:
        return None
    return TcpCheck(
        ident=c.get("ident", ""),
        when=c.get("when", "prim"),
        addr=addr,
        port=r.integer(to, "port", 0),
        action=c.get("action", "restart"),
        interval=r.duration(to, "interval", 10.0),
        timeout=r.duration(to, "timeout", 5.0),
    )


def _ping(r: _Reader, c: _Element) -> PingCheck | None:
    to = _child(c, "to")
    addr = r.address(to, "addr")
    if addr is None:
        return None
    return PingCheck(
        ident=c.get("ident", ""),
        addr=addr,
        when=c.get("when", "pre"),
        action=c.get("action", "wait"),
        interval=r.duration(to, "interval", 10.0),
        timeout=r.duration(to, "timeout", 5.0),
    )


def _intf(r: _Reader, c: _Element) -> InterfaceCheck | None:
    addr = r.address(_child(c, "to"), "local_addr")
    return InterfaceCheck(c.get("ident", ""), addr) if addr is not None else None


def _ip(r: _Reader, c: _Element) -> IpCheck | None:
    to = _child(c, "to")
    addr = r.address(to, "addr")
    if addr is None:
        return None
    return IpCheck(
        c.get("ident", ""), addr, c.get("when", "prim"), r.duration(to, "interval", 10.0)
    )


def _custom(r: _Reader, c: _Element) -> CustomCheck:
    return CustomCheck(
        ident=c.get("ident", ""),
        exec=c.get("exec", ""),
        arg=c.get("arg", ""),
        when=c.get("when", "prim"),
        action=c.get("action", "noaction"),
    )


def _module_check(r: _Reader, c: _Element) -> ModuleCheck | None:
    name = c.get("name", "")
    to = _first(c, "to")
    if to is None:
        return ModuleCheck(name, c.get("ident", name))
    addr = r.address(to, "addr")
    if addr is None:
        return None
    return ModuleCheck(
        name=name,
        ident=c.get("ident", name),
        addr=addr,
        port=r.integer(to, "port", 0),
        interval=r.duration(to, "interval", 10.0),
        timeout=r.duration(to, "timeout", 5.0),
        secure=r.flag(to, "secure", False),
    )


def _splitbrain(r: _Reader, e: _Element) -> SplitBrainCheck:
    words = e.get("arg", "").split()
    if not words:
        r.problem(e, "<splitbrain> arg needs at least one witness address", "arg")
    witnesses = tuple(w for w in (r.address(e, "arg", word) for word in words) if w is not None)
    arbitrate = e.get("exec") == "arbitrate"
    if arbitrate and len(words) != 1:
        r.problem(e, 'exec="arbitrate" takes exactly one witness address', "arg")
    port = r.integer(e, "port", WITNESS_PORT)
    return SplitBrainCheck(e.get("ident", ""), witnesses, arbitrate, port)


def _failover(r: _Reader, e: _Element) -> FailoverRules:
    return FailoverRules(
        rules=(e.text or "").strip(),
        period=r.duration(e, "period", 5.0),
        handle_time=r.duration(e, "handle_time", 15.0),
    )


def _vhosts(e: _Element) -> tuple[VirtualHostname, ...]:
    return tuple(
        VirtualHostname(v.get("name", ""), v.get("envfile", ""), v.get("when", "prim"))
        for v in _children(e, "virtualhostname")
    )


def _children(elem: _Element, tag: str | None = None) -> list[_Element]:
    return [c for c in elem if isinstance(c, _Element) and (tag is None or c.tag == tag)]


def _first(elem: _Element, tag: str) -> _Element | None:
    found = _children(elem, tag)
    return found[0] if found else None


def _child(elem: _Element, tag: str) -> _Element:
    found = _first(elem, tag)
    if found is None:  # pragma: no cover - the XSD requires it
        raise ValueError(f"<{elem.tag}> has no <{tag}>")
    return found
