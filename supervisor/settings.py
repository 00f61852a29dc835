"""The supervisor's configuration: one frozen, typed value built once at start-up.

Theory of operation. Every setting has a dotted key (``api.socket``), a type taken from
its dataclass annotation, a default, and at most one rule. Values arrive in layers, later
winning: built-in defaults < TOML file < environment < flags. Each layer is parsed and
checked on its own, with its own source (``/etc/supervisor.toml line 12``, ``environment
SUPERVISOR_API_MODE``, ``flag --socket``), so an error always names the key and the place
to fix it, even when a later layer would have overridden the bad value. Unknown keys are
errors, never ignored: a typo must not silently fall back to a default.

The section classes validate themselves as well, so a ``Settings`` built in code (tests,
``dataclasses.replace``) is held to the same rules, with source ``code``.
"""

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal, TypeGuard, cast, get_type_hints

__all__ = [
    "ACTION_NAMES",
    "ActionsSettings",
    "ApiSettings",
    "BackoffSettings",
    "ConfigError",
    "DockerSettings",
    "LogSettings",
    "MetricsSettings",
    "ProcessSettings",
    "Settings",
    "StatsSettings",
    "WatchSettings",
    "load_settings",
]


class ConfigError(Exception):
    """Invalid configuration. str() is a one-line message naming the key and its source.

    ``key`` is the dotted key (``api.mode``), or ``config`` for the file itself, or the
    variable's name for an unknown ``SUPERVISOR_*`` variable. ``source`` is where the
    value came from. ``problem`` is the message without key and source.
    """

    key: str
    source: str
    problem: str

    def __init__(self, key: str, source: str, problem: str) -> None:
        super().__init__(key, source, problem)
        self.key = key
        self.source = source
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.key}: {self.problem} (from {self.source})"


@dataclass(frozen=True, slots=True)
class DockerSettings:
    """Where the Docker (or Podman) engine is and how to talk to it."""

    host: str = ""
    candidates: tuple[str, ...] = (
        "/var/run/docker.sock",
        "$XDG_RUNTIME_DIR/docker.sock",
        "/run/podman/podman.sock",
        "$XDG_RUNTIME_DIR/podman/podman.sock",
        "~/.docker/run/docker.sock",
    )
    tls_verify: bool = False
    cert_path: str = ""
    ping_interval_seconds: float = 10.0
    ping_timeout_seconds: float = 5.0
    call_timeout_seconds: float = 30.0
    inspect_concurrency: int = 8

    def __post_init__(self) -> None:
        _check_section(self)


@dataclass(frozen=True, slots=True)
class BackoffSettings:
    """Reconnect delays: initial, multiplied by factor, capped at max, reset when healthy."""

    initial_seconds: float = 0.5
    factor: float = 2.0
    max_seconds: float = 30.0
    reset_after_seconds: float = 30.0

    def __post_init__(self) -> None:
        _check_section(self)


@dataclass(frozen=True, slots=True)
class WatchSettings:
    """How the watcher waits for a missing socket and how much delta history it keeps."""

    socket_poll_seconds: float = 0.25
    history_size: int = 4096

    def __post_init__(self) -> None:
        _check_section(self)


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """The HTTP/1.1 API on the local Unix socket: where, who may connect, and limits."""

    socket: str = "/run/homelabarr/supervisor.sock"
    mode: int = 0o660
    group: str = ""
    allowed_uids: tuple[int, ...] = ()
    allowed_gids: tuple[int, ...] = ()
    max_head_bytes: int = 16384
    max_body_bytes: int = 65536
    head_timeout_seconds: float = 10.0
    idle_timeout_seconds: float = 60.0
    max_connections: int = 512
    heartbeat_seconds: float = 15.0
    subscriber_queue_size: int = 1024

    def __post_init__(self) -> None:
        _check_section(self)


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """The Prometheus listener and which container labels become metric labels."""

    listen: str = "127.0.0.1:9856"
    container_labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_section(self)

    @property
    def address(self) -> tuple[str, int] | None:
        """``(host, port)`` to bind, IPv6 brackets removed; None when metrics are disabled."""
        return _split_host_port(self.listen)


@dataclass(frozen=True, slots=True)
class LogSettings:
    """Loguru level (stored upper-case) and output format."""

    level: str = "INFO"
    format: str = "text"

    def __post_init__(self) -> None:
        _check_section(self)


@dataclass(frozen=True, slots=True)
class ProcessSettings:
    """Privilege drop at start-up (as root): the target user, and how the socket's group is taken."""

    user: str = ""
    allow_root_group: bool = False
    socket_wait_seconds: float = 60.0

    def __post_init__(self) -> None:
        _check_section(self)


@dataclass(frozen=True, slots=True)
class StatsSettings:
    """Live resource stats: how often running containers are sampled, and how many at once."""

    interval_seconds: float = 10.0
    concurrency: int = 4

    def __post_init__(self) -> None:
        _check_section(self)


#: The container actions an operator can allow in ``actions.allow``.
ACTION_NAMES: Final = ("start", "stop", "restart", "remove", "logs")


@dataclass(frozen=True, slots=True)
class ActionsSettings:
    """Container management through the API: which actions, on which containers, by whom."""

    allow: tuple[str, ...] = ()
    selector_labels: tuple[str, ...] = ()
    selector_compose_projects: tuple[str, ...] = ()
    allowed_uids: tuple[int, ...] = ()
    allowed_gids: tuple[int, ...] = ()
    allow_self: bool = False
    timeout_seconds: float = 30.0

    def __post_init__(self) -> None:
        _check_section(self)


@dataclass(frozen=True, slots=True)
class Settings:
    """The whole configuration. Build it with ``load_settings()``; ``Settings()`` is the defaults."""

    docker: DockerSettings = field(default_factory=DockerSettings)
    backoff: BackoffSettings = field(default_factory=BackoffSettings)
    watch: WatchSettings = field(default_factory=WatchSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    log: LogSettings = field(default_factory=LogSettings)
    process: ProcessSettings = field(default_factory=ProcessSettings)
    stats: StatsSettings = field(default_factory=StatsSettings)
    actions: ActionsSettings = field(default_factory=ActionsSettings)
    # Where each non-default value came from; set by load_settings(), not part of equality.
    _sources: Mapping[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def sources(self) -> Mapping[str, str]:
        """Every dotted key mapped to where its value came from (``default`` if nowhere).

        Only ``load_settings()`` records sources: a copy made with ``dataclasses.replace``
        reports ``default`` for every key.
        """
        return MappingProxyType({key: self._sources.get(key, _DEFAULT) for key in _SPECS})


# --- The table of settings -------------------------------------------------------------

_DEFAULT: Final = "default"
_CODE: Final = "code"

_SECTIONS: Final[dict[str, type[Any]]] = {
    "docker": DockerSettings,
    "backoff": BackoffSettings,
    "watch": WatchSettings,
    "api": ApiSettings,
    "metrics": MetricsSettings,
    "log": LogSettings,
    "process": ProcessSettings,
    "stats": StatsSettings,
    "actions": ActionsSettings,
}
_SECTION_OF: Final[dict[type[Any], str]] = {cls: name for name, cls in _SECTIONS.items()}

_Kind = Literal["str", "bool", "int", "float", "str_list", "int_list", "mode", "name_or_id"]

_KIND_OF_TYPE: Final[dict[object, _Kind]] = {
    str: "str",
    bool: "bool",
    int: "int",
    float: "float",
    tuple[str, ...]: "str_list",
    tuple[int, ...]: "int_list",
}
# Keys whose accepted input is wider than their stored type.
_KIND_OVERRIDES: Final[dict[str, _Kind]] = {
    "api.mode": "mode",
    "api.group": "name_or_id",
    "process.user": "name_or_id",
}


@dataclass(frozen=True, slots=True)
class _Rule:
    holds: Callable[[Any], bool]
    expected: str


@dataclass(frozen=True, slots=True)
class _Spec:
    kind: _Kind
    default: object


_MAX_ID: Final = 2**32 - 2  # uid_t/gid_t; 2**32 - 1 is (uid_t)-1, "no change"
_UNIX_PATH_MAX: Final = 107  # sizeof(sun_path) minus the terminating NUL on Linux
_LOG_LEVELS: Final = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")
_LOG_FORMATS: Final = ("text", "json")
_HOST_PORT: Final = re.compile(
    r"\[(?P<v6>[^\]]+)\]:(?P<p6>[0-9]{1,5})|(?P<host>[^:\[\]\s]+):(?P<port>[0-9]{1,5})"
)
_TCP_URL: Final = re.compile(
    r"tcp://(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:/\[\]\s]+))(?::(?P<port>[0-9]{1,5}))?/?"
)
_OCTAL: Final = re.compile(r"(?:0[oO]?)?[0-7]+")
_INTEGER: Final = re.compile(r"[+-]?[0-9]+")
_BOOL_WORDS: Final = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _valid_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _split_host_port(text: str) -> tuple[str, int] | None:
    match = _HOST_PORT.fullmatch(text)
    if match is None:
        return None
    host = match["v6"] if match["v6"] is not None else match["host"]
    port = int(match["p6"] or match["port"])
    if match["v6"] is not None and not _valid_ipv6(host):
        return None
    return (host, port) if 1 <= port <= 65535 else None


def _is_docker_host(text: str) -> bool:
    if text == "":
        return True
    if text.startswith("unix://"):
        return text[len("unix://") :].startswith("/")
    match = _TCP_URL.fullmatch(text)
    if match is None:
        return False
    if match["v6"] is not None and not _valid_ipv6(match["v6"]):
        return False
    return match["port"] is None or 1 <= int(match["port"]) <= 65535


def _at_least(low: int, unit: str) -> _Rule:
    return _Rule(lambda v: v >= low, f"{unit} >= {low}")


_SECONDS: Final = _Rule(lambda v: v > 0, "a number of seconds > 0")

_RULES: Final[dict[str, _Rule]] = {
    "docker.host": _Rule(
        _is_docker_host, "unix:///PATH, /PATH or tcp://HOST[:PORT], or empty to auto-detect"
    ),
    "docker.candidates": _Rule(
        lambda v: len(v) > 0 and all(v), "a non-empty list of non-empty socket paths"
    ),
    "docker.ping_interval_seconds": _SECONDS,
    "docker.ping_timeout_seconds": _SECONDS,
    "docker.call_timeout_seconds": _SECONDS,
    "docker.inspect_concurrency": _Rule(lambda v: 1 <= v <= 256, "an integer 1..256"),
    "backoff.initial_seconds": _SECONDS,
    "backoff.factor": _Rule(lambda v: v >= 1, "a factor >= 1"),
    "backoff.max_seconds": _SECONDS,
    "backoff.reset_after_seconds": _Rule(lambda v: v >= 0, "a number of seconds >= 0"),
    "watch.socket_poll_seconds": _Rule(lambda v: 0 < v <= 5, "a number of seconds > 0 and <= 5"),
    "watch.history_size": _at_least(1, "an integer"),
    "api.socket": _Rule(
        lambda v: 0 < len(os.fsencode(v)) <= _UNIX_PATH_MAX,
        f"a non-empty socket path of at most {_UNIX_PATH_MAX} bytes",
    ),
    "api.mode": _Rule(lambda v: 0 <= v <= 0o777, "an octal file mode 0..0o777"),
    "api.allowed_uids": _Rule(
        lambda v: all(0 <= i <= _MAX_ID for i in v), f"user ids 0..{_MAX_ID}"
    ),
    "api.allowed_gids": _Rule(
        lambda v: all(0 <= i <= _MAX_ID for i in v), f"group ids 0..{_MAX_ID}"
    ),
    "api.max_head_bytes": _at_least(1, "a number of bytes"),
    "api.max_body_bytes": _at_least(0, "a number of bytes"),
    "api.head_timeout_seconds": _SECONDS,
    "api.idle_timeout_seconds": _SECONDS,
    "api.max_connections": _at_least(1, "an integer"),
    "api.heartbeat_seconds": _SECONDS,
    "api.subscriber_queue_size": _at_least(1, "an integer"),
    "metrics.listen": _Rule(
        lambda v: v == "" or _split_host_port(v) is not None,
        "HOST:PORT or [IPV6]:PORT with port 1..65535, or empty to disable",
    ),
    "metrics.container_labels": _Rule(
        lambda v: all(v) and len(set(v)) == len(v), "a list of distinct, non-empty label keys"
    ),
    "process.socket_wait_seconds": _Rule(lambda v: v >= 0, "a number of seconds >= 0"),
    "stats.interval_seconds": _Rule(lambda v: v >= 0, "a number of seconds >= 0 (0 disables)"),
    "stats.concurrency": _Rule(lambda v: 1 <= v <= 64, "an integer 1..64"),
    "actions.allow": _Rule(
        lambda v: all(a in ACTION_NAMES for a in v) and len(set(v)) == len(v),
        "a list of distinct actions among " + ", ".join(ACTION_NAMES),
    ),
    "actions.selector_labels": _Rule(
        lambda v: all(item.partition("=")[0] for item in v),
        "a list of label selectors KEY or KEY=VALUE, each with a non-empty KEY",
    ),
    "actions.selector_compose_projects": _Rule(
        lambda v: all(v), "a list of non-empty compose project names"
    ),
    "actions.allowed_uids": _Rule(
        lambda v: all(0 <= i <= _MAX_ID for i in v), f"user ids 0..{_MAX_ID}"
    ),
    "actions.allowed_gids": _Rule(
        lambda v: all(0 <= i <= _MAX_ID for i in v), f"group ids 0..{_MAX_ID}"
    ),
    "actions.timeout_seconds": _SECONDS,
    "log.level": _Rule(lambda v: v in _LOG_LEVELS, "one of " + ", ".join(_LOG_LEVELS)),
    "log.format": _Rule(lambda v: v in _LOG_FORMATS, "one of " + ", ".join(_LOG_FORMATS)),
}

_NORMALIZERS: Final[dict[str, Callable[[Any], Any]]] = {
    # Older set-ups give DOCKER_HOST as a bare socket path; store one spelling.
    "docker.host": lambda v: "unix://" + v if v.startswith("/") else v,
    "log.level": str.upper,
    "log.format": str.lower,
}

# Ordered pairs (low, high): the value of low must not exceed the value of high.
_ORDERED: Final[tuple[tuple[str, str], ...]] = (("backoff.initial_seconds", "backoff.max_seconds"),)


def _build_specs() -> dict[str, _Spec]:
    specs: dict[str, _Spec] = {}
    for section, cls in _SECTIONS.items():
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            kind = _KIND_OVERRIDES.get(key) or _KIND_OF_TYPE[hints[f.name]]
            specs[key] = _Spec(kind, f.default)
    return specs


_SPECS: Final[dict[str, _Spec]] = _build_specs()


def _env_name(key: str) -> str:
    return "SUPERVISOR_" + key.replace(".", "_").upper()


_ENV_NAMES: Final[dict[str, str]] = {_env_name(key): key for key in _SPECS}
_ENV_CONFIG: Final = "SUPERVISOR_CONFIG"
_ENV_TEST_PREFIX: Final = "SUPERVISOR_TEST_"


# --- Turning one raw value into a checked one --------------------------------------------


class _Mismatch(Exception):
    """The value does not have the setting's type; the caller names what was expected."""


_EXPECTED_TYPE: Final[dict[_Kind, str]] = {
    "str": "a string",
    "bool": "true or false",
    "int": "an integer",
    "float": "a finite number",
    "str_list": "a list of strings",
    "int_list": "a list of integers",
    "mode": 'an octal file mode 0..0o777 such as 0o660 or "0660"',
    "name_or_id": "a name or a numeric id",
}


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _to_float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Mismatch
    try:
        number = float(value)
    except OverflowError:
        raise _Mismatch from None
    if not math.isfinite(number):
        raise _Mismatch
    return number


def _is_str(value: object) -> TypeGuard[str]:
    return isinstance(value, str)


def _from_typed(kind: _Kind, value: object) -> object:
    """A value as TOML, code or a typed flag gives it."""
    if kind == "float":
        return _to_float(value)
    if kind in ("str", "name_or_id") and isinstance(value, str):
        return value
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind in ("int", "mode") and _is_int(value):
        return value
    if kind == "mode" and isinstance(value, str):
        return _from_text(kind, value)
    if kind == "name_or_id" and _is_int(value) and value >= 0:
        return str(value)
    if kind in ("str_list", "int_list") and isinstance(value, list | tuple):
        item_ok = _is_str if kind == "str_list" else _is_int
        if all(item_ok(item) for item in value):
            return tuple(value)
    raise _Mismatch


def _from_text(kind: _Kind, text: str) -> object:
    """A value as the environment or a string flag gives it."""
    stripped = text.strip()
    if kind in ("str", "name_or_id"):
        return text
    if kind == "bool":
        if stripped.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[stripped.lower()]
        raise _Mismatch
    if kind == "int":
        if _INTEGER.fullmatch(stripped):
            return int(stripped)
        raise _Mismatch
    if kind == "float":
        try:
            return _to_float(float(stripped))
        except ValueError:
            raise _Mismatch from None
    if kind == "mode":
        if _OCTAL.fullmatch(stripped):
            digits = stripped[2:] if stripped[:2].lower() == "0o" else stripped
            return int(digits, 8)
        raise _Mismatch
    items = [item.strip() for item in text.split(",")]
    items = [item for item in items if item]
    if kind == "str_list":
        return tuple(items)
    if all(_INTEGER.fullmatch(item) for item in items):
        return tuple(int(item) for item in items)
    raise _Mismatch


def _show(value: object, kind: _Kind | None = None) -> str:
    """A value as the operator would write it, on one line."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, int) and kind == "mode":
        text = f"{value} ({oct(value)})"
    elif isinstance(value, int | float):
        text = repr(value)
    elif isinstance(value, list | tuple):
        text = "[" + ", ".join(_show(item) for item in value) + "]"
    elif isinstance(value, dict):
        text = "a table"
    else:
        text = f"{value} ({type(value).__name__})"
    return text if len(text) <= 80 else text[:77] + "..."


def _coerce(key: str, value: object, source: str, *, text: bool) -> object:
    """Parse, normalize and check one value, or raise ConfigError naming key and source.

    With ``text``, a string is parsed as the environment spells values ("true", "0660",
    "a, b"); without, it must already have the setting's type, as TOML gives it.
    """
    spec = _SPECS[key]
    try:
        if text and isinstance(value, str):
            result = _from_text(spec.kind, value)
        else:
            result = _from_typed(spec.kind, value)
    except _Mismatch:
        raise ConfigError(
            key, source, f"expected {_EXPECTED_TYPE[spec.kind]}, got {_show(value, spec.kind)}"
        ) from None
    normalize = _NORMALIZERS.get(key)
    if normalize is not None:
        result = normalize(result)
    rule = _RULES.get(key)
    if rule is not None and not rule.holds(result):
        raise ConfigError(key, source, f"expected {rule.expected}, got {_show(value, spec.kind)}")
    return result


def _check_order(
    values: Mapping[str, object], sources: Mapping[str, str], ranks: Mapping[str, int]
) -> None:
    """Check the _ORDERED pairs present in ``values``."""
    for low, high in _ORDERED:
        if low not in values or high not in values:
            continue
        low_value, high_value = cast(float, values[low]), cast(float, values[high])
        if low_value <= high_value:
            continue
        # Blame the value set in the later layer, where the operator is looking; ties blame high.
        if ranks[low] > ranks[high]:
            raise ConfigError(
                low,
                sources[low],
                f"must not exceed {high} ({_show(high_value)} from {sources[high]}), "
                f"got {_show(low_value)}",
            )
        raise ConfigError(
            high,
            sources[high],
            f"must be at least {low} ({_show(low_value)} from {sources[low]}), "
            f"got {_show(high_value)}",
        )


def _check_section(section: Any) -> None:
    """Coerce and check a section built in code; the loader has done so with real sources."""
    name = _SECTION_OF[type(section)]
    values: dict[str, object] = {}
    for f in dataclasses.fields(section):
        key = f"{name}.{f.name}"
        value = _coerce(key, getattr(section, f.name), _CODE, text=False)
        object.__setattr__(section, f.name, value)
        values[key] = value
    _check_order(values, dict.fromkeys(values, _CODE), dict.fromkeys(values, 0))


# --- Layers: file, environment, flags ----------------------------------------------------

_Layer = dict[str, tuple[object, str]]  # dotted key -> (checked value, source)


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _name_pattern(name: str) -> str:
    escaped = re.escape(name)
    return rf"""(?:{escaped}|"{escaped}"|'{escaped}')"""


_ANY_HEADER: Final = re.compile(r"\s*\[")


def _find_line(lines: list[str], section: str, name: str) -> int | None:
    """1-based line of ``name =`` inside ``[section]``; a best guess, as tomllib gives none."""
    section_pat, name_pat = _name_pattern(section), _name_pattern(name)
    header = re.compile(rf"\s*\[\s*{section_pat}\s*\]")
    assignment = re.compile(rf"\s*{name_pat}\s*=")
    inside = False
    for number, line in enumerate(lines, 1):
        if _ANY_HEADER.match(line):
            inside = header.match(line) is not None
        elif inside and assignment.match(line):
            return number
    # Other spellings TOML allows: [section.name], section.name = ..., section = { ... }.
    for pattern in (
        rf"\s*\[\s*{section_pat}\s*\.\s*{name_pat}\s*\]",
        rf"\s*{section_pat}\s*\.\s*{name_pat}\s*=",
        rf"\s*{section_pat}\s*=",
    ):
        compiled = re.compile(pattern)
        for number, line in enumerate(lines, 1):
            if compiled.match(line):
                return number
    return None


def _find_top_level_line(lines: list[str], name: str) -> int | None:
    """1-based line of ``[name]``, ``[name.x]`` or a top-level ``name =``."""
    name_pat = _name_pattern(name)
    header = re.compile(rf"\s*\[{{1,2}}\s*{name_pat}\s*[\].]")
    assignment = re.compile(rf"\s*{name_pat}\s*[.=]")
    before_first_header = True
    for number, line in enumerate(lines, 1):
        if _ANY_HEADER.match(line):
            before_first_header = False
            if header.match(line):
                return number
        elif before_first_header and assignment.match(line):
            return number
    return None


def _at(path: str, line: int | None) -> str:
    return path if line is None else f"{path} line {line}"


def _read_file(path: str) -> tuple[dict[str, Any], list[str]]:
    try:
        with open(path, "rb") as handle:
            text = handle.read().decode("utf-8")
    except OSError as error:
        reason = error.strerror or str(error)
        raise ConfigError("config", path, f"cannot read the configuration file: {reason}") from None
    except UnicodeDecodeError as error:
        raise ConfigError("config", path, f"the configuration file is not UTF-8: {error}") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError("config", path, f"invalid TOML: {error}") from None
    return document, text.splitlines()


def _file_layer(path: str) -> _Layer:
    document, lines = _read_file(path)
    layer: _Layer = {}
    for section, table in document.items():
        if section not in _SECTIONS:
            where = _at(path, _find_top_level_line(lines, section))
            if isinstance(table, dict):
                hint = _suggest(section, list(_SECTIONS))
                raise ConfigError(section, where, f"unknown section [{section}]{hint}")
            same_name = [key for key in _SPECS if key.endswith("." + section)]
            hint = (
                f" (did you mean {same_name[0]}?)"
                if same_name
                else _suggest(section, list(_SECTIONS))
            )
            raise ConfigError(section, where, f"unknown setting outside any section{hint}")
        if not isinstance(table, dict):
            where = _at(path, _find_top_level_line(lines, section))
            raise ConfigError(section, where, f"expected a table [{section}], got {_show(table)}")
        for name, value in table.items():
            key = f"{section}.{name}"
            where = _at(path, _find_line(lines, section, name))
            if key not in _SPECS:
                known = [k for k in _SPECS if k.startswith(section + ".")]
                raise ConfigError(key, where, f"unknown setting{_suggest(key, known)}")
            layer[key] = (_coerce(key, value, where, text=False), where)
    return layer


def _docker_env_layer(environ: Mapping[str, str]) -> _Layer:
    """Docker's own variables. Empty means unset, as the docker CLI and docker-py treat them."""
    layer: _Layer = {}
    for name, key in (("DOCKER_HOST", "docker.host"), ("DOCKER_CERT_PATH", "docker.cert_path")):
        value = environ.get(name, "")
        if value:
            source = f"environment {name}"
            layer[key] = (_coerce(key, value, source, text=True), source)
    verify = environ.get("DOCKER_TLS_VERIFY", "")
    if verify:
        # Docker's convention, not ours: any non-empty value but "0" turns TLS on.
        layer["docker.tls_verify"] = (verify != "0", "environment DOCKER_TLS_VERIFY")
    return layer


def _supervisor_env_layer(environ: Mapping[str, str]) -> _Layer:
    layer: _Layer = {}
    for name in sorted(environ):
        if not name.startswith("SUPERVISOR_") or name == _ENV_CONFIG:
            continue
        if name.startswith(_ENV_TEST_PREFIX):
            continue
        source = f"environment {name}"
        key = _ENV_NAMES.get(name)
        if key is None:
            raise ConfigError(name, source, f"unknown setting{_suggest(name, list(_ENV_NAMES))}")
        layer[key] = (_coerce(key, environ[name], source, text=True), source)
    return layer


def _flag_layer(flags: Mapping[str, object], flag_names: Mapping[str, str]) -> _Layer:
    layer: _Layer = {}
    for key, value in flags.items():
        if value is None:  # argparse's "not given"
            continue
        flag = flag_names.get(key) or key.rsplit(".", 1)[-1].replace("_", "-")
        source = f"flag {flag if flag.startswith('-') else '--' + flag}"
        if key not in _SPECS:
            raise ConfigError(key, source, f"unknown setting{_suggest(key, list(_SPECS))}")
        layer[key] = (_coerce(key, value, source, text=True), source)
    return layer


def load_settings(
    *,
    config_path: str | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
    flag_names: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings from defaults < TOML file < environment < flags, later winning.

    The file is ``config_path``, else ``environ["SUPERVISOR_CONFIG"]``; None or empty means
    no file. ``environ`` defaults to ``os.environ``. ``flags`` maps dotted keys to typed
    values or strings (parsed like the environment); a None value means "not given".
    ``flag_names`` maps dotted keys to the flag's spelling for messages (``--socket``).
    Raises ConfigError, naming the key and its source, for anything invalid or unknown.
    """
    env = os.environ if environ is None else environ
    path = config_path if config_path is not None else env.get(_ENV_CONFIG)
    layers: list[_Layer] = []
    if path:
        layers.append(_file_layer(path))
    layers.append(_docker_env_layer(env))
    layers.append(_supervisor_env_layer(env))
    if flags:
        layers.append(_flag_layer(flags, flag_names or {}))

    values: dict[str, object] = {key: spec.default for key, spec in _SPECS.items()}
    sources: dict[str, str] = dict.fromkeys(_SPECS, _DEFAULT)
    ranks: dict[str, int] = dict.fromkeys(_SPECS, 0)
    for rank, layer in enumerate(layers, 1):
        for key, (value, source) in layer.items():
            values[key], sources[key], ranks[key] = value, source, rank
    _check_order(values, sources, ranks)

    sections = {
        section: cls(
            **{
                key.split(".", 1)[1]: value
                for key, value in values.items()
                if key.startswith(section + ".")
            }
        )
        for section, cls in _SECTIONS.items()
    }
    settings = Settings(**sections)
    explicit = {key: source for key, source in sources.items() if source != _DEFAULT}
    object.__setattr__(settings, "_sources", MappingProxyType(explicit))
    return settings
