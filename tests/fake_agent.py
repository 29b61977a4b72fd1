"""A fake hyperstart agent over real AF_UNIX sockets, for scenario tests.

It plays the VM side of SPEC.md section 5: it listens where the hypervisor
would expose the agent's ctl and io serial ports (and the console), sends
READY when ctl opens, records every command in arrival order and answers each
exactly once, in order (ACK with an empty payload unless told otherwise). Tests
inject io output, process exits, ctl messages and channel loss.

Everything runs in greenlets of the test process (``tests/conftest.py``
monkey-patches), owned by one group that ``close()`` kills. Waits are bounded
with ``gevent.Timeout`` and woken by events, never by polling sleeps.

Threading model per accepted connection: one reader greenlet; on ctl, one
replier greenlet answering the recorded commands in FIFO order (so a reply held
back with ``delay_event`` holds back the later ones, as in the real agent);
writes go through one lock per connection.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Self

import gevent
import gevent.event
import gevent.lock
import gevent.pool
import gevent.queue
import pytest
from gevent import socket

from cc_proxy.agent_codec import CTL_HEADER, MAX_MESSAGE, AgentCode, CtlDecoder, IoDecoder, encode_io, encode_io_split
from cc_proxy.errors import PeerProtocolError

RECV_SIZE = 64 << 10


def command_name(code: int) -> str:
    try:
        return AgentCode(code).name.lower()
    except ValueError:
        return f"code{code}"


@dataclass(frozen=True)
class AgentCommand:
    code: AgentCode | int
    name: str
    payload: bytes

    @property
    def json(self):
        """The payload as JSON, None when empty."""
        return json.loads(self.payload) if self.payload else None


@dataclass(frozen=True)
class _Policy:
    ack: bytes | None = b""
    error: bytes | None = None
    delay_event: gevent.event.Event | None = None


class _Conn:
    """One accepted connection: its socket, a write lock and a closed event."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.lock = gevent.lock.Semaphore()
        self.closed = gevent.event.Event()

    def send(self, data: bytes) -> None:
        with self.lock:
            self.sock.sendall(data)

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.shutdown()
        self.sock.close()
        self.closed.set()


class FakeAgent:
    def __init__(self, directory: str, send_ready: bool = True, console: bool = False):
        self.directory = directory
        self.ctl_path = os.path.join(directory, "ctl.sock")
        self.io_path = os.path.join(directory, "io.sock")
        self.console_path = os.path.join(directory, "console.sock")
        self.send_ready = send_ready
        self.console = console
        self.commands: list[AgentCommand] = []
        self.io_received: dict[int, bytearray] = defaultdict(bytearray)
        self.io_messages: list[tuple[int, bytes]] = []
        self.console_received = bytearray()
        self.errors: list[str] = []  # protocol errors seen on our side
        self.ctl_connected = gevent.event.Event()
        self.io_connected = gevent.event.Event()
        self.console_connected = gevent.event.Event()
        self.ctl_conn: _Conn | None = None
        self.io_conn: _Conn | None = None
        self.console_conn: _Conn | None = None
        self.ctl_accepts = 0
        self.io_accepts = 0
        self._policies: dict[str, _Policy] = {}
        self._group = gevent.pool.Group()
        self._listeners: list[socket.socket] = []
        self._conns: list[_Conn] = []
        self._changed = gevent.event.Event()
        self._started = False
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> Self:
        if self._started:
            raise RuntimeError("fake agent already started")
        self._started = True
        paths = [(self.ctl_path, self._serve_ctl), (self.io_path, self._serve_io)]
        if self.console:
            paths.append((self.console_path, self._serve_console))
        for path, handler in paths:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(8)
            self._listeners.append(listener)
            self._group.spawn(self._accept_loop, listener, handler)
        return self

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._group.kill()
        for conn in self._conns:
            conn.close()
        for listener in self._listeners:
            listener.close()
        for path in (self.ctl_path, self.io_path, self.console_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._notify()

    def __enter__(self) -> Self:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def greenlets(self) -> int:
        """Live greenlets of this agent (0 after close)."""
        return len(self._group)

    # -- policies and waits -----------------------------------------------------------------------------

    def reply_with(self, name: str, ack: bytes | None = b"", error: bytes | None = None,
                   delay_event: gevent.event.Event | None = None) -> None:
        """How to answer later commands called ``name``.

        ERROR with ``error`` when given, else ACK with ``ack``; both None: never answer (a hung agent,
        which also holds back every later reply). With ``delay_event`` the reply waits for that event.
        """
        self._policies[name] = _Policy(ack, error, delay_event)

    def wait_command(self, name: str, timeout: float = 5, index: int = 0) -> AgentCommand:
        def found():
            matching = [c for c in self.commands if c.name == name]
            return matching[index] if len(matching) > index else None
        return self._wait_for(found, timeout, lambda: f"command {name!r} #{index}; got {self.command_names()}")

    def command_names(self) -> list[str]:
        return [c.name for c in self.commands]

    def wait_stdin(self, seq: int, nbytes: int, timeout: float = 5) -> bytes:
        """All bytes received on ``seq`` once there are at least ``nbytes``."""
        def enough():
            data = self.io_received.get(seq)
            return bytes(data) if data is not None and len(data) >= nbytes else None
        return self._wait_for(enough, timeout, lambda: f"{nbytes} bytes on seq {seq}; got {self._io_summary()}")

    def wait_io_message(self, seq: int, predicate: Callable[[bytes], bool] | None = None,
                        timeout: float = 5) -> bytes:
        """The payload of the first io message on ``seq`` (matching ``predicate``), e.g. ``lambda p: p == b""``."""
        def match():
            for s, payload in self.io_messages:
                if s == seq and (predicate is None or predicate(payload)):
                    return payload
            return None
        return self._wait_for(match, timeout, lambda: f"io message on seq {seq}; got {self._io_summary()}")

    def wait_ctl_closed(self, timeout: float = 5) -> None:
        self.wait_connected("ctl", timeout)
        self._wait_event(self.ctl_conn.closed, timeout, "the ctl connection to close")

    def wait_io_closed(self, timeout: float = 5) -> None:
        self.wait_connected("io", timeout)
        self._wait_event(self.io_conn.closed, timeout, "the io connection to close")

    def wait_connected(self, channel: str = "ctl", timeout: float = 5) -> None:
        event = {"ctl": self.ctl_connected, "io": self.io_connected, "console": self.console_connected}[channel]
        self._wait_event(event, timeout, f"the proxy to connect to {channel}")

    def _io_summary(self) -> str:
        return repr([(seq, payload[:32]) for seq, payload in self.io_messages[-10:]])

    def _wait_event(self, event: gevent.event.Event, timeout: float, what: str) -> None:
        if not event.wait(timeout):
            raise AssertionError(f"fake agent: timed out after {timeout}s waiting for {what}")

    def _wait_for(self, predicate, timeout: float, describe: Callable[[], str]):
        timer = gevent.Timeout(timeout)
        timer.start()
        try:
            while True:
                result = predicate()
                if result is not None:
                    return result
                self._changed.wait()
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            raise AssertionError(f"fake agent: timed out after {timeout}s waiting for {describe()}") from None
        finally:
            timer.close()

    def _notify(self) -> None:
        """Wake every waiter; each re-checks its condition and waits on the next event."""
        event, self._changed = self._changed, gevent.event.Event()
        event.set()

    # -- injection --------------------------------------------------------------------------------------

    def send_ctl(self, code: int, payload: bytes = b"") -> None:
        """A ctl message, unchecked (any code, any size) so tests can send garbage."""
        self.send_ctl_raw(CTL_HEADER.pack(code, CTL_HEADER.size + len(payload)) + payload)

    def send_ctl_raw(self, data: bytes) -> None:
        self.wait_connected("ctl")
        self.ctl_conn.send(data)

    def send_io(self, seq: int, data: bytes) -> None:
        """Output on ``seq`` as messages of at most 10240 bytes (one empty message for b"")."""
        self.send_io_raw(encode_io_split(seq, data, MAX_MESSAGE))

    def send_io_raw(self, data: bytes) -> None:
        self.wait_connected("io")
        self.io_conn.send(data)

    def exit_process(self, seq: int, code: int) -> None:
        """EOF on ``seq`` then the one-byte exit code, in one write."""
        self.send_io_raw(encode_io(seq, b"") + encode_io(seq, bytes([code])))

    def send_console(self, text: bytes) -> None:
        self.wait_connected("console")
        self.console_conn.send(text)

    def close_io(self) -> None:
        """VM loss: the proxy sees EOF on io."""
        if self.io_conn is not None:
            self.io_conn.close()

    def close_ctl(self) -> None:
        """ctl death: the proxy sees EOF on ctl."""
        if self.ctl_conn is not None:
            self.ctl_conn.close()

    # -- serving ----------------------------------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket, handler) -> None:
        while True:
            sock, _ = listener.accept()
            conn = _Conn(sock)
            self._conns.append(conn)
            self._group.spawn(self._run_conn, conn, handler)

    def _run_conn(self, conn: _Conn, handler) -> None:
        try:
            handler(conn)
        except OSError:
            pass  # the proxy went away, or a test closed the connection
        except PeerProtocolError as exc:
            self.errors.append(str(exc))
        finally:
            conn.close()
            self._notify()

    def _read(self, conn: _Conn) -> Iterator[bytes]:
        while True:
            data = conn.sock.recv(RECV_SIZE)
            if not data:
                return
            yield data

    def _serve_ctl(self, conn: _Conn) -> None:
        self.ctl_conn = conn
        self.ctl_accepts += 1
        if self.send_ready:
            conn.send(CTL_HEADER.pack(AgentCode.READY, CTL_HEADER.size))
        self.ctl_connected.set()
        self._notify()
        replies: gevent.queue.Queue = gevent.queue.Queue(maxsize=10_000)
        replier = self._group.spawn(self._reply_loop, conn, replies)
        decoder = CtlDecoder()
        try:
            for data in self._read(conn):
                for code, payload in decoder.feed(data):
                    name = command_name(code)
                    with contextlib.suppress(ValueError):
                        code = AgentCode(code)
                    command = AgentCommand(code, name, payload)
                    self.commands.append(command)
                    replies.put((command, self._policies.get(name, _Policy())))
                    self._notify()
        finally:
            replier.kill()

    def _reply_loop(self, conn: _Conn, replies: gevent.queue.Queue) -> None:
        while True:
            _command, policy = replies.get()
            if policy.delay_event is not None:
                policy.delay_event.wait()
            if policy.error is not None:
                conn.send(CTL_HEADER.pack(AgentCode.ERROR, CTL_HEADER.size + len(policy.error)) + policy.error)
            elif policy.ack is not None:
                conn.send(CTL_HEADER.pack(AgentCode.ACK, CTL_HEADER.size + len(policy.ack)) + policy.ack)
            else:
                gevent.event.Event().wait()  # hung agent: answer nothing, ever

    def _serve_io(self, conn: _Conn) -> None:
        self.io_conn = conn
        self.io_accepts += 1
        self.io_connected.set()
        self._notify()
        decoder = IoDecoder()
        for data in self._read(conn):
            for seq, payload in decoder.feed(data):
                self.io_messages.append((seq, payload))
                self.io_received[seq] += payload
            self._notify()

    def _serve_console(self, conn: _Conn) -> None:
        self.console_conn = conn
        self.console_connected.set()
        self._notify()
        for data in self._read(conn):
            self.console_received += data


@contextlib.contextmanager
def short_tempdir(prefix: str = "cca") -> Iterator[str]:
    """A directory short enough for AF_UNIX paths (pytest's tmp_path can exceed 107 bytes)."""
    path = tempfile.mkdtemp(prefix=prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def running_agent(**kwargs) -> Iterator[FakeAgent]:
    """A started FakeAgent in its own short directory, closed and removed afterwards."""
    with short_tempdir() as directory, FakeAgent(directory, **kwargs) as agent:
        yield agent


@pytest.fixture
def fake_agent() -> Iterator[FakeAgent]:
    """Import into a test module (``from fake_agent import fake_agent``) to use as a fixture."""
    with running_agent() as agent:
        yield agent
