"""Configuration: one option table, merged by priority into a frozen Config.

Every option is declared once in ``OPTIONS`` with its command-line flags, its
conf-file key, its converter and its default. Values are merged from the
lowest to the highest priority source::

    defaults  <  conf file  <  environment (CC_PROXY_LOG_LEVEL only)  <  command line

Every source goes through the same converter, so ``--ready-timeout abc`` and
``ready_timeout = "abc"`` fail with the same explanation; only the prefix that
names the source differs. The resulting ``Config.sources`` says where each
value came from, for the start-up log line and for error messages.

The command line accepts the original single-dash spellings (``-log debug``,
``-uri unix:///...``) as well as the GNU double-dash ones. argparse's
``default=None`` means "not given", so a flag never hides the conf file unless
the user actually typed it.
"""

from __future__ import annotations

import argparse
import math
import os
import tomllib
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_CONF_PATH = "/etc/cc-proxy/cc-proxy.toml"
DEFAULT_SOCKET_PATH = "/var/run/clear-containers/proxy.sock"

#: The only environment variable we read: the log level, when --log is absent.
ENV_LOG_LEVEL = "CC_PROXY_LOG_LEVEL"

#: sun_path is 108 bytes on Linux, one of which is the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107

#: Agent messages carry an 8-byte header plus at least a few payload bytes;
#: hyperstart refuses anything larger than 10240 bytes.
AGENT_MESSAGE_MIN = 13
AGENT_MESSAGE_MAX = 10240

#: Accepted log level names (the Go proxy's logrus names) -> loguru level names.
LOG_LEVELS: Mapping[str, str] = types.MappingProxyType(
    {
        "debug": "DEBUG",
        "info": "INFO",
        "warn": "WARNING",
        "warning": "WARNING",
        "error": "ERROR",
        "fatal": "CRITICAL",
        "panic": "CRITICAL",
    }
)

KSM_MODES = ("off", "initial", "auto")
LOG_FORMATS = ("auto", "human", "plain")

URI_SCHEME = "unix://"


class ConfigError(Exception):
    """A configuration value is wrong; the message names its source and key."""


# --------------------------------------------------------------------------
# Converters: shared by every source. They take a raw value (a string from
# the command line or the environment, or any TOML value from the conf file)
# and return the converted value, or raise ValueError with an explanation
# that does not name the source (the caller adds that).


def _show(raw: Any) -> str:
    return repr(raw)


def to_log_level(raw: Any) -> str:
    """Map a level name (case-insensitive) to its loguru name.

    The loguru names themselves (DEBUG, WARNING, CRITICAL...) are accepted
    too, so a level can round-trip through this function.
    """
    if isinstance(raw, str):
        key = raw.strip().lower()
        if key in LOG_LEVELS:
            return LOG_LEVELS[key]
        if key == "critical":
            return "CRITICAL"
    raise ValueError(
        f"invalid log level {_show(raw)} (choose from {', '.join(LOG_LEVELS)})"
    )


def _choice(choices: tuple[str, ...], what: str) -> Callable[[Any], str]:
    def convert(raw: Any) -> str:
        if isinstance(raw, str) and raw.strip().lower() in choices:
            return raw.strip().lower()
        raise ValueError(
            f"invalid {what} {_show(raw)} (choose from {', '.join(choices)})"
        )

    return convert


to_ksm_mode = _choice(KSM_MODES, "KSM mode")
to_log_format = _choice(LOG_FORMATS, "log format")


def to_positive_float(raw: Any) -> float:
    """A strictly positive, finite number of seconds."""
    value: float | None = None
    if isinstance(raw, bool):
        value = None
    elif isinstance(raw, (int, float)):
        value = float(raw)
    elif isinstance(raw, str):
        try:
            value = float(raw.strip())
        except ValueError:
            value = None
    if value is None or not math.isfinite(value) or value <= 0:
        raise ValueError(f"expected a positive number, got {_show(raw)}")
    return value


def _int_in_range(lo: int, hi: int | None) -> Callable[[Any], int]:
    def convert(raw: Any) -> int:
        value: int | None = None
        if isinstance(raw, bool):
            value = None
        elif isinstance(raw, int):
            value = raw
        elif isinstance(raw, str):
            try:
                value = int(raw.strip(), 10)
            except ValueError:
                value = None
        if value is None or value < lo or (hi is not None and value > hi):
            if hi is None:
                want = "a positive integer" if lo == 1 else f"an integer >= {lo}"
            else:
                want = f"an integer between {lo} and {hi}"
            raise ValueError(f"expected {want}, got {_show(raw)}")
        return value

    return convert


to_positive_int = _int_in_range(1, None)
to_agent_message_size = _int_in_range(AGENT_MESSAGE_MIN, AGENT_MESSAGE_MAX)


def to_path(raw: Any) -> str:
    """A non-empty file system path."""
    if not isinstance(raw, str) or not raw or "\0" in raw:
        raise ValueError(f"expected a non-empty path, got {_show(raw)}")
    return raw


def check_socket_path(path: str) -> str:
    """Make a socket path absolute and check it fits in sun_path."""
    path = os.path.abspath(to_path(path))
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH_BYTES:
        raise ValueError(
            f"socket path is {size} bytes long, the limit is "
            f"{MAX_SOCKET_PATH_BYTES}: {path!r}"
        )
    return path


def to_uri(raw: Any) -> str:
    """``unix://`` followed by an absolute path that fits in sun_path."""
    if (
        not isinstance(raw, str)
        or not raw.startswith(URI_SCHEME)
        or not raw[len(URI_SCHEME):].startswith("/")
    ):
        raise ValueError(f"expected unix:///ABSOLUTE/PATH, got {_show(raw)}")
    check_socket_path(raw[len(URI_SCHEME):])
    return raw


def uri_path(uri: str) -> str:
    """The socket path of a ``unix://`` URI accepted by ``to_uri``."""
    return uri[len(URI_SCHEME):]


# --------------------------------------------------------------------------
# The option table.


@dataclass(frozen=True)
class Option:
    name: str                        # Config field
    flags: tuple[str, ...]           # command-line spellings, canonical first
    convert: Callable[[Any], Any]
    default: Any
    help: str
    metavar: str | None = None
    conf: bool = True                # settable in the conf file (key = name)
    env: str | None = None           # environment variable, if any


OPTIONS: tuple[Option, ...] = (
    # socket
    Option("socket_path", ("--socket-path", "-socket-path"), check_socket_path,
           DEFAULT_SOCKET_PATH, "path of the client socket to listen on "
           "(beats the path of --uri)", "PATH"),
    Option("uri", ("--uri", "-uri"), to_uri, None,
           "unix://PATH: run in pod mode (one proxy per VM) listening on PATH",
           "URI", conf=False),
    # logging
    Option("log_level", ("--log", "-log"), to_log_level, "WARNING",
           "log level: " + ", ".join(LOG_LEVELS) + f" (also ${ENV_LOG_LEVEL})",
           "LEVEL", env=ENV_LOG_LEVEL),
    Option("log_format", ("--log-format", "-log-format"), to_log_format, "auto",
           "log line format: auto (human on a terminal, plain lines under "
           "journald or when not a terminal), human, plain", "FORMAT"),
    # KSM
    Option("ksm", ("--ksm", "-ksm"), to_ksm_mode, "auto",
           "KSM tuning in system mode: off, initial (touch nothing), auto "
           "(kick on each new VM); pod mode never touches KSM", "MODE"),
    Option("ksm_root", ("--ksm-root",), to_path, "/sys/kernel/mm/ksm",
           "directory of the KSM sysfs knobs", "PATH"),
    Option("meminfo_path", ("--meminfo-path",), to_path, "/proc/meminfo",
           "file to read AnonPages from", "PATH"),
    Option("ksm_aggressive_seconds", ("--ksm-aggressive-seconds",),
           to_positive_float, 30.0, "seconds of aggressive KSM after a new VM",
           "SECONDS"),
    Option("ksm_standard_seconds", ("--ksm-standard-seconds",),
           to_positive_float, 120.0, "seconds of standard KSM after aggressive",
           "SECONDS"),
    Option("ksm_slow_seconds", ("--ksm-slow-seconds",), to_positive_float,
           120.0, "seconds of slow KSM before restoring the initial values",
           "SECONDS"),
    # timeouts
    Option("ready_timeout", ("--ready-timeout",), to_positive_float, 30.0,
           "seconds to wait for the agent's READY", "SECONDS"),
    Option("shim_timeout", ("--shim-timeout",), to_positive_float, 30.0,
           "seconds newcontainer/execcmd wait for the shim to connect",
           "SECONDS"),
    Option("process_timeout", ("--process-timeout",), to_positive_float, 30.0,
           "seconds signal/stdin wait for the process to start", "SECONDS"),
    Option("stop_timeout", ("--stop-timeout",), to_positive_float, 5.0,
           "seconds allowed for a graceful stop", "SECONDS"),
    # limits
    Option("max_payload", ("--max-payload",), to_positive_int, 1048576,
           "largest client frame payload, in bytes", "BYTES"),
    Option("agent_message_size", ("--agent-message-size",),
           to_agent_message_size, AGENT_MESSAGE_MAX,
           f"largest agent message including its header, in bytes "
           f"({AGENT_MESSAGE_MIN}..{AGENT_MESSAGE_MAX})", "BYTES"),
    Option("shim_buffer_bytes", ("--shim-buffer-bytes",), to_positive_int,
           4194304, "output kept for a shim that is not connected, in bytes",
           "BYTES"),
)

OPTIONS_BY_NAME: Mapping[str, Option] = types.MappingProxyType(
    {opt.name: opt for opt in OPTIONS}
)
CONF_KEYS = frozenset(opt.name for opt in OPTIONS if opt.conf)

SOURCE_DEFAULT = "default"
SOURCE_POD_MODE = "pod mode"


@dataclass(frozen=True)
class Config:
    socket_path: str
    uri: str | None
    log_level: str
    log_format: str
    ksm: str
    ksm_root: str
    meminfo_path: str
    ksm_aggressive_seconds: float
    ksm_standard_seconds: float
    ksm_slow_seconds: float
    ready_timeout: float
    shim_timeout: float
    process_timeout: float
    max_payload: int
    agent_message_size: int
    shim_buffer_bytes: int
    stop_timeout: float
    config_path: str | None = None
    sources: Mapping[str, str] = field(default_factory=dict)

    @property
    def pod_mode(self) -> bool:
        return self.uri is not None

    @property
    def uri_for_clients(self) -> str:
        return URI_SCHEME + self.socket_path  # made absolute by its converter


# --------------------------------------------------------------------------
# Command line.


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of exiting on bad input."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"command line: {message}")


def _default_text(opt: Option) -> str:
    if opt.default is None:
        return "not set"
    if opt.name == "log_level":
        return "warn"
    return str(opt.default)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cc-proxy",
        description="Clear Containers proxy: routes runtime, shim and agent "
        "traffic. Priority: defaults < conf file < $" + ENV_LOG_LEVEL
        + " < command line.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", "-version", action="store_true",
                        default=False, help="print the version and exit")
    parser.add_argument("--config", "-config", metavar="PATH", default=None,
                        help=f"conf file (TOML) (default: {DEFAULT_CONF_PATH},"
                        " ignored if missing)")
    for opt in OPTIONS:
        extra = "" if opt.conf else ", command line only"
        parser.add_argument(
            *opt.flags,
            dest=opt.name,
            metavar=opt.metavar,
            default=None,
            help=f"{opt.help} (default: {_default_text(opt)}{extra})",
        )
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse the command line; ConfigError on an unknown or incomplete flag.

    ``--help`` prints the help and raises SystemExit(0), as argparse does.
    """
    return build_parser().parse_args(list(argv))


# --------------------------------------------------------------------------
# Conf file.


def _read_conf(path: str, explicit: bool) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if not explicit:
            return None
        raise ConfigError(
            f"command line --config: conf file {path} does not exist"
        ) from None
    except OSError as e:
        raise ConfigError(
            f"conf file {path}: cannot read it: {e.strerror or e}"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"conf file {path}: invalid TOML: {e}") from None
    for key in data:
        if key not in CONF_KEYS:
            hint = (" (command line only)" if key in OPTIONS_BY_NAME
                    else f" (known keys: {', '.join(sorted(CONF_KEYS))})")
            raise ConfigError(f"conf file {path}: unknown key {key!r}{hint}")
    return data


# --------------------------------------------------------------------------
# Merge.


def _convert(opt: Option, raw: Any, source: str, where: str) -> Any:
    try:
        return opt.convert(raw)
    except ValueError as e:
        raise ConfigError(f"{source}{where}: {e}") from None


def from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> Config:
    """Build the Config from parsed flags, the conf file and the environment."""
    env = os.environ if environ is None else environ
    explicit = args.config is not None
    conf_path = args.config if explicit else DEFAULT_CONF_PATH
    conf = _read_conf(conf_path, explicit)
    config_path = os.path.abspath(conf_path) if conf is not None else None

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for opt in OPTIONS:
        value, source = opt.default, SOURCE_DEFAULT
        if conf is not None and opt.name in conf:
            source = f"conf file {conf_path}"
            value = _convert(opt, conf[opt.name], source, f": key {opt.name!r}")
        given = getattr(args, opt.name, None)
        # The environment is consulted only when the flag is absent.
        if given is None and opt.env and env.get(opt.env, "").strip():
            source = f"environment {opt.env}"
            value = _convert(opt, env[opt.env], source, "")
        if given is not None:
            source = f"command line {opt.flags[0]}"
            value = _convert(opt, given, source, "")
        values[opt.name] = value
        sources[opt.name] = source

    return _derive(values, sources, socket_path_given=args.socket_path is not None, config_path=config_path)


def _derive(values: dict[str, Any], sources: dict[str, str], socket_path_given: bool,
            config_path: str | None) -> Config:
    """Apply the rules between options, then freeze."""
    if values["uri"] is not None:
        # Socket path: --socket-path > path of --uri > conf socket_path > default.
        if not socket_path_given:
            values["socket_path"] = uri_path(values["uri"])
            sources["socket_path"] = sources["uri"]
        # Pod mode never touches KSM.
        values["ksm"] = "initial"
        sources["ksm"] = SOURCE_POD_MODE
    return Config(**values, config_path=config_path, sources=types.MappingProxyType(sources))


def load(argv: list[str], environ: Mapping[str, str] | None = None) -> Config:
    """Parse ``argv`` (without the program name) into a Config.

    Raises ConfigError naming the source and key of the first bad value.
    """
    return from_args(parse_args(argv), environ)


def build(**overrides: Any) -> Config:
    """A Config from the defaults and ``overrides``, reading no file.

    Meant for tests and embedding: every override goes through its option's
    converter, and its source is recorded as "override".
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for opt in OPTIONS:
        if opt.name in overrides:
            values[opt.name] = _convert(opt, overrides.pop(opt.name),
                                        "override", f" {opt.name!r}")
            sources[opt.name] = "override"
        else:
            values[opt.name] = opt.default
            sources[opt.name] = SOURCE_DEFAULT
    if overrides:
        raise ConfigError(f"override: unknown option(s) {sorted(overrides)}")
    return _derive(values, sources, socket_path_given=sources["socket_path"] != SOURCE_DEFAULT, config_path=None)


__all__ = [
    "DEFAULT_CONF_PATH",
    "DEFAULT_SOCKET_PATH",
    "ENV_LOG_LEVEL",
    "LOG_LEVELS",
    "OPTIONS",
    "Config",
    "ConfigError",
    "build",
    "build_parser",
    "from_args",
    "load",
    "parse_args",
    "to_log_level",
]
