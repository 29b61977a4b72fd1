"""The agent channels of one VM: ctl (commands), io (process streams), console.

The proxy is the client of all three. Rules (SPEC.md section 5):

* ctl: every command gets exactly one reply, in order. Writing a command and
  queueing its reply slot happen under one lock, so replies handed out FIFO
  reach the right requester even with many clients on one VM. NEXT and
  PROCESSASYNCEVENT are not replies. When ctl dies, every waiting requester
  fails at once.
* io: one reader greenlet hands each message to ``on_io``; EOF or an error
  there means the VM is gone (``on_lost``).
* console: streamed to the debug log line by line.
"""

from __future__ import annotations

import errno
import os
import socket
from collections import deque

import gevent
from gevent.event import AsyncResult
from gevent.lock import Semaphore
from gevent.pool import Group

from cc_proxy import agent_codec
from cc_proxy.agent_codec import AgentCode
from cc_proxy.errors import AgentError, PeerProtocolError, ProxyError

READ_SIZE = 256 * 1024  # many io messages per wake-up
# A compliant agent never sends more than MAX_MESSAGE; allow some slack on
# receive so a slightly larger agent buffer still works, while a corrupt length
# cannot make us buffer without bound.
RECEIVE_LIMIT = 1 << 20


def dial(path: str) -> socket.socket:
    """Connect to an agent socket; the error text mirrors the original's."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise ProxyError(f"dial unix {path}: connect: {reason}") from None
    return sock


def send_all(sock: socket.socket, data: bytes) -> None:
    """``sendall`` without gevent's per-call getsockopt: this is the stdin hot path."""
    view = memoryview(data)
    sent = 0
    while sent < len(view):
        sent += sock.send(view[sent:])


class AgentLink:
    def __init__(self, ctl_path: str, io_path: str, console_path: str | None, *, on_io, on_lost, logger,
                 max_message: int = agent_codec.MAX_MESSAGE):
        self.ctl_path = ctl_path
        self.io_path = io_path
        self.console_path = console_path
        self.on_io = on_io  # on_io(messages: list[(seq, payload)]) from the io reader greenlet
        self.on_lost = on_lost  # on_lost(reason) once, when io (or ctl) dies
        self.log = logger
        self.max_message = max_message
        self.ctl = self.io = self.console = None
        self._ctl_decoder = agent_codec.CtlDecoder(RECEIVE_LIMIT)
        self._ctl_lock = Semaphore()
        self._io_lock = Semaphore()
        self._replies: deque[AsyncResult] = deque()
        self._ctl_dead: str | None = None
        self._greenlets = Group()
        self.closed = False

    # -- set-up ----------------------------------------------------------------

    def connect(self, ready_timeout: float) -> None:
        """Console (if any), then ctl, then io; then wait for READY on ctl."""
        try:
            if self.console_path:
                self.console = dial(self.console_path)
            self.ctl = dial(self.ctl_path)
            self.io = dial(self.io_path)
            self._wait_ready(ready_timeout)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout: float) -> None:
        timer = gevent.Timeout(timeout)
        timer.start()
        try:
            while True:
                data = self.ctl.recv(READ_SIZE)
                if not data:
                    raise ProxyError(f"{self.ctl_path}: the agent closed the ctl channel before READY")
                messages = self._ctl_decoder.feed(data)
                for index, (code, _) in enumerate(messages):
                    if code == AgentCode.READY:
                        self._handle_ctl(messages[index + 1:])
                        return
                    self.log.debug("ignoring agent message {} before READY", code)
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            raise ProxyError(f"timeout waiting for READY from the agent on {self.ctl_path} ({timeout:g}s)") from None
        except PeerProtocolError as exc:
            raise ProxyError(f"{self.ctl_path}: {exc}") from None
        except OSError as exc:
            raise ProxyError(f"{self.ctl_path}: reading READY failed: {exc}") from None
        finally:
            timer.close()

    def start(self) -> None:
        self._greenlets.spawn(self._read_ctl)
        self._greenlets.spawn(self._read_io)
        if self.console is not None:
            self._greenlets.spawn(self._read_console)

    # -- ctl -------------------------------------------------------------------

    def request(self, code: int, payload: bytes = b"") -> bytes:
        """Send one command, return the ACK payload; ERROR or a dead channel raise."""
        message = agent_codec.encode_ctl(code, payload, self.max_message)  # refused before any slot exists
        reply = AsyncResult()
        with self._ctl_lock:
            if self._ctl_dead:
                raise AgentError(self._ctl_dead)
            try:
                self.ctl.sendall(message)
            except OSError as exc:
                self._ctl_died(f"writing to the agent ctl channel failed: {exc}")
                raise AgentError(self._ctl_dead) from None
            self._replies.append(reply)
        return reply.get()

    def _read_ctl(self) -> None:
        reason = "the agent closed the ctl channel"
        try:
            while True:
                data = self.ctl.recv(READ_SIZE)
                if not data:
                    break
                self._handle_ctl(self._ctl_decoder.feed(data))
        except PeerProtocolError as exc:
            reason = f"the agent broke the ctl framing: {exc}"
        except OSError as exc:
            reason = f"reading the agent ctl channel failed: {exc}"
        self._ctl_died(reason)

    def _handle_ctl(self, messages) -> None:
        for code, payload in messages:
            if code in (AgentCode.ACK, AgentCode.ERROR):
                if not self._replies:
                    self.log.warning("agent reply {} with nobody waiting for it: {!r}", code, payload[:200])
                    continue
                reply = self._replies.popleft()
                if code == AgentCode.ACK:
                    reply.set(payload)
                else:
                    text = payload.decode("utf-8", "replace")
                    reply.set_exception(AgentError(f"ERROR received from VM agent, control msg received : {text}"))
            elif code == AgentCode.NEXT:
                continue
            elif code == AgentCode.PROCESSASYNCEVENT:
                self.log.info("agent event: {}", payload.decode("utf-8", "replace"))
            else:
                self.log.warning("unexpected agent ctl message {}: {!r}", code, payload[:200])

    def _ctl_died(self, reason: str) -> None:
        if self._ctl_dead:
            return
        self._ctl_dead = reason
        if not self.closed:
            self.log.warning("{}", reason)
        while self._replies:
            self._replies.popleft().set_exception(AgentError(reason))

    # -- io --------------------------------------------------------------------

    def send_io(self, data: bytes) -> None:
        """Write already-encoded io messages; a failed write means the VM is gone."""
        with self._io_lock:
            try:
                send_all(self.io, data)
            except OSError as exc:
                self._lost(f"writing to the agent io channel failed: {exc}")
                raise ProxyError("the VM is gone") from None

    def _read_io(self) -> None:
        decoder = agent_codec.IoDecoder(RECEIVE_LIMIT)
        buffer = bytearray(READ_SIZE)
        view = memoryview(buffer)
        reason = "the agent closed the io channel"
        try:
            while True:
                count = self.io.recv_into(buffer)
                if not count:
                    break
                messages = decoder.feed(view[:count])
                if messages:
                    self.on_io(messages)
        except PeerProtocolError as exc:
            reason = f"the agent broke the io framing: {exc}"
        except OSError as exc:
            if exc.errno not in (errno.EBADF,):
                reason = f"reading the agent io channel failed: {exc}"
        self._lost(reason)

    def _lost(self, reason: str) -> None:
        if not self.closed:
            gevent.spawn(self.on_lost, reason)  # on_lost closes us; never kill our own greenlet group from inside

    # -- console ---------------------------------------------------------------

    def _read_console(self) -> None:
        pending = b""
        try:
            while True:
                data = self.console.recv(READ_SIZE)
                if not data:
                    break
                lines = (pending + data).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    self.log.bind(source="console").debug("{}", line.decode("utf-8", "replace").rstrip("\r"))
        except OSError:
            pass
        if pending:
            self.log.bind(source="console").debug("{}", pending.decode("utf-8", "replace"))

    # -- tear-down -------------------------------------------------------------

    def close(self) -> None:
        """Close every channel, fail waiting requesters, stop the readers."""
        if self.closed:
            return
        self.closed = True
        for sock in (self.console, self.ctl, self.io):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._ctl_died("the VM is gone")
        self._greenlets.kill(block=True, timeout=2)
        for sock in (self.console, self.ctl, self.io):
            if sock is not None:
                sock.close()
