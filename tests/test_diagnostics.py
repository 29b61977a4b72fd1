import gevent
import gevent.event
import gevent.monkey
import pytest

from cc_proxy.diagnostics import format_table, greenlet_stacks

pytestmark = pytest.mark.timeout(60)


def parked_in_a_named_function(event):
    event.wait()


def test_greenlet_stacks_shows_a_waiting_greenlet():
    event = gevent.event.Event()
    glet = gevent.spawn(parked_in_a_named_function, event)
    glet.name = "parked-one"
    gevent.sleep(0)  # let it start and block
    try:
        text = greenlet_stacks()
    finally:
        event.set()
        glet.join(timeout=5)
    assert "live greenlets" in text
    assert "'parked-one'" in text
    assert "in parked_in_a_named_function" in text
    # The caller shows up through its thread's frames.
    assert "threads ===" in text
    assert "in test_greenlet_stacks_shows_a_waiting_greenlet" in text


def test_greenlet_stacks_lists_not_started_greenlet():
    glet = gevent.Greenlet(parked_in_a_named_function, gevent.event.Event())
    try:
        assert "(not started)" in greenlet_stacks()
    finally:
        glet.kill()


def test_greenlet_stacks_shows_native_threads():
    # A real OS thread (threading is monkey-patched, so use the raw primitives).
    start_new_thread = gevent.monkey.get_original("_thread", "start_new_thread")
    allocate_lock = gevent.monkey.get_original("_thread", "allocate_lock")
    started, release, finished = allocate_lock(), allocate_lock(), allocate_lock()
    for lock in (started, release, finished):
        lock.acquire()

    def native_worker():
        started.release()
        release.acquire(timeout=10)
        finished.release()

    start_new_thread(native_worker, ())
    try:
        assert started.acquire(timeout=5)
        text = greenlet_stacks()
    finally:
        release.release()
        finished.acquire(timeout=5)
    assert "in native_worker" in text


def test_format_table():
    rows = [
        {"vm": "abc", "sessions": 2, "token": "x" * 12},
        {"vm": "a-much-longer-id", "sessions": 10},
    ]
    text = format_table(rows, ["vm", "sessions", "token"])
    assert text.splitlines() == [
        "vm                sessions  token",
        "----------------  --------  ------------",
        "abc               2         xxxxxxxxxxxx",
        "a-much-longer-id  10        -",
    ]


def test_format_table_empty():
    assert format_table([], ["vm", "token"]).splitlines() == ["vm  token", "--  -----"]
