"""Small helpers for the runtime, frame and VM-loss scenario tests.

Waits are bounded (a deadline, then an AssertionError saying what was awaited)
and yield to the hub with ``gevent.sleep(0)``: they never sleep a fixed time.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable

import gevent
import greenlet
import pytest

from cc_proxy import frames
from cc_proxy.client import Client, ResponseError

# Generous bounds: they only matter when a test is about to fail.
WAIT = 5.0


def expect_error(func: Callable, *args, **kwargs) -> str:
    """Call ``func`` and return the text of the error response it must get."""
    with pytest.raises(ResponseError) as info:
        func(*args, **kwargs)
    return info.value.message


def assert_dropped(client: Client, timeout: float = WAIT) -> list[frames.Frame]:
    """The proxy closes ``client``'s connection: EOF (or a reset) within ``timeout``.

    Returns the frames read before the end (a dropped client is owed none in these tests).
    """
    seen = []
    try:
        while True:
            frame = client.read_frame(timeout)
            if frame is None:
                return seen
            seen.append(frame)
    except ConnectionResetError:
        return seen  # AF_UNIX: closing with unread bytes resets the peer


def assert_serving(client: Client, probe: str = "no-such-vm") -> None:
    """``client``'s connection is alive and the proxy answers it."""
    assert expect_error(client.attach_vm, probe) == f"unknown containerID: {probe}"


def wait_until(predicate: Callable[[], object], timeout: float = WAIT, what: str = "a condition"):
    """Yield to the hub until ``predicate()`` is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        gevent.sleep(0)


def registry(server) -> dict:
    """A consistent snapshot of the proxy's registry, plus the ids being registered."""
    stats = server.router.call(server.router.statistics)
    stats["reserved"] = sorted(server.router.reserved)
    return stats


def raw_header(version: int = frames.VERSION, words: int = 3, ftype: int = frames.FrameType.COMMAND,
               opcode: int = 0, length: int = 0, flags: int = 0) -> bytes:
    """A frame header with any field, valid or not, plus zero padding for ``words`` > 3."""
    header = frames.HEADER.pack(version, words, 0, 0, (flags << 4) | ftype, opcode, length)
    return header + b"\0" * 4 * max(0, words - 3)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def live_greenlets() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, greenlet.greenlet) and not obj.dead)
