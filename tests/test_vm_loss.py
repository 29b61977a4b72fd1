"""Losing a VM's io channel (SPEC.md section 5), and nothing left behind after a scenario.

Losing io means the VM is gone: its agent sockets and every shim connection
are closed, its tokens are freed, waiting commands fail at once, and every
other VM carries on. The leak tests run whole scenarios and then count open
file descriptors and live greenlets against a baseline.
"""

import contextlib
import time

import gevent
import gevent.event
import pytest
from conftest import running_proxy
from fake_agent import running_agent
from helpers_runtime import (
    assert_dropped,
    assert_serving,
    expect_error,
    live_greenlets,
    open_fds,
    registry,
    wait_until,
)

from cc_proxy import logsetup
from cc_proxy.client import Client, ResponseError

pytestmark = pytest.mark.timeout(30)

PROCESS = {"args": ["sh"], "terminal": False}
# Far beyond every client timeout: a wait that ends must have been woken, not timed out.
LONG = 60


@contextlib.contextmanager
def clients(server, count, timeout=5.0):
    opened = [Client(server.config.socket_path, timeout=timeout) for _ in range(count)]
    try:
        yield opened
    finally:
        for client in opened:
            client.close()


def wait_vm_forgotten(server, container_id):
    wait_until(lambda: container_id not in registry(server)["registered"]
               and all(vm["vm"] != container_id for vm in registry(server)["vms"]),
               what=f"the proxy to forget {container_id}")


def test_io_loss_tears_down_the_vm_and_spares_the_others():
    with running_proxy(shim_timeout=LONG, process_timeout=LONG) as server, \
            running_agent() as agent, running_agent() as agent2, \
            clients(server, 8) as (runtime, shim1, shim2, waiter, runtime2, shim3, late, prober):
        tokens = runtime.register_vm("pod1", agent.ctl_path, agent.io_path, num_io_streams=3).tokens
        shim1.connect_shim(tokens[0])
        shim2.connect_shim(tokens[1])
        runtime.hyper("newcontainer", {"id": "c1", "process": PROCESS}, tokens=[tokens[0]])
        agent.send_io(3, b"before")
        assert shim1.read_event() == ("stdout", b"before")

        # A Hyper held until a shim claims tokens[2], which never happens.
        waiter.attach_vm("pod1")
        waiting = gevent.spawn(expect_error, waiter.hyper, "execcmd", {"process": PROCESS}, tokens=[tokens[2]])

        token2 = runtime2.register_vm("pod2", agent2.ctl_path, agent2.io_path, num_io_streams=1).tokens[0]
        shim3.connect_shim(token2)
        runtime2.hyper("newcontainer", {"id": "c2", "process": PROCESS}, tokens=[token2])
        gevent.idle()
        assert not waiting.ready()

        started = time.monotonic()
        agent.close_io()

        # Every shim of pod1 is cut off.
        assert assert_dropped(shim1) == []
        assert assert_dropped(shim2) == []
        # The Hyper waiting for a shim fails at once, far before shim_timeout.
        assert waiting.get(timeout=3)
        assert time.monotonic() - started < 3
        assert "execcmd" not in agent.command_names()
        # The agent's ctl channel is closed too.
        agent.wait_ctl_closed()

        wait_vm_forgotten(server, "pod1")
        for token in tokens:
            assert expect_error(late.connect_shim, token) == f"unknown token: {token}"
        assert expect_error(prober.attach_vm, "pod1") == "unknown containerID: pod1"
        assert all(session["vm"] == "pod2" for session in registry(server)["sessions"])
        assert registry(server)["tokens"] == 1
        # The runtime still attached to the lost VM gets an error, not a hang.
        assert expect_error(runtime.hyper, "ping")

        # pod2 carries on: commands, output, its shim.
        assert runtime2.hyper("ping") == b""
        agent2.send_io(3, b"pod2 lives")
        assert shim3.read_event() == ("stdout", b"pod2 lives")
        assert_serving(prober)

        # The same id registers again with a new agent, and works end to end.
        with running_agent() as agent3, clients(server, 2) as (runtime3, shim4):
            new = runtime3.register_vm("pod1", agent3.ctl_path, agent3.io_path, num_io_streams=1).tokens
            assert not set(new) & set(tokens)
            shim4.connect_shim(new[0])
            runtime3.hyper("newcontainer", {"id": "c1", "process": PROCESS}, tokens=new)
            assert agent3.wait_command("newcontainer").json["process"]["stdio"] == 3
            agent3.send_io(3, b"again")
            agent3.exit_process(3, 7)
            assert shim4.read_output_until_exit() == (b"again", b"", 7)


def test_io_loss_fails_a_hyper_waiting_for_its_reply():
    with running_proxy() as server, running_agent() as agent, clients(server, 1) as (runtime,):
        runtime.register_vm("pod1", agent.ctl_path, agent.io_path)
        agent.reply_with("pscontainer", ack=None, error=None)  # a hung agent
        job = gevent.spawn(expect_error, runtime.hyper, "pscontainer", {"container": "c1"})
        agent.wait_command("pscontainer")
        agent.close_io()
        assert job.get(timeout=3)
        wait_vm_forgotten(server, "pod1")


def test_io_loss_with_a_shim_waiting_for_its_process():
    """A shim's stdin waits for the process to start; losing the VM ends that wait and the shim."""
    with running_proxy(process_timeout=LONG) as server, running_agent() as agent, \
            clients(server, 2) as (runtime, shim):
        token = runtime.register_vm("pod1", agent.ctl_path, agent.io_path, num_io_streams=1).tokens[0]
        shim.connect_shim(token)
        shim.send_stdin(b"typed early")
        gevent.idle()
        agent.close_io()
        assert_dropped(shim)
        wait_vm_forgotten(server, "pod1")
        assert registry(server)["tokens"] == 0


def test_io_loss_of_an_unregistered_vm():
    with running_proxy() as server, running_agent() as agent, clients(server, 2) as (runtime, shim):
        token = runtime.register_vm("pod1", agent.ctl_path, agent.io_path, num_io_streams=1).tokens[0]
        shim.connect_shim(token)
        runtime.unregister_vm("pod1")
        assert registry(server)["registered"] == []
        agent.close_io()
        assert_dropped(shim)
        wait_until(lambda: registry(server)["vms"] == [] and registry(server)["tokens"] == 0,
                   what="the unregistered VM to be torn down")


def test_loss_of_an_old_vm_spares_a_new_one_with_the_same_id():
    """UnregisterVM, RegisterVM of the same id, then the old VM's io dies: only the old one goes."""
    with running_proxy() as server, running_agent() as old, running_agent() as new, \
            clients(server, 4) as (runtime, old_shim, runtime2, new_shim):
        old_token = runtime.register_vm("pod1", old.ctl_path, old.io_path, num_io_streams=1).tokens[0]
        old_shim.connect_shim(old_token)
        runtime.unregister_vm("pod1")
        new_token = runtime2.register_vm("pod1", new.ctl_path, new.io_path, num_io_streams=1).tokens[0]
        new_shim.connect_shim(new_token)
        old.close_io()
        assert_dropped(old_shim)
        wait_until(lambda: len(registry(server)["vms"]) == 1, what="the old VM to be torn down")
        assert registry(server)["registered"] == ["pod1"]
        assert [s["token"] for s in registry(server)["sessions"]] == [new_token[:8]]
        assert runtime2.hyper("ping") == b""
        runtime2.hyper("newcontainer", {"id": "c1", "process": PROCESS}, tokens=[new_token])
        new.send_io(3, b"new pod1")
        assert new_shim.read_event() == ("stdout", b"new pod1")


def test_ctl_loss_alone_keeps_the_vm_registered_but_fails_commands():
    with running_proxy() as server, running_agent() as agent, clients(server, 2) as (runtime, shim):
        token = runtime.register_vm("pod1", agent.ctl_path, agent.io_path, num_io_streams=1).tokens[0]
        shim.connect_shim(token)
        runtime.hyper("newcontainer", {"id": "c1", "process": PROCESS}, tokens=[token])
        agent.close_ctl()
        wait_until(lambda: _fails(runtime), what="commands to fail after ctl loss")
        # Output still flows on io.
        agent.send_io(3, b"io still up")
        assert shim.read_event() == ("stdout", b"io still up")


def _fails(client) -> bool:
    try:
        client.hyper("ping")
    except ResponseError:
        return True
    return False


def test_io_loss_closes_the_console_too(monkeypatch):
    monkeypatch.setattr(logsetup, "is_debug", lambda: True)  # the console is only dialed at debug level
    with running_proxy() as server, running_agent(console=True) as agent, clients(server, 1) as (runtime,):
        runtime.register_vm("pod1", agent.ctl_path, agent.io_path, agent.console_path)
        agent.wait_connected("console")
        agent.send_console(b"kernel: hello\n")
        agent.close_io()
        agent.wait_ctl_closed()
        assert agent.console_conn.closed.wait(5), "the proxy kept the console socket of a lost VM"
        wait_vm_forgotten(server, "pod1")


def _outcome(func, *args, **kwargs):
    """func's result or the exception it raised, so a spawned greenlet never dies noisily."""
    try:
        return func(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the caller inspects it
        return exc


# -- nothing left behind ---------------------------------------------------------------------------------


def full_scenario(lose_vm: bool) -> None:
    """Register, shims, a process with output and exit, a dropped client, VM loss or unregister; stop."""
    with running_proxy() as server, running_agent() as agent, running_agent() as agent2, \
            running_agent() as hung_agent, clients(server, 1) as (hung_runtime,):
        # A third VM whose agent never answers: a Hyper is still waiting when the proxy stops.
        hung_runtime.register_vm("hung", hung_agent.ctl_path, hung_agent.io_path)
        hung_agent.reply_with("pscontainer", ack=None, error=None)
        hung = gevent.spawn(_outcome, hung_runtime.hyper, "pscontainer", {"container": "c"})
        hung_agent.wait_command("pscontainer")
        with clients(server, 7) as (runtime, shim, runtime2, shim2, bad, waiter, shim3):
            tokens = runtime.register_vm("pod1", agent.ctl_path, agent.io_path, num_io_streams=3).tokens
            shim.connect_shim(tokens[0], wait=False)
            shim.send_stdin(b"input")
            runtime.hyper("newcontainer", {"id": "c1", "process": PROCESS}, tokens=[tokens[0]])
            agent.wait_stdin(3, 5)
            agent.send_io(3, b"out")
            agent.send_io(4, b"err")
            agent.exit_process(3, 3)
            assert shim.read_output_until_exit() == (b"out", b"err", 3)
            shim.disconnect_shim(wait=True)

            token2 = runtime2.register_vm("pod2", agent2.ctl_path, agent2.io_path, num_io_streams=1).tokens[0]
            shim2.connect_shim(token2)
            runtime2.hyper("execcmd", {"container": "c2", "process": PROCESS}, tokens=[token2])
            bad.send_raw(b"\xff" * 12)
            assert_dropped(bad)

            waiter.attach_vm("pod1")
            if lose_vm:
                waiting = gevent.spawn(expect_error, waiter.hyper, "execcmd", {"process": PROCESS},
                                       tokens=[tokens[1]])
                gevent.idle()
                agent.close_io()
                assert waiting.get(timeout=3)
                wait_vm_forgotten(server, "pod1")
            else:
                waiting = gevent.spawn(waiter.hyper, "execcmd", {"process": PROCESS}, tokens=[tokens[1]])
                gevent.idle()
                shim3.connect_shim(tokens[1])
                assert waiting.get(timeout=3) == b""
                runtime.unregister_vm("pod1")
            # pod2 stays registered with a shim connected (and pod1's VM object may still be alive):
            # stopping the proxy must clean them up.
            assert runtime2.hyper("ping") == b""
        assert not hung.ready()
        server.request_stop()
        server.stop()  # running_proxy stops it again: stop() must be idempotent
        # The hung command ends with an error response (or the connection closing), not a hang.
        assert isinstance(hung.get(timeout=5), (ResponseError, ConnectionError))


def settle(baseline_fds: int, baseline_greenlets: int) -> None:
    wait_until(lambda: open_fds() <= baseline_fds, what=f"fds back to {baseline_fds} (now {open_fds()})")
    wait_until(lambda: live_greenlets() <= baseline_greenlets,
               what=f"greenlets back to {baseline_greenlets} (now {live_greenlets()})")


@pytest.mark.parametrize("lose_vm", [True, False], ids=["vm-lost", "unregistered"])
def test_nothing_left_behind(lose_vm):
    full_scenario(lose_vm)  # warm-up: lazy one-time allocations (hub threads, resolver, imports)
    gevent.idle()
    fds, greenlets = open_fds(), live_greenlets()
    for _ in range(2):
        full_scenario(lose_vm)
    settle(fds, greenlets)
    assert open_fds() <= fds
    assert live_greenlets() <= greenlets


def test_nothing_left_behind_after_failed_registrations():
    def scenario():
        with running_proxy(ready_timeout=0.2) as server, running_agent(send_ready=False) as silent, \
                clients(server, 1) as (runtime,):
            expect_error(runtime.register_vm, "pod1", silent.ctl_path, silent.io_path, num_io_streams=2)
            expect_error(runtime.register_vm, "pod1", silent.ctl_path + ".none", silent.io_path)
            silent.wait_ctl_closed()

    scenario()
    gevent.idle()
    fds, greenlets = open_fds(), live_greenlets()
    scenario()
    settle(fds, greenlets)
