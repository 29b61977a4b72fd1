"""End to end with the systemd interfaces: socket activation, sd_notify, operator signals.

Socket activation runs under the real ``systemd-socket-activate``: it binds
the listening socket, waits for the first connection, then execs cc-proxy in
the same process with ``LISTEN_PID``/``LISTEN_FDS`` set. sd_notify is checked
against a datagram socket of our own, as systemd's manager would receive it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import time

import pytest
from fake_agent import running_agent
from helpers_e2e import clean_env, proxy_process, requires_cc_proxy, system_args

from cc_proxy.client import Client, ResponseError

pytestmark = [pytest.mark.timeout(60), requires_cc_proxy]

SOCKET_ACTIVATE = "/usr/bin/systemd-socket-activate"
requires_socket_activate = pytest.mark.skipif(
    not os.access(SOCKET_ACTIVATE, os.X_OK) and shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate is not installed (Debian/Ubuntu package: systemd)",
)


def socket_activate() -> str:
    return SOCKET_ACTIVATE if os.access(SOCKET_ACTIVATE, os.X_OK) else shutil.which("systemd-socket-activate")


# -- socket activation ---------------------------------------------------------------------------------------


@requires_socket_activate
def test_socket_activation_serves_and_keeps_the_socket_file(workdir):
    sock = f"{workdir}/proxy.sock"
    wrapper = [socket_activate(), "-l", sock]
    with running_agent() as agent, \
            proxy_process(system_args(sock, "--log", "info"), f"{workdir}/stderr", wrapper=wrapper) as proxy:
        # systemd-socket-activate accepts nothing itself: the first connection waits in the backlog
        # until cc-proxy, exec'd in the same process, takes the listener over and serves it.
        with proxy.dial(sock, timeout=10) as runtime:
            with pytest.raises(ResponseError, match="^unknown containerID: x$"):
                runtime.attach_vm("x")
            io = runtime.register_vm("vm1", agent.ctl_path, agent.io_path, num_io_streams=1)
            assert io.url == f"unix://{sock}" and len(io.tokens) == 1
        log = proxy.wait_log("listening on the socket handed over by systemd")
        assert f"listening on {sock}" not in log, proxy.describe()

        with proxy.dial(sock, attempts=1) as other:  # the same listener keeps serving
            other.attach_vm("vm1")

        assert proxy.stop() == 0, proxy.describe()
        assert "Traceback" not in proxy.log(), proxy.describe()
    # We never unlink a socket we did not bind: the file systemd created is still there.
    assert stat.S_ISSOCK(os.lstat(sock).st_mode)


@requires_socket_activate
def test_socket_activation_with_two_sockets_refuses_to_start(workdir):
    first, second = f"{workdir}/a.sock", f"{workdir}/b.sock"
    wrapper = [socket_activate(), "-l", first, "-l", second]
    with proxy_process(system_args(first), f"{workdir}/stderr", wrapper=wrapper) as proxy:
        # The wrapper execs cc-proxy on the first connection attempt.
        client = proxy.dial(first, timeout=10)
        with client:
            code = proxy.wait()
            assert code != 0, proxy.describe()
            assert "too many activated sockets (2)" in proxy.log(), proxy.describe()
            try:
                assert client.read_frame(timeout=5) is None
            except ConnectionError:
                pass  # reset by the kernel when the listener closed with us in its backlog


# -- sd_notify -----------------------------------------------------------------------------------------------


class NotifyListener:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.messages: list[str] = []

    def receive(self, timeout: float) -> str:
        self.sock.settimeout(timeout)
        message = self.sock.recv(4096).decode()
        self.messages.append(message)
        return message

    def wait_for(self, predicate, timeout: float = 5.0) -> str:
        """The first message (from now on) matching ``predicate``; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching sd_notify message in {timeout}s; got {self.messages!r}")
            try:
                message = self.receive(remaining)
            except TimeoutError:
                continue
            if predicate(message):
                return message

    def close(self) -> None:
        self.sock.close()


def fields(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.splitlines() if "=" in line)


def test_sd_notify_ready_watchdog_status_stopping(workdir):
    sock = f"{workdir}/proxy.sock"
    notify = NotifyListener(f"{workdir}/notify.sock")
    env = clean_env(NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="200000")
    try:
        with running_agent() as agent, proxy_process(system_args(sock), f"{workdir}/stderr", env=env) as proxy:
            ready = notify.wait_for(lambda m: "READY=1" in fields(m) or fields(m).get("READY") == "1", 10)
            assert fields(ready)["READY"] == "1"
            assert "VM" in fields(ready).get("STATUS", ""), ready
            # READY means accepting: a single dial must succeed now.
            with Client(sock, timeout=5) as runtime:
                with pytest.raises(ResponseError, match="unknown containerID"):
                    runtime.attach_vm("x")

                # Half of WATCHDOG_USEC: a ping every 100 ms.
                for _ in range(3):
                    notify.wait_for(lambda m: fields(m).get("WATCHDOG") == "1", 2)

                # STATUS follows the VMs and the shims.
                info = runtime.register_vm("vm1", agent.ctl_path, agent.io_path, num_io_streams=1)
                notify.wait_for(lambda m: fields(m).get("STATUS", "").startswith("1 VM(s), 0 shim(s)"), 5)
                with Client(sock, timeout=5) as shim:
                    shim.connect_shim(info.tokens[0])
                    notify.wait_for(lambda m: fields(m).get("STATUS", "").startswith("1 VM(s), 1 shim(s)"), 5)

            proxy.send_signal(signal.SIGTERM)
            notify.wait_for(lambda m: fields(m).get("STOPPING") == "1", 5)
            assert proxy.wait() == 0, proxy.describe()
        assert not os.path.exists(sock)
    finally:
        notify.close()


def test_without_notify_socket_nothing_breaks(workdir):
    sock = f"{workdir}/proxy.sock"
    env = clean_env(WATCHDOG_USEC="200000")  # a watchdog but nowhere to report: must not matter
    with proxy_process(system_args(sock), f"{workdir}/stderr", env=env) as proxy:
        for _ in range(3):
            with proxy.dial(sock) as c, pytest.raises(ResponseError, match="unknown containerID"):
                c.attach_vm("x")
        assert proxy.proc.poll() is None, proxy.describe()
        assert proxy.stop() == 0, proxy.describe()
        assert "Traceback" not in proxy.log(), proxy.describe()


# sd_notify is best effort: a NOTIFY_SOCKET that vanishes must cost nothing (regression tests: an OSError
# from notify() used to kill the watchdog, abort the stop with exit 1 and fail RegisterVM after its commit).


@pytest.fixture
def vanished_notify_socket(workdir):
    """A NOTIFY_SOCKET that worked for READY=1 and then disappeared (the manager re-executing, say)."""
    notify = NotifyListener(f"{workdir}/notify.sock")
    try:
        yield notify
    finally:
        notify.close()


def test_notify_socket_gone_stop_is_still_clean(workdir, vanished_notify_socket):
    notify = vanished_notify_socket
    sock = f"{workdir}/proxy.sock"
    env = clean_env(NOTIFY_SOCKET=notify.path)
    with proxy_process(system_args(sock), f"{workdir}/stderr", env=env) as proxy:
        notify.wait_for(lambda m: fields(m).get("READY") == "1", 10)
        notify.close()
        os.unlink(notify.path)
        with proxy.dial(sock, attempts=1) as c, pytest.raises(ResponseError, match="unknown containerID"):
            c.attach_vm("x")
        assert proxy.stop() == 0, proxy.describe()
    assert not os.path.exists(sock), "the stop was cut short: the socket file we bound is left behind"


def test_notify_socket_gone_register_vm_still_works(workdir, vanished_notify_socket):
    notify = vanished_notify_socket
    sock = f"{workdir}/proxy.sock"
    env = clean_env(NOTIFY_SOCKET=notify.path)
    with running_agent() as agent, proxy_process(system_args(sock), f"{workdir}/stderr", env=env) as proxy:
        notify.wait_for(lambda m: fields(m).get("READY") == "1", 10)
        notify.close()
        os.unlink(notify.path)
        with proxy.dial(sock, attempts=1) as runtime:
            io = runtime.register_vm("vm1", agent.ctl_path, agent.io_path, num_io_streams=1)
            assert len(io.tokens) == 1, proxy.describe()


def test_notify_socket_gone_watchdog_survives(workdir, vanished_notify_socket):
    notify = vanished_notify_socket
    sock = f"{workdir}/proxy.sock"
    env = clean_env(NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="200000")
    with proxy_process(system_args(sock), f"{workdir}/stderr", env=env) as proxy:
        notify.wait_for(lambda m: fields(m).get("READY") == "1", 10)
        notify.wait_for(lambda m: fields(m).get("WATCHDOG") == "1", 2)
        notify.close()
        os.unlink(notify.path)
        # Let several 100 ms watchdog periods pass with nowhere to send the ping; the proxy keeps serving.
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            with proxy.dial(sock, attempts=1) as c, pytest.raises(ResponseError, match="unknown containerID"):
                c.attach_vm("x")
        # The watchdog greenlet must still be alive: a new manager socket gets pings again.
        notify.__init__(notify.path)
        notify.wait_for(lambda m: fields(m).get("WATCHDOG") == "1", 2)
        assert "Traceback" not in proxy.log(), proxy.describe()


# -- operator signals ----------------------------------------------------------------------------------------


def test_sigusr1_dumps_state_and_keeps_running(workdir):
    sock = f"{workdir}/proxy.sock"
    with running_agent() as agent, proxy_process(system_args(sock), f"{workdir}/stderr") as proxy:
        with proxy.dial(sock) as runtime:
            (token,) = runtime.register_vm("vm1", agent.ctl_path, agent.io_path, num_io_streams=1).tokens
            with Client(sock, timeout=5) as shim:
                shim.connect_shim(token)
                proxy.send_signal(signal.SIGUSR1)
                log = proxy.wait_log("live greenlets")
                dump = log[log.index("state dump"):]
                assert "Sessions:" in dump and "VMs:" in dump and "Greenlets:" in dump, proxy.describe()
                assert "vm1" in dump and token[:8] in dump, proxy.describe()
                assert token not in dump, "a whole token was logged"

                # Still serving, still the same process.
                assert proxy.proc.poll() is None
                runtime.attach_vm("vm1")
        assert proxy.stop() == 0, proxy.describe()


def test_sighup_reloads_the_log_level(workdir):
    sock = f"{workdir}/proxy.sock"
    conf = f"{workdir}/cc-proxy.toml"
    with open(conf, "w") as f:
        f.write('log_level = "warn"\nready_timeout = 30\n')
    with proxy_process(system_args(sock, "--config", conf), f"{workdir}/stderr") as proxy:
        with proxy.dial(sock) as c, pytest.raises(ResponseError, match="unknown containerID"):
            c.attach_vm("x")
        assert "DEBUG" not in proxy.log(), proxy.describe()

        with open(conf, "w") as f:
            f.write('log_level = "debug"\nready_timeout = 5\n')
        before = len(proxy.log())
        proxy.send_signal(signal.SIGHUP)
        log = proxy.wait_log("SIGHUP: log level is now DEBUG", start=before)
        line = next(x for x in log[before:].splitlines() if "SIGHUP" in x)
        assert "ready_timeout" in line and "need a restart" in line, proxy.describe()

        after = len(proxy.log())
        with proxy.dial(sock) as c, pytest.raises(ResponseError, match="unknown containerID"):
            c.attach_vm("x")
        proxy.wait_log("DEBUG client connected", start=after)
        assert proxy.proc.poll() is None
        assert proxy.stop() == 0, proxy.describe()


def test_sighup_with_a_broken_conf_keeps_running(workdir):
    sock = f"{workdir}/proxy.sock"
    conf = f"{workdir}/cc-proxy.toml"
    with open(conf, "w") as f:
        f.write('log_level = "warn"\n')
    with proxy_process(system_args(sock, "--config", conf), f"{workdir}/stderr") as proxy:
        proxy.wait_ready(sock)
        with open(conf, "w") as f:
            f.write('log_level = "deafening"\n')
        proxy.send_signal(signal.SIGHUP)
        proxy.wait_log("configuration not reloaded")
        with proxy.dial(sock, attempts=1) as c, pytest.raises(ResponseError, match="unknown containerID"):
            c.attach_vm("x")
        assert proxy.stop() == 0, proxy.describe()
