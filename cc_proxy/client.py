"""A blocking client of the proxy, for runtimes, shims and tests.

Plain ``socket`` calls: blocking without gevent, cooperative once gevent has
monkey-patched. The library configures no logging.

Theory of operation
-------------------
Every frame read from the socket lands, in arrival order, in one queue.

* ``read_frame()`` / ``read_event()`` take the head of that queue, whatever its
  kind (stdout, stderr, exit notification or a response).
* ``call()`` / ``read_response()`` take the first *response* of that queue and
  leave every stream or notification frame in place for ``read_event()``.

The proxy answers commands in order. ``send_command()`` does not wait; the
client counts the commands whose response nobody has taken yet, so a ``call()``
made after a fire-and-forget command (a shim's ConnectShim, then a Signal)
returns its own response and leaves the earlier one for ``read_response()``.

One greenlet may read and another write at the same time; two concurrent
readers (or writers) are not supported, as with any socket.
"""

from __future__ import annotations

import json
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Self

from cc_proxy import frames
from cc_proxy.errors import PeerProtocolError
from cc_proxy.frames import Command, Frame, FrameDecoder, FrameType, Notification, Stream
from cc_proxy.payloads import encode_json

# Responses such as pscontainer output and bursts of stdout can be large; the
# client trusts the proxy far more than the proxy trusts its clients.
MAX_PAYLOAD = 64 << 20
RECV_SIZE = 64 << 10
URL_SCHEME = "unix://"

_ABSENT = object()


class ResponseError(Exception):
    """The proxy answered a command with an error response."""

    def __init__(self, message: str, opcode: int | None = None):
        super().__init__(message)
        self.message = message
        self.opcode = opcode

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class IoInfo:
    """The ``io`` object of a RegisterVM or AttachVM response."""

    url: str
    tokens: list[str] = field(default_factory=list)


def socket_path(path: str) -> str:
    """A filesystem path from a path or a ``unix:///abs`` URL."""
    if path.startswith(URL_SCHEME):
        return path[len(URL_SCHEME):]
    return path


def response_message(payload: bytes) -> str:
    """The ``msg`` text of an error response (the raw payload if it is not the expected JSON)."""
    try:
        value = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return payload.decode(errors="replace")
    if isinstance(value, dict) and isinstance(value.get("msg"), str):
        return value["msg"]
    return payload.decode(errors="replace")


def _io_info(payload: bytes) -> IoInfo:
    try:
        io = json.loads(payload)["io"]
        return IoInfo(io["URL"], list(io.get("tokens") or []))
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise PeerProtocolError(f"malformed io response {payload!r}: {exc!r}") from None


class Client:
    def __init__(self, path: str, timeout: float | None = 10.0):
        self.path = socket_path(path)
        self.timeout = timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(self.path)
        except BaseException:
            self._sock.close()
            raise
        self._decoder = FrameDecoder(max_payload=MAX_PAYLOAD)
        self._pending: deque[Frame] = deque()
        self._eof = False
        self._closed = False
        # Commands sent whose response has not been handed out yet.
        self._unanswered = 0

    @classmethod
    def connect_retry(cls, path: str, attempts: int, interval: float, timeout: float | None = 10.0) -> Client:
        """Dial up to ``attempts`` times, ``interval`` seconds apart, like the runtime does."""
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        last: OSError | None = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(interval)
            try:
                return cls(path, timeout)
            except OSError as exc:
                last = exc
        raise ConnectionError(
            f"could not connect to {socket_path(path)} after {attempts} attempts every {interval}s: {last}"
        ) from last

    # -- lifecycle --------------------------------------------------------------------------------------

    @property
    def sock(self) -> socket.socket:
        return self._sock

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- framing ----------------------------------------------------------------------------------------

    def send_frame(self, ftype: int, opcode: int, payload: bytes = b"", header_words: int = 3,
                   error: bool = False) -> None:
        """One frame; ``header_words`` over 3 adds zero padding words to the header."""
        self.send_raw(frames.encode(ftype, opcode, payload, error, header_words))

    def send_raw(self, data: bytes) -> None:
        # A read may have left a shorter timeout on the socket.
        self._sock.settimeout(self.timeout)
        self._sock.sendall(data)

    def read_frame(self, timeout: float | None = None) -> Frame | None:
        """The next frame (queued first, then from the socket); None on EOF.

        ``timeout`` None means the client's default; ``TimeoutError`` when it expires.
        """
        deadline = self._deadline(timeout)
        while not self._pending:
            if not self._fill(deadline):
                return None
        frame = self._pending.popleft()
        if frame.type == FrameType.RESPONSE:
            self._answered()
        return frame

    def _deadline(self, timeout: float | None) -> float | None:
        if timeout is None:
            timeout = self.timeout
        return None if timeout is None else time.monotonic() + timeout

    def _fill(self, deadline: float | None) -> bool:
        """Read once and queue every complete frame; False on EOF."""
        if self._eof:
            return False
        if deadline is None:
            self._sock.settimeout(None)
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out waiting for a frame from the proxy")
            self._sock.settimeout(remaining)
        try:
            data = self._sock.recv(RECV_SIZE)
        except TimeoutError:
            raise TimeoutError("timed out waiting for a frame from the proxy") from None
        if not data:
            self._eof = True
            if self._decoder.pending:
                raise PeerProtocolError(f"connection closed inside a frame ({self._decoder.pending} bytes pending)")
            return False
        self._pending.extend(self._decoder.feed(data))
        return True

    def _answered(self) -> None:
        self._unanswered = max(0, self._unanswered - 1)

    def _take_response(self, index: int, deadline: float | None) -> Frame:
        """Remove and return the ``index``-th queued response, reading until it arrives."""
        scanned = 0  # frames of the queue already looked at
        seen = 0  # responses among them
        while True:
            while scanned < len(self._pending):
                frame = self._pending[scanned]
                if frame.type == FrameType.RESPONSE:
                    if seen == index:
                        del self._pending[scanned]
                        self._answered()
                        return frame
                    seen += 1
                scanned += 1
            if not self._fill(deadline):
                raise ConnectionError("the proxy closed the connection before responding")

    @staticmethod
    def _check(frame: Frame) -> bytes:
        if frame.error:
            raise ResponseError(response_message(frame.payload), frame.opcode)
        return frame.payload

    # -- commands ---------------------------------------------------------------------------------------

    @staticmethod
    def _encode_payload(payload: dict | bytes | None) -> bytes:
        if payload is None:
            return b""
        if isinstance(payload, (bytes, bytearray, memoryview)):
            return bytes(payload)
        return encode_json(payload)

    def send_command(self, command: Command, payload: dict | bytes | None = None) -> None:
        """Fire and forget; ``read_response()`` later returns the response."""
        self.send_frame(FrameType.COMMAND, command, self._encode_payload(payload))
        self._unanswered += 1

    def read_response(self, timeout: float | None = None) -> bytes:
        """The next response's payload; stream frames read meanwhile stay queued. Error -> ResponseError."""
        return self._check(self._take_response(0, self._deadline(timeout)))

    def call(self, command: Command, payload: dict | bytes | None = None, timeout: float | None = None) -> bytes:
        """Send a command and return its response payload (ResponseError on an error response)."""
        earlier = self._unanswered
        self.send_command(command, payload)
        return self._check(self._take_response(earlier, self._deadline(timeout)))

    # -- runtime role -----------------------------------------------------------------------------------

    def register_vm(self, container_id: str, ctl_serial: str, io_serial: str, console: str | None = None,
                    num_io_streams: int = 0) -> IoInfo:
        payload = {"containerId": container_id, "ctlSerial": ctl_serial, "ioSerial": io_serial,
                   "numIOStreams": num_io_streams}
        if console:
            payload["console"] = console
        return _io_info(self.call(Command.REGISTER_VM, payload))

    def attach_vm(self, container_id: str, num_io_streams: int = 0) -> IoInfo:
        payload = {"containerId": container_id, "numIOStreams": num_io_streams}
        return _io_info(self.call(Command.ATTACH_VM, payload))

    def unregister_vm(self, container_id: str) -> None:
        self.call(Command.UNREGISTER_VM, {"containerId": container_id})

    def hyper(self, name: str, data=_ABSENT, tokens: list[str] | None = None) -> bytes:
        """Forward an agent command; returns the agent's ACK payload verbatim."""
        payload: dict = {"hyperName": name}
        if tokens:
            payload["tokens"] = list(tokens)
        if data is not _ABSENT:
            payload["data"] = data
        return self.call(Command.HYPER, payload)

    # -- shim role --------------------------------------------------------------------------------------

    def connect_shim(self, token: str, wait: bool = True) -> None:
        """Claim ``token``; with ``wait`` False the response is left for ``read_response()``, as cc-shim does."""
        if wait:
            self.call(Command.CONNECT_SHIM, {"token": token})
        else:
            self.send_command(Command.CONNECT_SHIM, {"token": token})

    def disconnect_shim(self, wait: bool = False) -> None:
        self.send_command(Command.DISCONNECT_SHIM)
        if wait:
            self.read_response()

    def send_stdin(self, data: bytes) -> None:
        """Exactly one stdin frame with these bytes; the empty frame means EOF."""
        self.send_frame(FrameType.STREAM, Stream.STDIN, bytes(data))

    def signal(self, number: int, columns: int = 0, rows: int = 0) -> None:
        payload = {"signalNumber": number}
        if columns or rows:
            payload["columns"] = columns
            payload["rows"] = rows
        self.call(Command.SIGNAL, payload)

    def log(self, source: str, level: str, msg: str, container_id: str | None = None) -> None:
        payload = {"source": source, "level": level, "msg": msg}
        if container_id is not None:
            payload["containerId"] = container_id
        self.send_frame(FrameType.STREAM, Stream.LOG, encode_json(payload))

    def read_event(self, timeout: float | None = None) -> tuple[str, object] | None:
        """The next ("stdout", bytes), ("stderr", bytes), ("exit", int) or ("response", Frame); None on EOF.

        Anything else the proxy should never send comes back as ("frame", Frame).
        """
        frame = self.read_frame(timeout)
        if frame is None:
            return None
        if frame.type == FrameType.STREAM and frame.opcode == Stream.STDOUT:
            return "stdout", frame.payload
        if frame.type == FrameType.STREAM and frame.opcode == Stream.STDERR:
            return "stderr", frame.payload
        if frame.type == FrameType.NOTIFICATION and frame.opcode == Notification.PROCESS_EXITED:
            if len(frame.payload) != 1:
                raise PeerProtocolError(f"ProcessExited payload must be one byte, got {frame.payload!r}")
            return "exit", frame.payload[0]
        if frame.type == FrameType.RESPONSE:
            return "response", frame
        return "frame", frame

    def read_output_until_exit(self, timeout: float | None = None) -> tuple[bytes, bytes, int]:
        """Collect stdout and stderr until ProcessExited; returns (stdout, stderr, exit code).

        Successful responses met on the way (a ConnectShim sent without waiting) are skipped; an error
        response raises ResponseError; EOF before the exit raises ConnectionError. ``timeout`` bounds the
        whole wait.
        """
        deadline = self._deadline(timeout)
        out, err = bytearray(), bytearray()
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if remaining == 0.0:
                raise TimeoutError(f"timed out waiting for the process to exit (stdout {bytes(out)!r})")
            event = self.read_event(remaining)
            if event is None:
                raise ConnectionError(
                    f"the proxy closed the connection before the process exited "
                    f"(stdout {bytes(out)!r}, stderr {bytes(err)!r})"
                )
            kind, value = event
            if kind == "stdout":
                out += value
            elif kind == "stderr":
                err += value
            elif kind == "exit":
                return bytes(out), bytes(err), value
            elif kind == "response":
                self._check(value)
            else:
                raise PeerProtocolError(f"unexpected frame from the proxy: {value!r}")


__all__ = ["MAX_PAYLOAD", "Client", "IoInfo", "ResponseError", "response_message", "socket_path"]
