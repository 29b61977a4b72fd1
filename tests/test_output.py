"""Agent output towards the shims (SPEC.md section 4): stdout/stderr routing by sequence number, process
exit, the null session, unowned sequence numbers, output kept while no shim is connected (bounded), many
concurrent shims and slow shims.
"""

import gevent
import pytest
from conftest import captured_logs, running_proxy
from fake_agent import running_agent
from helpers_shim import (
    VM_ID,
    container_data,
    hyper,
    new_token,
    open_shim,
    read_stdout,
    session_of,
    start_process,
    wait_until,
)

from cc_proxy.client import Client

pytestmark = pytest.mark.timeout(30)


def payload_for(index: int, size: int) -> bytes:
    """Distinct, recognisable bytes per session."""
    pattern = f"<session {index:03d}>".encode()
    return (pattern * (size // len(pattern) + 1))[:size]


# -- routing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 1, 255])
def test_stdout_stderr_and_exit_code(pod, connect, code):
    _, agent = pod
    shim, _, base = start_process(connect, agent)
    agent.send_io(base, b"to stdout\n")
    assert shim.read_event() == ("stdout", b"to stdout\n")
    agent.send_io(base + 1, b"to stderr\n")
    assert shim.read_event() == ("stderr", b"to stderr\n")
    binary = bytes(range(256))
    agent.send_io(base, binary)
    assert shim.read_event() == ("stdout", binary)
    agent.send_io(base + 1, b"\0")  # one byte of stderr is output, not an exit
    assert shim.read_event() == ("stderr", b"\0")
    agent.send_io(base, b"x")  # nor is one byte of stdout before the EOF
    assert shim.read_event() == ("stdout", b"x")
    agent.exit_process(base, code)
    assert shim.read_event() == ("exit", code)


def test_terminal_process_has_no_stderr_sequence(pod, connect):
    _, agent = pod
    shim, _, base = start_process(connect, agent, terminal=True)
    command = agent.wait_command("newcontainer")
    assert command.json["process"]["stdio"] == base
    assert "stderr" not in command.json["process"]
    agent.send_io(base, b"tty output")
    agent.exit_process(base, 0)
    assert shim.read_output_until_exit() == (b"tty output", b"", 0)


def test_large_output_in_many_messages(pod, connect):
    _, agent = pod
    shim, _, base = start_process(connect, agent)
    data = payload_for(1, 300_000)
    agent.send_io(base, data)  # split by the agent into 10240-byte messages
    agent.exit_process(base, 0)
    assert shim.read_output_until_exit() == (data, b"", 0)


def test_null_session_output_is_discarded(pod, connect):
    runtime, agent = pod
    hyper(connect, "newcontainer", container_data("nullc"))
    command = agent.wait_command("newcontainer")
    assert (command.json["process"]["stdio"], command.json["process"]["stderr"]) == (1, 2)
    agent.send_io(1, b"null stdout")
    agent.send_io(2, b"null stderr")
    agent.exit_process(1, 0)
    # Nothing crashed: a real session on the same VM still gets its own output, and nothing else.
    shim, _, base = start_process(connect, agent, "c2")
    assert base == 3
    agent.send_io(base, b"mine")
    agent.exit_process(base, 4)
    assert shim.read_output_until_exit() == (b"mine", b"", 4)
    assert runtime.attach_vm(VM_ID, 0).tokens == []


def test_output_for_unowned_sequence_is_dropped_and_logged(pod, connect):
    runtime, agent = pod
    shim, _, base = start_process(connect, agent)
    with captured_logs("WARNING") as logs:
        agent.send_io(99, b"nobody's")
        agent.send_io(base, b"somebody's")
        assert shim.read_event() == ("stdout", b"somebody's")
    assert any("99" in record["message"] and "nobody owns" in record["message"] for record in logs), logs
    agent.exit_process(base, 0)
    assert shim.read_event() == ("exit", 0)
    assert runtime.attach_vm(VM_ID, 0).tokens == []


def test_output_of_freed_token_is_dropped(pod, proxy, connect):
    _, agent = pod
    shim, token, base = start_process(connect, agent)
    shim.disconnect_shim(wait=True)
    assert shim.read_event() is None
    with captured_logs("WARNING") as logs:
        agent.send_io(base, b"late output")
        other, _, other_base = start_process(connect, agent, "c2")
        agent.send_io(other_base, b"fresh")
        assert other.read_event() == ("stdout", b"fresh")
    assert any(f"sequence number {base} " in record["message"] for record in logs), logs
    assert session_of(proxy, token) is None


# -- output while no shim is connected ------------------------------------------------------------------


def test_output_before_the_shim_connected_is_delivered(pod, proxy, connect):
    _, agent = pod
    token = new_token(connect)
    agent.send_io(3, b"early stdout ")
    agent.send_io(4, b"early stderr")
    agent.send_io(3, b"and more")
    session = session_of(proxy, token)
    wait_until(lambda: len(session.outbox) == 3, what="early output kept for the shim")
    shim = open_shim(connect, token, wait=False)
    hyper(connect, "newcontainer", container_data("c1"), tokens=[token])
    events = [shim.read_event() for _ in range(4)]
    # The ConnectShim response may come before or after the kept output: cc-shim does not wait for it.
    responses = [event for event in events if event[0] == "response"]
    assert len(responses) == 1 and not responses[0][1].error
    streams = [event for event in events if event[0] != "response"]
    assert streams == [("stdout", b"early stdout "), ("stderr", b"early stderr"), ("stdout", b"and more")]


def test_output_buffer_bound_without_shim(agent):
    limit = 2000
    chunk_size = 200
    with running_proxy(shim_buffer_bytes=limit) as server:
        path = server.config.socket_path
        with Client(path, timeout=5) as runtime:
            runtime.register_vm(VM_ID, agent.ctl_path, agent.io_path)
            token = runtime.attach_vm(VM_ID, 1).tokens[0]
            chunks = [(b"%03d" % i) * (chunk_size // 3) + b"\n" for i in range(50)]
            with captured_logs("WARNING") as logs:
                for chunk in chunks:
                    agent.send_io(3, chunk)
                session = session_of(server, token)
                wait_until(lambda: session.outbox and session.outbox[-1].endswith(chunks[-1]),
                           what="the last chunk to be routed")
            assert any("dropped" in record["message"] for record in logs), logs
            assert 0 < session.outbox_bytes <= limit
            with Client(path, timeout=5) as shim:
                shim.connect_shim(token)
                agent.exit_process(3, 9)
                out, err, code = shim.read_output_until_exit()
            assert code == 9 and err == b""
            full = b"".join(chunks)
            assert full.endswith(out)  # the newest output, in order
            assert out.endswith(chunks[-1]) and not out.startswith(chunks[0])
            assert len(out) % len(chunks[0]) == 0  # whole messages only
            assert len(out) < limit
            # The proxy carries on.
            assert runtime.attach_vm(VM_ID, 0).tokens == []


# -- many shims ----------------------------------------------------------------------------------------


def test_many_concurrent_shims_on_two_vms(pod, connect):
    runtime, agent = pod
    with running_agent() as agent2:
        runtime.register_vm("pod2", agent2.ctl_path, agent2.io_path)
        sessions = []  # (vm agent, shim, base, index)
        for index in range(20):
            shim, _, base = start_process(connect, agent, f"a{index}")
            sessions.append((agent, shim, base, index))
        for index in range(20, 26):
            shim, _, base = start_process(connect, agent2, f"b{index}", vm="pod2")
            sessions.append((agent2, shim, base, index))
        assert sorted(base for vm_agent, _, base, _ in sessions if vm_agent is agent) == list(range(3, 43, 2))
        assert sorted(base for vm_agent, _, base, _ in sessions if vm_agent is agent2) == list(range(3, 15, 2))

        readers = [gevent.spawn(shim.read_output_until_exit, 20) for _, shim, _, _ in sessions]
        size, piece = 5000, 700
        outs = {index: payload_for(index, size) for _, _, _, index in sessions}
        errs = {index: b"err %d\n" % index for _, _, _, index in sessions}
        for offset in range(0, size, piece):  # interleave the sessions, and the two VMs
            for vm_agent, _, base, index in sessions:
                vm_agent.send_io(base, outs[index][offset:offset + piece])
        for vm_agent, _, base, index in reversed(sessions):
            vm_agent.send_io(base + 1, errs[index])
            vm_agent.exit_process(base, (index * 11) % 256)
        gevent.joinall(readers, timeout=20, raise_error=True)
        for reader, (_, _, _, index) in zip(readers, sessions, strict=True):
            assert reader.value == (outs[index], errs[index], (index * 11) % 256), index


def test_slow_shim_does_not_stall_the_others(pod, connect):
    _, agent = pod
    slow, _, slow_base = start_process(connect, agent, "slow")
    fast, _, fast_base = start_process(connect, agent, "fast")
    backlog = payload_for(0, 1_000_000)  # well past the socket buffers, under the 4 MiB bound
    agent.send_io(slow_base, backlog)
    for round_ in range(20):
        line = b"fast line %d\n" % round_
        agent.send_io(fast_base, line)
        assert read_stdout(fast, len(line)) == line
    agent.exit_process(fast_base, 0)
    assert fast.read_event() == ("exit", 0)
    # The slow shim finally reads: nothing was lost.
    agent.exit_process(slow_base, 2)
    assert slow.read_output_until_exit(timeout=10) == (backlog, b"", 2)


def test_slow_shim_dropping_over_the_bound_does_not_stall_the_vm(agent):
    limit = 64 * 1024
    with running_proxy(shim_buffer_bytes=limit) as server:
        path = server.config.socket_path
        with Client(path, timeout=5) as runtime:
            runtime.register_vm(VM_ID, agent.ctl_path, agent.io_path)
            server_connect = _factory(path)
            slow, slow_token, slow_base = start_process(server_connect, agent, "slow")
            fast, _, fast_base = start_process(server_connect, agent, "fast")
            session = session_of(server, slow_token)
            # More than the socket buffers and the bound: the proxy's io reader waits for the slow shim.
            flood = gevent.spawn(agent.send_io, slow_base, payload_for(0, 4_000_000))
            try:
                wait_until(lambda: not session.drained.is_set(), what="the io reader to wait for the slow shim")
                slow.close()  # the slow shim goes away (killed) and never comes back
                wait_until(lambda: session.shim is None, what="the proxy to release the slow shim's token")
                # Its output is now kept (bounded) without a shim: the io reader must go on, and the VM's
                # other shims get their output again.
                flood.join(timeout=3)
                assert flood.successful(), "the proxy stopped reading the agent's io channel"
                agent.send_io(fast_base, b"fast output")
                assert fast.read_event(timeout=3) == ("stdout", b"fast output")
                assert session.outbox_bytes <= limit
            finally:
                flood.kill()
                server_connect.close_all()


def _factory(path):
    """A ``connect`` factory (like the fixture's) for a proxy started with ``running_proxy``."""
    clients = []

    def connect(timeout=5.0):
        client = Client(path, timeout=timeout)
        clients.append(client)
        return client
    connect.close_all = lambda: [client.close() for client in clients]
    return connect
