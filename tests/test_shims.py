"""The shim's side of the proxy (SPEC.md sections 3, 4, 6 and 8): ConnectShim, DisconnectShim, Signal,
stdin, reconnecting and log streams, over real AF_UNIX sockets against the in-process proxy and a fake agent.
"""

import pytest
from conftest import running_proxy
from helpers_shim import (
    VM_ID,
    assert_dropped,
    container_data,
    hyper,
    new_token,
    open_shim,
    read_stdout,
    reconnect_shim,
    session_of,
    spawn_hyper,
    start_process,
    wait_shim_released,
    wait_until,
)

from cc_proxy.agent_codec import IO_HEADER, MAX_MESSAGE
from cc_proxy.client import Client, ResponseError
from cc_proxy.frames import Command, FrameType, Stream

pytestmark = pytest.mark.timeout(30)

SIGKILL, SIGTERM, SIGWINCH, SIGINT, SIGHUP = 9, 15, 28, 2, 1


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(ResponseError) as info:
        call(*args, **kwargs)
    return info.value.message


def no_command(agent, name: str, timeout: float = 0.3) -> None:
    """The agent does not receive ``name`` within ``timeout`` (a bounded negative check)."""
    with pytest.raises(AssertionError, match="timed out"):
        agent.wait_command(name, timeout=timeout)


def kill_commands(agent) -> list:
    return [c.json for c in agent.commands if c.name in ("killcontainer", "winsize")]


# -- ConnectShim ---------------------------------------------------------------------------------------


def test_connect_shim_unknown_token(pod, connect):
    shim = connect()
    assert error_of(shim.connect_shim, "bogus-token") == "unknown token: bogus-token"


def test_shim_logs_name_the_token_by_prefix_only(pod, connect, log_records):
    token = new_token(connect)
    open_shim(connect, token)
    assert error_of(connect().connect_shim, token) == f"token already claimed: {token}"  # the wire keeps it whole
    shim_lines = [r for r in log_records if r["extra"].get("token") == token[:8]]
    assert any(r["message"].startswith("ConnectShim") for r in shim_lines), log_records
    assert all(r["extra"]["vm"] == "pod1" for r in shim_lines)
    assert any("token already claimed" in r["message"] for r in log_records)
    assert not any(token in r["message"] or token in str(r["extra"]) for r in log_records)


def test_connect_shim_token_claimed_by_live_shim(pod, connect):
    token = new_token(connect)
    open_shim(connect, token)
    other = connect()
    assert error_of(other.connect_shim, token) == f"token already claimed: {token}"
    # The refused client is not a shim, and keeps its connection.
    assert error_of(other.call, Command.DISCONNECT_SHIM) == "client isn't a shim"


def test_connect_shim_wakes_waiting_hyper(pod, connect):
    _, agent = pod
    token = new_token(connect)
    pending = spawn_hyper(connect, "newcontainer", container_data("c1"), tokens=[token])
    no_command(agent, "newcontainer")  # held by the proxy until the shim connects
    assert not pending.ready()
    shim = open_shim(connect, token)
    command = agent.wait_command("newcontainer")
    assert pending.get(timeout=5) == b""
    assert command.json["id"] == "c1"
    assert command.json["process"]["stdio"] == 3
    assert command.json["process"]["stderr"] == 4
    shim.signal(SIGWINCH, 80, 24)  # the process counts as started
    assert agent.wait_command("winsize").json == {"seq": 3, "row": 24, "column": 80}


def test_hyper_times_out_without_shim(agent, connect):
    with running_proxy(shim_timeout=0.3) as server:
        runtime = Client(server.config.socket_path, timeout=5)
        try:
            runtime.register_vm(VM_ID, agent.ctl_path, agent.io_path)
            token = runtime.attach_vm(VM_ID, 1).tokens[0]
            text = error_of(runtime.hyper, "newcontainer", container_data("c1"), tokens=[token])
        finally:
            runtime.close()
    assert text == f"timeout waiting for shim with token {token}"
    assert "newcontainer" not in agent.command_names()


def test_sequence_numbers_per_token(pod, connect):
    _, agent = pod
    bases = [start_process(connect, agent, f"c{i}")[2] for i in range(3)]
    assert bases == [3, 5, 7]


# -- DisconnectShim ------------------------------------------------------------------------------------


def test_disconnect_shim_from_non_shim(pod, connect):
    runtime, _ = pod
    assert error_of(runtime.call, Command.DISCONNECT_SHIM) == "client isn't a shim"
    runtime.attach_vm(VM_ID, 0)  # still served


def test_disconnect_shim_frees_token_for_good(pod, connect):
    token = new_token(connect)
    shim = open_shim(connect, token)
    shim.disconnect_shim(wait=True)
    assert shim.read_event() is None  # the proxy closed the shim's connection
    late = connect()
    assert error_of(late.connect_shim, token) == f"unknown token: {token}"


def test_disconnect_shim_without_waiting_after_exit(pod, proxy, connect):
    """cc-shim: on ProcessExited it sends DisconnectShim and exits without reading the answer."""
    _, agent = pod
    shim, token, base = start_process(connect, agent)
    agent.exit_process(base, 3)
    assert shim.read_event() == ("exit", 3)
    shim.disconnect_shim()
    shim.close()
    wait_until(lambda: session_of(proxy, token) is None, what="the token to be freed")
    late = connect()
    assert error_of(late.connect_shim, token) == f"unknown token: {token}"


# -- Signal: validation ----------------------------------------------------------------------------------


def test_signal_from_non_shim(pod, connect):
    runtime, _ = pod
    assert error_of(runtime.signal, SIGTERM) == "client isn't a shim"


@pytest.mark.parametrize("number", [-1, 31, 64])
def test_signal_invalid_number(pod, connect, number):
    shim = open_shim(connect, new_token(connect))
    assert error_of(shim.signal, number) == f"invalid signal number {number}"


def test_sigwinch_with_zero_size(pod, connect):
    shim = open_shim(connect, new_token(connect))
    text = error_of(shim.call, Command.SIGNAL, {"signalNumber": SIGWINCH, "columns": 0, "rows": 24})
    assert text == "received SIGWINCH but terminal size is invalid (0,24)"


def test_other_signal_with_size(pod, connect):
    shim = open_shim(connect, new_token(connect))
    assert error_of(shim.signal, SIGTERM, 80, 24) == "received a terminal size (80,24) for signal terminated"


# -- Signal: before the process started ----------------------------------------------------------------


@pytest.mark.parametrize("number", [SIGKILL, SIGTERM])
def test_kill_before_start_exits_the_shim(pod, connect, number):
    _, agent = pod
    shim = open_shim(connect, new_token(connect))
    shim.send_command(Command.SIGNAL, {"signalNumber": number})
    assert shim.read_event() == ("exit", 0)
    kind, frame = shim.read_event()
    assert kind == "response" and frame.opcode == Command.SIGNAL and not frame.error
    assert kill_commands(agent) == []


def test_signal_before_start_waits_for_start(pod, connect):
    _, agent = pod
    token = new_token(connect)
    shim = open_shim(connect, token)
    shim.send_command(Command.SIGNAL, {"signalNumber": SIGINT})
    no_command(agent, "killcontainer")
    hyper(connect, "newcontainer", container_data("c1"), tokens=[token])
    assert agent.wait_command("killcontainer").json == {"container": "c1", "signal": SIGINT, "allProcesses": False}
    shim.read_response()
    assert agent.command_names().index("newcontainer") < agent.command_names().index("killcontainer")


def test_signal_before_start_times_out(agent):
    with running_proxy(process_timeout=0.3) as server:
        path = server.config.socket_path
        with Client(path, timeout=5) as runtime, Client(path, timeout=5) as shim:
            runtime.register_vm(VM_ID, agent.ctl_path, agent.io_path)
            token = runtime.attach_vm(VM_ID, 1).tokens[0]
            shim.connect_shim(token)
            text = error_of(shim.signal, SIGINT)
            assert text == f"timeout waiting for process with token {token}"
            assert error_of(shim.signal, SIGWINCH, 80, 24) == text
    assert kill_commands(agent) == []


# -- Signal: after the start -----------------------------------------------------------------------------


def test_sigwinch_after_start(pod, connect):
    _, agent = pod
    shim, _, base = start_process(connect, agent)
    shim.signal(SIGWINCH, 132, 43)
    assert agent.wait_command("winsize").json == {"seq": base, "row": 43, "column": 132}


def test_sigterm_after_newcontainer(pod, connect):
    _, agent = pod
    shim, _, _ = start_process(connect, agent, "mycontainer")
    shim.signal(SIGTERM)
    command = agent.wait_command("killcontainer")
    assert command.json == {"container": "mycontainer", "signal": SIGTERM, "allProcesses": False}


def test_signal_to_execcmd_session(pod, connect):
    _, agent = pod
    start_process(connect, agent, "c1")
    shim, _, base = start_process(connect, agent, "c1", name="execcmd")
    assert base == 5
    text = error_of(shim.signal, SIGTERM)
    assert text == ("Could not send the signal terminated: Sending a signal to a process different from the "
                    "initial container process is not supported")
    shim.signal(SIGWINCH, 80, 24)  # window changes do reach exec'd processes
    assert agent.wait_command("winsize").json == {"seq": base, "row": 24, "column": 80}
    assert "killcontainer" not in agent.command_names()


def test_monitor_signals_in_a_row(pod, connect):
    """cc-shim's monitor child shares the connection and sends SIGKILL after the shim's own signal."""
    _, agent = pod
    shim, _, _ = start_process(connect, agent, "c1")
    shim.send_command(Command.SIGNAL, {"signalNumber": SIGTERM})
    shim.send_command(Command.SIGNAL, {"signalNumber": SIGKILL})
    shim.read_response()
    shim.read_response()
    kills = [c.json for c in agent.commands if c.name == "killcontainer"]
    assert kills == [{"container": "c1", "signal": SIGTERM, "allProcesses": False},
                     {"container": "c1", "signal": SIGKILL, "allProcesses": False}]


def test_agent_error_on_signal(pod, connect):
    _, agent = pod
    shim, _, _ = start_process(connect, agent)
    agent.reply_with("killcontainer", error=b"no such process")
    text = error_of(shim.signal, SIGHUP)
    assert text == "ERROR received from VM agent, control msg received : no such process"


# -- stdin -----------------------------------------------------------------------------------------------


def test_stdin_from_non_shim_drops_the_client(pod, connect):
    runtime, _ = pod
    stray = connect()
    stray.send_stdin(b"hello")
    assert_dropped(stray)
    assert runtime.attach_vm(VM_ID, 1).tokens  # the proxy and its other clients carry on
    assert connect().attach_vm(VM_ID, 0).tokens == []


def test_stdin_before_start_is_held_then_delivered_in_order(pod, connect):
    _, agent = pod
    token = new_token(connect)
    shim = open_shim(connect, token, wait=False)
    for chunk in (b"one ", b"two ", b"three"):
        shim.send_stdin(chunk)
    with pytest.raises(AssertionError, match="timed out"):
        agent.wait_stdin(3, 1, timeout=0.3)
    hyper(connect, "newcontainer", container_data("c1"), tokens=[token])
    assert agent.wait_stdin(3, 13) == b"one two three"
    shim.read_response()
    shim.send_stdin(b" four")
    assert agent.wait_stdin(3, 18) == b"one two three four"


def test_empty_stdin_is_forwarded_as_eof(pod, connect):
    _, agent = pod
    shim, _, base = start_process(connect, agent)
    shim.send_stdin(b"data")
    shim.send_stdin(b"")
    assert agent.wait_io_message(base, lambda p: p == b"") == b""
    assert [p for s, p in agent.io_messages if s == base] == [b"data", b""]


def test_large_stdin_is_split(pod, connect):
    _, agent = pod
    shim, _, base = start_process(connect, agent)
    data = bytes(range(256)) * 195 + b"tail"  # 49924 bytes
    data = data + b"x" * (50000 - len(data))
    shim.send_stdin(data)
    assert agent.wait_stdin(base, len(data)) == data
    messages = [p for s, p in agent.io_messages if s == base]
    assert len(messages) >= 5
    assert all(0 < len(p) and len(p) + IO_HEADER.size <= MAX_MESSAGE for p in messages)
    assert b"".join(messages) == data
    shim.send_stdin(b"more")  # the shim is still connected
    assert agent.wait_stdin(base, len(data) + 4).endswith(b"more")


# -- reconnecting (SPEC section 6 Fix) ------------------------------------------------------------------


def test_reconnect_keeps_the_session(pod, proxy, connect):
    _, agent = pod
    shim, token, base = start_process(connect, agent, "c1")
    agent.send_io(base, b"before drop\n")
    assert read_stdout(shim, 12) == b"before drop\n"

    shim.close()  # dropped without DisconnectShim
    wait_shim_released(proxy, token)
    chunks = [f"while away {i}\n".encode() for i in range(20)]
    for chunk in chunks:
        agent.send_io(base, chunk)
    agent.send_io(base + 1, b"err while away\n")
    session = session_of(proxy, token)
    wait_until(lambda: session.outbox_bytes >= sum(map(len, chunks)) + 15, what="output buffered for the shim")

    shim = reconnect_shim(connect, token)
    expected = b"".join(chunks)
    assert read_stdout(shim, len(expected)) == expected
    assert shim.read_event() == ("stderr", b"err while away\n")

    # The process was already running: stdin and signals flow at once.
    shim.send_stdin(b"typed after reconnect")
    assert agent.wait_stdin(base, 21) == b"typed after reconnect"
    shim.signal(SIGWINCH, 100, 30)
    assert agent.wait_command("winsize").json == {"seq": base, "row": 30, "column": 100}
    shim.signal(SIGTERM)
    assert agent.wait_command("killcontainer").json == {"container": "c1", "signal": SIGTERM, "allProcesses": False}

    # Output keeps flowing, then the exit.
    agent.send_io(base, b"after\n")
    agent.exit_process(base, 7)
    assert shim.read_output_until_exit() == (b"after\n", b"", 7)


def test_reconnect_twice_and_claim_while_away(pod, proxy, connect):
    _, agent = pod
    shim, token, base = start_process(connect, agent)
    for round_ in range(2):
        shim.close()
        wait_shim_released(proxy, token)
        shim = reconnect_shim(connect, token)
        agent.send_io(base, b"round %d" % round_)
        assert read_stdout(shim, 7) == b"round %d" % round_
    other = connect()
    assert error_of(other.connect_shim, token) == f"token already claimed: {token}"


def test_reconnect_before_the_process_started(pod, proxy, connect):
    _, agent = pod
    token = new_token(connect)
    first = open_shim(connect, token)
    first.close()
    wait_shim_released(proxy, token)
    pending = spawn_hyper(connect, "newcontainer", container_data("c1"), tokens=[token])
    no_command(agent, "newcontainer")  # the shim is gone again: the start waits for the reconnect
    shim = reconnect_shim(connect, token)
    assert pending.get(timeout=5) == b""
    agent.exit_process(3, 0)
    assert shim.read_output_until_exit() == (b"", b"", 0)


# -- log streams -----------------------------------------------------------------------------------------


def test_log_stream_from_shim_accepted(pod, connect):
    _, agent = pod
    shim, _, base = start_process(connect, agent)
    shim.log("shim", "info", "hello from the shim", container_id="c1")
    shim.log("shim", "debug", "no container")
    shim.send_stdin(b"still here")
    assert agent.wait_stdin(base, 10) == b"still here"
    shim.signal(SIGWINCH, 80, 24)


@pytest.mark.parametrize("payload", [
    b'{"source": "kernel", "level": "info", "msg": "x"}',
    b'{"source": "shim", "level": "fatal", "msg": "x"}',
    b'{"source": "shim", "level": "info", "msg": ""}',
    b'{"source": "shim", "level": "info"}',
    b"not json",
])
def test_invalid_log_stream_drops_the_shim(pod, proxy, connect, payload):
    _, agent = pod
    shim, token, _ = start_process(connect, agent)
    shim.send_frame(FrameType.STREAM, Stream.LOG, payload)
    assert_dropped(shim)
    wait_shim_released(proxy, token)  # a drop, not a DisconnectShim: the shim may come back
    reconnect_shim(connect, token)
