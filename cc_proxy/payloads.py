"""JSON payloads of commands and log streams: parse and validate, no I/O.

Every refusal raises ``ProxyError`` with the wire text of SPEC.md sections 3
and 4. Unknown fields are ignored; ``Hyper.data`` is kept as parsed JSON so
relocation can change two keys and leave every other field as given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cc_proxy.errors import ProxyError

# Far above any real pod, far below what could exhaust memory.
MAX_IO_STREAMS = 4096

SIGKILL, SIGTERM, SIGWINCH = 9, 15, 28
# Highest valid signal number + 1 (Linux SIGUNUSED/SIGSYS is 31).
SIGNAL_LIMIT = 31

# The names Go's syscall.Signal.String() gives, which the original put in its
# error texts; clients may match on them.
SIGNAL_NAMES = (
    "signal 0", "hangup", "interrupt", "quit", "illegal instruction",
    "trace/breakpoint trap", "aborted", "bus error", "floating point exception",
    "killed", "user defined signal 1", "segmentation fault", "user defined signal 2",
    "broken pipe", "alarm clock", "terminated", "stack fault", "child exited",
    "continued", "stopped (signal)", "stopped", "stopped (tty input)",
    "stopped (tty output)", "urgent I/O condition", "CPU time limit exceeded",
    "file size limit exceeded", "virtual timer expired", "profiling timer expired",
    "window changed", "I/O possible", "power failure",
)

LOG_SOURCES = ("shim", "runtime")
LOG_LEVELS = ("debug", "info", "warn", "error")
# Commands whose process needs I/O sequence numbers from a session.
RELOCATED_COMMANDS = ("newcontainer", "execcmd")


def decode_json(payload: bytes, what: str) -> dict:
    """An object from a JSON payload; an empty payload is an empty object."""
    if not payload:
        return {}
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise ProxyError(f"{what}: invalid JSON payload: {exc}") from None
    if not isinstance(value, dict):
        raise ProxyError(f"{what}: payload must be a JSON object")
    return value


def encode_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _string(obj: dict, key: str, what: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ProxyError(f"{what}: {key} must be a string")
    return value


def _integer(obj: dict, key: str, what: str) -> int:
    value = obj.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProxyError(f"{what}: {key} must be an integer")
    return value


def _num_io_streams(obj: dict, what: str) -> int:
    count = _integer(obj, "numIOStreams", what)
    if not 0 <= count <= MAX_IO_STREAMS:
        raise ProxyError(f"{what}: numIOStreams must be between 0 and {MAX_IO_STREAMS}, got {count}")
    return count


@dataclass(frozen=True)
class RegisterVM:
    container_id: str
    ctl_serial: str
    io_serial: str
    console: str
    num_io_streams: int

    @classmethod
    def parse(cls, payload: bytes) -> RegisterVM:
        what = "RegisterVM"
        obj = decode_json(payload, what)
        fields = [_string(obj, key, what) for key in ("containerId", "ctlSerial", "ioSerial")]
        if not all(fields):
            raise ProxyError("malformed RegisterVM command")
        return cls(*fields, _string(obj, "console", what), _num_io_streams(obj, what))


@dataclass(frozen=True)
class AttachVM:
    container_id: str
    num_io_streams: int

    @classmethod
    def parse(cls, payload: bytes) -> AttachVM:
        obj = decode_json(payload, "AttachVM")
        return cls(_string(obj, "containerId", "AttachVM"), _num_io_streams(obj, "AttachVM"))


def parse_unregister(payload: bytes) -> str:
    """The container id of an UnregisterVM."""
    return _string(decode_json(payload, "UnregisterVM"), "containerId", "UnregisterVM")


def parse_connect_shim(payload: bytes) -> str:
    """The token of a ConnectShim."""
    return _string(decode_json(payload, "ConnectShim"), "token", "ConnectShim")


def io_response(url: str, tokens: list[str]) -> bytes:
    """The original's exact shape: "URL" upper case, ``null`` for no tokens."""
    return encode_json({"io": {"URL": url, "tokens": tokens or None}})


@dataclass(frozen=True)
class Hyper:
    name: str
    tokens: list[str]
    data: Any  # parsed JSON, or ``MISSING`` when the field was absent

    MISSING = object()

    @classmethod
    def parse(cls, payload: bytes) -> Hyper:
        obj = decode_json(payload, "Hyper")
        name = _string(obj, "hyperName", "Hyper")
        tokens = obj.get("tokens") or []
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ProxyError("Hyper: tokens must be a list of strings")
        return cls(name, tokens, obj.get("data", cls.MISSING))

    @property
    def relocated(self) -> bool:
        return self.name in RELOCATED_COMMANDS

    def check_tokens(self) -> str | None:
        """The one token a relocated command names (or None); refuse any other use of tokens."""
        count = len(self.tokens)
        if self.relocated:
            if count > 1:
                raise ProxyError(f"expected 0 or 1 token, got {count}")
            return self.tokens[0] if count else None
        if count:
            raise ProxyError(f"{self.name} doesn't need tokens but {count} token(s) were given")
        return None

    def encoded_data(self) -> bytes:
        """What goes to the agent: nothing when ``data`` was absent."""
        return b"" if self.data is Hyper.MISSING else encode_json(self.data)


def relocate(hyper: Hyper, io_base: int) -> tuple[bytes, str]:
    """Point the process of newcontainer/execcmd at the session's sequence numbers.

    Returns the agent payload and, for newcontainer, the container id (else "").
    Every other field of ``data`` is kept as given.
    """
    data = hyper.data
    process = data.get("process") if isinstance(data, dict) else None
    if not isinstance(process, dict):
        raise ProxyError(f"{hyper.name}: data.process must be a JSON object")
    for key, label in (("stdio", "Stdio"), ("stderr", "Stderr")):
        value = process.get(key) or 0
        if value != 0:
            raise ProxyError(f"expected process.{label} to be 0, got {value}")
    data = dict(data)
    process = dict(process)
    process["stdio"] = io_base
    if not process.get("terminal"):
        process["stderr"] = io_base + 1
    data["process"] = process
    container_id = ""
    if hyper.name == "newcontainer":
        container_id = data.get("id") if isinstance(data.get("id"), str) else ""
    return encode_json(data), container_id


@dataclass(frozen=True)
class Signal:
    number: int
    columns: int
    rows: int

    @classmethod
    def parse(cls, payload: bytes) -> Signal:
        what = "Signal"
        obj = decode_json(payload, what)
        number = _integer(obj, "signalNumber", what)
        columns = _integer(obj, "columns", what)
        rows = _integer(obj, "rows", what)
        if not 0 <= number < SIGNAL_LIMIT:
            raise ProxyError(f"invalid signal number {number}")
        if number == SIGWINCH and (columns == 0 or rows == 0):
            raise ProxyError(f"received SIGWINCH but terminal size is invalid ({columns},{rows})")
        if number != SIGWINCH and (columns or rows):
            raise ProxyError(f"received a terminal size ({columns},{rows}) for signal {SIGNAL_NAMES[number]}")
        return cls(number, columns, rows)

    @property
    def name(self) -> str:
        return SIGNAL_NAMES[self.number]

    @property
    def ends_process(self) -> bool:
        return self.number in (SIGKILL, SIGTERM)

    @property
    def is_winsize(self) -> bool:
        return self.number == SIGWINCH


@dataclass(frozen=True)
class LogEntry:
    source: str
    level: str
    message: str
    container_id: str

    @classmethod
    def parse(cls, payload: bytes) -> LogEntry:
        obj = decode_json(payload, "log")
        source = obj.get("source")
        level = obj.get("level")
        message = obj.get("msg")
        if source not in LOG_SOURCES:
            raise ProxyError(f"invalid source: {'' if source is None else source}")
        if level not in LOG_LEVELS:
            raise ProxyError(f"invalid level: {'' if level is None else level}")
        if not message or not isinstance(message, str):
            raise ProxyError("no message specified")
        return cls(source, level, message, _string(obj, "containerId", "log"))
