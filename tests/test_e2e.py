"""End to end: the installed ``cc-proxy`` command as a subprocess, driven like production.

The proxy runs in its own process; the fake hyperstart agent and the clients
(runtime and shims) run in greenlets of the test process. Flows follow SPEC.md
section 8: the runtime in pod mode dials every 100 ms for up to 5 s and opens a
new connection per operation; shims send ConnectShim without waiting for the
answer.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat

import pytest
from fake_agent import running_agent
from helpers_e2e import (
    CC_PROXY,
    clean_env,
    newcontainer_data,
    proxy_process,
    requires_cc_proxy,
    run_cc_proxy,
    system_args,
)

from cc_proxy import __version__
from cc_proxy.client import Client, ResponseError
from cc_proxy.frames import Command, FrameType

pytestmark = [pytest.mark.timeout(60), requires_cc_proxy]


def assert_gone(path: str) -> None:
    assert not os.path.exists(path), f"{path} still exists"


def assert_nothing_listening(path: str) -> None:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with pytest.raises(OSError):
            probe.connect(path)
    finally:
        probe.close()


def run_container(runtime: Client, shim: Client, agent, token: str, container_id: str, base: int) -> None:
    """newcontainer on ``token`` with the shim already connected; output and exit reach the shim."""
    ack = runtime.hyper("newcontainer", newcontainer_data(container_id), tokens=[token])
    assert ack == b""
    command = agent.wait_command("newcontainer")
    sent = command.json
    assert sent["id"] == container_id
    assert sent["process"]["stdio"] == base
    assert sent["process"]["stderr"] == base + 1
    assert sent["process"]["envs"] == [{"env": "PATH", "value": "/bin"}]  # every other field kept verbatim
    agent.send_io(base, b"out\n")
    agent.send_io(base + 1, b"err\n")
    agent.exit_process(base, 7)
    assert shim.read_output_until_exit(timeout=10) == (b"out\n", b"err\n", 7)


def disconnect(shim: Client) -> None:
    """DisconnectShim: a success response, then the proxy closes the connection."""
    shim.disconnect_shim(wait=True)
    assert shim.read_frame(timeout=5) is None


# -- system mode ---------------------------------------------------------------------------------------------


def test_system_mode_full_flow(workdir, agent):
    sock = f"{workdir}/run/proxy.sock"  # the proxy creates run/
    with proxy_process(system_args(sock), f"{workdir}/stderr") as proxy:
        runtime = proxy.dial(sock)
        with runtime:
            assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
            assert stat.S_ISSOCK(os.stat(sock).st_mode)
            assert stat.S_IMODE(os.stat(os.path.dirname(sock)).st_mode) == 0o750

            io = runtime.register_vm("vm1", agent.ctl_path, agent.io_path)
            assert io.url == f"unix://{sock}"
            assert io.tokens == []
            io = runtime.attach_vm("vm1", 1)
            assert len(io.tokens) == 1 and len(io.tokens[0]) == 44
            token = io.tokens[0]

            with Client(sock, timeout=10) as shim:
                shim.connect_shim(token, wait=False)  # as cc-shim does
                run_container(runtime, shim, agent, token, "c1", base=3)
                disconnect(shim)

            # The token is freed for good.
            with Client(sock, timeout=5) as again, pytest.raises(ResponseError, match="unknown token"):
                again.connect_shim(token)

        assert proxy.stop() == 0, proxy.describe()
    assert_gone(sock)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly(workdir, signum):
    sock = f"{workdir}/proxy.sock"
    with proxy_process(system_args(sock), f"{workdir}/stderr") as proxy:
        idle = proxy.dial(sock)  # a connected client must not hold up the stop
        with idle:
            assert proxy.stop(signum, timeout=5) == 0, proxy.describe()
            assert idle.read_frame(timeout=5) is None
        assert "Traceback" not in proxy.log(), proxy.describe()
    assert_gone(sock)


def test_sigterm_with_a_live_vm_and_shim(workdir, agent):
    sock = f"{workdir}/proxy.sock"
    with proxy_process(system_args(sock), f"{workdir}/stderr") as proxy:
        with proxy.dial(sock) as runtime, Client(sock, timeout=10) as shim:
            (token,) = runtime.register_vm("vm1", agent.ctl_path, agent.io_path, num_io_streams=1).tokens
            shim.connect_shim(token)
            assert proxy.stop(timeout=8) == 0, proxy.describe()
            # Everyone is let go: the agent's channels and both clients see the end.
            agent.wait_io_closed()
            agent.wait_ctl_closed()
            assert shim.read_frame(timeout=5) is None
            assert runtime.read_frame(timeout=5) is None
        assert "Traceback" not in proxy.log(), proxy.describe()
    assert_gone(sock)


def test_stale_socket_is_replaced(workdir):
    sock = f"{workdir}/proxy.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock)
    stale.close()  # the file stays behind, nobody accepts on it
    assert stat.S_ISSOCK(os.lstat(sock).st_mode)
    with proxy_process(system_args(sock), f"{workdir}/stderr") as proxy:
        with proxy.dial(sock) as client, pytest.raises(ResponseError, match="^unknown containerID: x$"):
            client.attach_vm("x")
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        assert proxy.stop() == 0, proxy.describe()
    assert_gone(sock)


def test_live_listener_is_not_stolen(workdir):
    sock = f"{workdir}/proxy.sock"
    owner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    owner.bind(sock)
    owner.listen(8)
    try:
        with proxy_process(system_args(sock), f"{workdir}/stderr") as proxy:
            code = proxy.wait()
            assert code != 0, proxy.describe()
            assert f"another process is listening on {sock}" in proxy.log(), proxy.describe()
        # The owner's socket is untouched and still accepts.
        assert stat.S_ISSOCK(os.lstat(sock).st_mode)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(sock)
    finally:
        owner.close()


# -- pod mode ------------------------------------------------------------------------------------------------


def pod_args(sock: str, *extra: str) -> list[str]:
    """The runtime's spelling: single-dash flags."""
    return ["-uri", f"unix://{sock}", "-log", "debug", "--ksm", "initial", *extra]


def test_pod_mode_runtime_flow(workdir):
    sock = f"{workdir}/proxy.sock"
    pod = "pod1"
    with running_agent(console=True) as agent, proxy_process(pod_args(sock), f"{workdir}/stderr") as proxy:
        # 1. Pod start: the runtime dials every 100 ms for up to 5 s.
        with proxy.dial(sock) as c:
            io = c.register_vm(pod, agent.ctl_path, agent.io_path, console=agent.console_path, num_io_streams=0)
            assert io.tokens == [] and io.url == f"unix://{sock}"
        with proxy.dial(sock, attempts=1) as c:
            with pytest.raises(ResponseError, match="client not attached to a vm"):
                c.hyper("startpod", {"hostname": pod})  # a fresh connection is attached to nothing
            c.attach_vm(pod, 0)
            assert c.hyper("startpod", {"hostname": pod}) == b""
        assert agent.wait_command("startpod").json == {"hostname": pod}

        # 2. Container create: exactly one token, then the shim.
        with Client(sock, timeout=5) as c:
            (token,) = c.attach_vm(pod, 1).tokens
        shim = Client(sock, timeout=10)
        with shim:
            shim.connect_shim(token, wait=False)
            # 3. Container start on a new connection.
            with Client(sock, timeout=10) as c:
                c.attach_vm(pod, 0)
                run_container(c, shim, agent, token, "ctr1", base=3)
            disconnect(shim)

        # 4. Pod stop: destroypod, then UnregisterVM.
        with Client(sock, timeout=5) as c:
            c.attach_vm(pod, 0)
            assert c.hyper("destroypod", {}) == b""
        with Client(sock, timeout=5) as c:
            c.unregister_vm(pod)

        # No new client gets in; the proxy waits for the VM's channels to go.
        with pytest.raises(OSError):
            Client(sock, timeout=5).close()
        assert proxy.proc.poll() is None, proxy.describe()

        agent.close()
        assert proxy.wait() == 0, proxy.describe()
        assert agent.command_names() == ["startpod", "newcontainer", "destroypod"]
        log = proxy.log()
        assert "Traceback" not in log, proxy.describe()
    assert_gone(sock)


def test_pod_mode_exits_when_the_vm_is_lost(workdir, agent):
    sock = f"{workdir}/proxy.sock"
    with proxy_process(pod_args(sock), f"{workdir}/stderr") as proxy:
        with proxy.dial(sock) as c:
            c.register_vm("pod1", agent.ctl_path, agent.io_path)
        agent.close_io()  # the VM dies; no UnregisterVM ever comes
        assert proxy.wait() == 0, proxy.describe()
        assert "Traceback" not in proxy.log(), proxy.describe()
    assert_gone(sock)


def test_pod_mode_streams_the_console_at_debug(workdir):
    sock = f"{workdir}/proxy.sock"
    with running_agent(console=True) as agent, proxy_process(pod_args(sock), f"{workdir}/stderr") as proxy:
        with proxy.dial(sock) as c:
            c.register_vm("pod1", agent.ctl_path, agent.io_path, console=agent.console_path)
        agent.wait_connected("console")
        agent.send_console(b"hello console\n")
        proxy.wait_log("hello console")


# -- logging -------------------------------------------------------------------------------------------------


def _one_call(proxy, sock: str) -> None:
    with proxy.dial(sock) as c, pytest.raises(ResponseError, match="unknown containerID: x"):
        c.attach_vm("x")


def test_env_log_level_raises_the_level(workdir):
    sock = f"{workdir}/proxy.sock"
    with proxy_process(system_args(sock), f"{workdir}/stderr", env=clean_env(CC_PROXY_LOG_LEVEL="debug")) as proxy:
        _one_call(proxy, sock)
        proxy.wait_log("DEBUG client connected")
        assert proxy.stop() == 0
    assert "log level DEBUG from environment CC_PROXY_LOG_LEVEL" in proxy.log(), proxy.describe()


def test_log_flag_beats_the_environment(workdir):
    sock = f"{workdir}/proxy.sock"
    with proxy_process(system_args(sock, "--log", "warn"), f"{workdir}/stderr",
                       env=clean_env(CC_PROXY_LOG_LEVEL="debug")) as proxy:
        _one_call(proxy, sock)
        assert proxy.stop() == 0
    log = proxy.log()
    assert "DEBUG" not in log and "INFO" not in log, proxy.describe()


# -- bad configuration ---------------------------------------------------------------------------------------


def _assert_usage_error(result, *needles: str) -> None:
    detail = f"exit {result.returncode}\nstdout {result.stdout!r}\nstderr {result.stderr!r}"
    assert result.returncode == 2, detail
    assert "cc-proxy: error:" in result.stderr, detail
    for needle in needles:
        assert needle in result.stderr, detail


def test_bad_log_level(workdir):
    sock = f"{workdir}/proxy.sock"
    _assert_usage_error(run_cc_proxy(system_args(sock, "--log", "loud")), "--log", "loud")
    assert_gone(sock)


def test_missing_config_file(workdir):
    sock = f"{workdir}/proxy.sock"
    _assert_usage_error(run_cc_proxy(system_args(sock, "--config", "/nonexistent.toml")), "/nonexistent.toml")
    assert_gone(sock)


def test_unknown_config_key(workdir):
    sock = f"{workdir}/proxy.sock"
    conf = f"{workdir}/cc-proxy.toml"
    with open(conf, "w") as f:
        f.write('log_level = "debug"\nbogus_knob = 3\n')
    _assert_usage_error(run_cc_proxy(system_args(sock, "--config", conf)), "bogus_knob", conf)
    assert_gone(sock)


@pytest.mark.parametrize("flag", ["--socket-path", "-uri"])
def test_socket_path_too_long(workdir, flag):
    long_path = f"{workdir}/{'x' * 120}.sock"
    assert len(long_path.encode()) > 107
    value = long_path if flag == "--socket-path" else f"unix://{long_path}"
    _assert_usage_error(run_cc_proxy(["--ksm", "initial", flag, value]), "107")
    assert_gone(long_path)


def test_version():
    result = run_cc_proxy(["--version"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"cc-proxy version {__version__}\n"


def test_bad_configuration_leaves_nothing_listening(workdir):
    sock = f"{workdir}/proxy.sock"
    for args in (["--log", "loud"], ["--ksm", "sometimes"], ["--max-payload", "-1"], ["--bogus"]):
        result = run_cc_proxy(system_args(sock, *args))
        assert result.returncode == 2, (args, result.stderr)
        assert_gone(sock)
        assert_nothing_listening(sock)


# -- frame size limit ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["flag", "conf"])
def test_max_payload_enforced(workdir, source):
    sock = f"{workdir}/proxy.sock"
    if source == "flag":
        args = system_args(sock, "--max-payload", "1024")
    else:
        conf = f"{workdir}/cc-proxy.toml"
        with open(conf, "w") as f:
            f.write("max_payload = 1024\n")
        args = system_args(sock, "--config", conf)
    with proxy_process(args, f"{workdir}/stderr") as proxy:
        bystander = proxy.dial(sock)
        offender = Client(sock, timeout=5)
        with bystander, offender:
            # Exactly at the limit: served (an error response about the unknown id).
            at_limit = json.dumps({"containerId": "x", "pad": ""}).encode()
            at_limit = json.dumps({"containerId": "x", "pad": "p" * (1024 - len(at_limit))}).encode()
            assert len(at_limit) == 1024
            with pytest.raises(ResponseError, match="^unknown containerID: x$"):
                offender.call(Command.ATTACH_VM, at_limit)

            # One byte over: the offender is dropped without a response.
            offender.send_frame(FrameType.COMMAND, Command.ATTACH_VM, at_limit + b" ")
            try:
                frame = offender.read_frame(timeout=5)
            except ConnectionError:
                frame = None  # reset: the proxy closed with our payload unread
            assert frame is None
            proxy.wait_log("exceeds the limit of 1024")

            # Everyone else carries on.
            with pytest.raises(ResponseError, match="^unknown containerID: y$"):
                bystander.attach_vm("y")
            with proxy.dial(sock, attempts=1) as newcomer, pytest.raises(ResponseError, match="unknown containerID"):
                newcomer.attach_vm("z")
        assert proxy.stop() == 0, proxy.describe()


def test_cc_proxy_is_the_installed_script():
    assert CC_PROXY is not None and os.access(CC_PROXY, os.X_OK)
