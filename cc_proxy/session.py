"""An I/O session: one token, one process, two sequence numbers.

Lifecycle of its token (the router changes it, nobody else)::

    allocated --ConnectShim--> claimed --connection drops--> allocated
        |                         |
        +------ DisconnectShim or VM lost ------> freed (for good)

The session outlives its shim connections: output that arrives while no shim
is connected waits in ``outbox`` (bounded) and is delivered in order when a
shim claims the token again. The shim connection's writer greenlet drains the
outbox; frames leave it only once the kernel has taken them, so a dropped
connection loses nothing that a reconnecting shim would miss.
"""

from __future__ import annotations

from collections import deque

import gevent
from gevent.event import Event

from cc_proxy import frames, logsetup
from cc_proxy.errors import ProxyError

_STDOUT = (frames.FrameType.STREAM, frames.Stream.STDOUT)
_STDERR = (frames.FrameType.STREAM, frames.Stream.STDERR)


def wait_event(event: Event, lost: Event, timeout: float, timeout_text: str) -> None:
    """Wait for ``event``; fail with the wire text on timeout, at once when ``lost`` is set."""
    if event.is_set():
        return
    gevent.wait([event, lost], timeout=timeout, count=1)
    if event.is_set():
        return
    if lost.is_set():
        raise ProxyError("the VM is gone")
    raise ProxyError(timeout_text)


class Session:
    """State of one process's I/O; plain object, mutated from greenlets of one thread."""

    def __init__(self, token: str | None, base: int, buffer_limit: int, vm_lost: Event):
        self.token = token  # None for the VM's null session
        self.base = base  # stdin/stdout sequence number; base + 1 is stderr
        self.container_id = ""  # set by newcontainer; "" for execcmd processes
        self.vm = None  # the VM that allocated it (None for a VM's null session)
        self.shim = None  # the Connection of the shim holding the token
        self.freed = False
        self.shim_connected = Event()
        self.process_started = Event()
        self.terminated = False  # the agent sent EOF for this process
        self.vm_lost = vm_lost
        self.buffer_limit = buffer_limit
        self.outbox: deque[bytes] = deque()  # encoded frames not yet taken by the kernel
        self.outbox_bytes = 0
        self.drained = Event()  # set whenever outbox is under its limit
        self.drained.set()
        self.dropped_bytes = 0
        self.bytes_in = 0  # stdin from the shim
        self.bytes_out = 0  # stdout/stderr to the shim
        if token is None:
            self.shim_connected.set()  # nobody will ever claim the null session

    # -- waits ---------------------------------------------------------------

    def wait_shim(self, timeout: float) -> None:
        wait_event(self.shim_connected, self.vm_lost, timeout, f"timeout waiting for shim with token {self.token}")

    def wait_process(self, timeout: float) -> None:
        wait_event(self.process_started, self.vm_lost, timeout, f"timeout waiting for process with token {self.token}")

    # -- output towards the shim -------------------------------------------

    def output(self, seq: int, payload: bytes, logger) -> None:
        """Route one agent io message for this session (called by the io reader)."""
        if not payload:
            if seq == self.base:
                self.terminated = True  # EOF of the process; its exit code comes next
            return
        if self.terminated and len(payload) == 1 and seq == self.base:
            self.push(frames.encode(frames.FrameType.NOTIFICATION, frames.Notification.PROCESS_EXITED, payload), logger)
            return
        ftype, opcode = _STDOUT if seq == self.base else _STDERR
        self.bytes_out += len(payload)
        self.push(frames.encode(ftype, opcode, payload), logger)

    def notify_exit(self, code: int, logger) -> None:
        self.push(frames.encode(frames.FrameType.NOTIFICATION, frames.Notification.PROCESS_EXITED, bytes([code])), logger)

    def push(self, frame: bytes, logger) -> None:
        """Queue a frame for the shim, bounded by ``buffer_limit``.

        With a shim connected, a full outbox makes the caller (the VM's io
        reader) wait for the shim to drain it: the agent is slowed, nothing is
        lost. With no shim to drain it, the oldest output is dropped and logged.
        """
        if self.outbox and self.outbox_bytes + len(frame) > self.buffer_limit:
            while self.shim is not None and not self.vm_lost.is_set() and self.outbox \
                    and self.outbox_bytes + len(frame) > self.buffer_limit:
                self.drained.clear()
                gevent.wait([self.drained, self.vm_lost], count=1)
            if self.shim is None:  # no writer holds frames of the outbox: safe to drop the oldest
                dropped = 0
                while self.outbox and self.outbox_bytes + len(frame) > self.buffer_limit:
                    old = self.outbox.popleft()
                    self.outbox_bytes -= len(old)
                    dropped += len(old)
                if dropped:
                    self.dropped_bytes += dropped
                    logger.warning("no shim is reading token {}: dropped {} bytes of old output",
                                   logsetup.token_prefix(self.token), dropped)
        self.outbox.append(frame)
        self.outbox_bytes += len(frame)
        if self.shim is not None:
            self.shim.wake()

    def attach_shim(self, shim) -> None:
        self.shim = shim
        self.shim_connected.set()

    def detach_shim(self) -> None:
        """The shim's connection is gone: a reader waiting for it to drain must not wait forever."""
        self.shim = None
        self.shim_connected.clear()
        self.drained.set()

    def take_output(self, max_bytes: int = 256 * 1024) -> tuple[int, bytes]:
        """The oldest frames, about ``max_bytes`` of them, as (frame count, bytes).

        ``sent()`` removes them once written. The cap keeps a large backlog from
        being copied whole on every wake-up.
        """
        frames = []
        size = 0
        for frame in self.outbox:
            frames.append(frame)
            size += len(frame)
            if size >= max_bytes:
                break
        return len(frames), b"".join(frames)

    def sent(self, count: int, nbytes: int) -> None:
        """``count`` whole frames (``nbytes`` in all) reached the kernel."""
        for _ in range(count):
            self.outbox.popleft()
        self.outbox_bytes -= nbytes
        if self.outbox_bytes <= self.buffer_limit // 2:  # hysteresis: wake the reader once there is room
            self.drained.set()

    def partially_sent(self, sent: int) -> None:
        """A write failed after ``sent`` bytes: drop the frames that went out whole."""
        count = nbytes = 0
        for frame in self.outbox:
            if nbytes + len(frame) > sent:
                break
            count += 1
            nbytes += len(frame)
        self.sent(count, nbytes)

    def statistics(self) -> dict:
        return {
            "token": logsetup.token_prefix(self.token),
            "seq": f"{self.base},{self.base + 1}",
            "container": self.container_id,
            "shim": self.shim is not None,
            "started": self.process_started.is_set(),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "pending": self.outbox_bytes,
        }
