"""The one loguru configuration of the daemon.

Only the entry point calls ``configure``; library modules just use
``from loguru import logger`` and bind structured fields::

    log = logger.bind(client=client_id, vm=container_id, token=token_prefix(t))

Every bound field is rendered as ``key=value`` after the message, on every
sink. Formats:

* ``human``: loguru's coloured layout with a timestamp (colour only on a tty).
* ``plain``: ``LEVEL message key=value ...``, no colour and no timestamp,
  because journald stamps each line itself.
* ``auto``: plain under journald (``JOURNAL_STREAM`` set) or when stderr is
  not a terminal, human otherwise.

Pod mode also logs to syslog (daemon facility). Never ``enqueue=True``: its
worker thread can hang under gevent's monkey-patching.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from loguru import logger

from cc_proxy.config import to_log_level

#: Where the syslog sink connects in pod mode; a module constant so tests can
#: point it elsewhere.
SYSLOG_PATH = "/dev/log"
SYSLOG_IDENT = "cc-proxy"

#: Reserved extra key holding the pre-rendered ``key=value`` text of a record.
_KV = "_kv"

_HUMAN = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> | "
    "<level>{level: <8}</level> | "
    "<cyan>{name}</cyan>:<cyan>{line}</cyan> - "
    "<level>{message}</level><dim>{extra[" + _KV + "]}</dim>\n{exception}"
)
_PLAIN = "{level} {message}{extra[" + _KV + "]}\n{exception}"
_SYSLOG = "{level} {message}{extra[" + _KV + "]}"


@dataclass
class _State:
    config: Any = None
    stream: TextIO | None = None
    environ: Mapping[str, str] | None = None
    handler_ids: tuple[int, ...] = ()
    level_no: int | None = None


_state = _State()
_syslog_sinks: list = []


def _quote(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' ="\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace(
            "\n", "\\n"
        ).replace("\t", "\\t") + '"'
    return text


def render_fields(extra: Mapping[str, Any]) -> str:
    """`` key=value ...`` for every bound field (empty when none)."""
    parts = [
        f"{key}={_quote(value)}"
        for key, value in extra.items()
        if not key.startswith("_")
    ]
    return (" " + " ".join(parts)) if parts else ""


def _formatter(template: str):
    def fmt(record) -> str:
        record["extra"][_KV] = render_fields(record["extra"])
        return template

    return fmt


def _choose_format(log_format: str, stream: TextIO, environ: Mapping[str, str]) -> str:
    if log_format != "auto":
        return log_format
    if "JOURNAL_STREAM" in environ:
        return "plain"
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return "human" if tty else "plain"


#: Syslog priorities (RFC 5424 severities) by loguru level number.
_SEVERITIES = ((logging.DEBUG, 7), (logging.INFO, 6), (25, 5),  # 25: SUCCESS
               (logging.WARNING, 4), (logging.ERROR, 3))
_FACILITY_DAEMON = 3


def _severity(level_no: int) -> int:
    for upper, severity in _SEVERITIES:
        if level_no <= upper:
            return severity
    return 2  # critical


class SyslogSink:
    """A loguru sink writing RFC 3164 style datagrams to a local syslog socket.

    Connects at creation (OSError if the socket is missing or refuses us). A
    failed send reconnects once and otherwise drops the line: logging must
    never take the daemon down, and there is nowhere better to report it.
    """

    def __init__(self, path: str, ident: str = SYSLOG_IDENT) -> None:
        self._path = path
        self._ident = f"{ident}[{os.getpid()}]"
        self._sock = self._connect()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        return sock

    def __call__(self, message) -> None:
        pri = _FACILITY_DAEMON * 8 + _severity(message.record["level"].no)
        data = f"<{pri}>{self._ident}: {message}".encode("utf-8", "replace")
        for attempt in (1, 2):
            try:
                if self._sock is None:
                    self._sock = self._connect()
                self._sock.send(data)
                return
            except OSError:
                self.close()
                if attempt == 2:
                    return

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _remove_ours() -> None:
    for handler_id in _state.handler_ids:
        try:
            logger.remove(handler_id)
        except ValueError:  # already removed by someone else
            pass
    _state.handler_ids = ()
    while _syslog_sinks:
        _syslog_sinks.pop().close()


def configure(
    config: Any,
    *,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Install our sinks (replacing loguru's default and our previous ones).

    ``stream`` defaults to ``sys.stderr`` and ``environ`` to ``os.environ``;
    both are parameters for tests.
    """
    level = to_log_level(config.log_level)
    out = sys.stderr if stream is None else stream
    env = os.environ if environ is None else environ

    try:
        logger.remove(0)  # loguru's default stderr handler
    except ValueError:
        pass
    _remove_ours()

    kind = _choose_format(config.log_format, out, env)
    if kind == "human":
        ids = [logger.add(out, level=level, format=_formatter(_HUMAN),
                          colorize=None, backtrace=False, diagnose=False)]
    else:
        ids = [logger.add(out, level=level, format=_formatter(_PLAIN),
                          colorize=False, backtrace=False, diagnose=False)]

    _state.config = config
    _state.stream = stream
    _state.environ = environ
    _state.level_no = logger.level(level).no
    _state.handler_ids = tuple(ids)

    if getattr(config, "pod_mode", False):
        try:
            sink = SyslogSink(SYSLOG_PATH)
        except OSError as e:
            logger.warning("syslog unavailable at {}, logging to stderr only: "
                           "{}", SYSLOG_PATH, e.strerror or e)
        else:
            _syslog_sinks.append(sink)
            ids.append(logger.add(sink, level=level,
                                  format=_formatter(_SYSLOG),
                                  colorize=False, backtrace=False,
                                  diagnose=False))
            _state.handler_ids = tuple(ids)


def set_level(level: str) -> None:
    """Change the level of every sink we added (SIGHUP reload); ``configure`` must have run.

    Accepts the command-line names (debug, warn, panic...) and loguru names.
    """
    config = dataclasses.replace(_state.config, log_level=to_log_level(level))
    configure(config, stream=_state.stream, environ=_state.environ)


def is_debug() -> bool:
    """True when our sinks let DEBUG records through (skip costly formatting)."""
    return _state.level_no is not None and _state.level_no <= logging.DEBUG


# A token as the router makes them: 32 bytes, URL-safe base64 with one "=".
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}=")


def redact_tokens(text: str) -> str:
    """``text`` with every whole token cut to its prefix (wire errors quote tokens)."""
    return _TOKEN.sub(lambda match: token_prefix(match.group()), text)


def token_prefix(token: str | None) -> str:
    """The first 8 characters of a token, for logs; never log a whole token."""
    if not token:
        return "-"
    return str(token)[:8]


def hexdump(data: bytes, limit: int = 512) -> str:
    """A compact hex + ASCII dump of at most ``limit`` bytes of ``data``.

    One line per 16 bytes: offset, hex bytes, printable ASCII. A final line
    says how many bytes were left out.
    """
    data = bytes(data)
    shown = data[: max(limit, 0)]
    lines = []
    for off in range(0, len(shown), 16):
        chunk = shown[off: off + 16]
        hexpart = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{off:04x}  {hexpart:<47}  |{text}|")
    if len(data) > len(shown):
        lines.append(f"... {len(data) - len(shown)} more bytes "
                     f"({len(data)} total)")
    if not data:
        lines.append("(empty)")
    return "\n".join(lines)


__all__ = [
    "SYSLOG_PATH",
    "SyslogSink",
    "configure",
    "hexdump",
    "is_debug",
    "render_fields",
    "set_level",
    "token_prefix",
]
