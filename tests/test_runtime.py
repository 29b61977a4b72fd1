"""Runtime-side scenarios (SPEC.md sections 3 to 5): RegisterVM, AttachVM, UnregisterVM, Hyper, log.

The proxy runs in-process on a real AF_UNIX socket; the VM side is a FakeAgent.
Error texts are the wire texts of SPEC.md, compared exactly.
"""

import json
import os
import re
import time

import gevent
import gevent.event
import pytest
from conftest import running_proxy
from fake_agent import running_agent
from helpers_runtime import assert_dropped, assert_serving, expect_error, registry, wait_until

from cc_proxy import logsetup
from cc_proxy.agent_codec import AgentCode
from cc_proxy.client import Client, ResponseError
from cc_proxy.frames import Command, FrameType, Stream
from cc_proxy.payloads import encode_json

pytestmark = pytest.mark.timeout(30)

TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{43}=$")


def register_payload(agent, container_id="pod1", **extra):
    payload = {"containerId": container_id, "ctlSerial": agent.ctl_path, "ioSerial": agent.io_path}
    payload.update(extra)
    return payload


def attached(connect, container_id="pod1"):
    """A fresh runtime connection attached to ``container_id`` with no token."""
    client = connect()
    client.attach_vm(container_id)
    return client


# -- RegisterVM ------------------------------------------------------------------------------------------


def test_register_vm_response_shape_without_streams(proxy, agent, connect):
    runtime = connect()
    raw = runtime.call(Command.REGISTER_VM, register_payload(agent, numIOStreams=0))
    expected_url = "unix://" + os.path.abspath(proxy.config.socket_path)
    assert json.loads(raw) == {"io": {"URL": expected_url, "tokens": None}}
    assert expected_url.startswith("unix:///")


def test_register_vm_without_num_io_streams_gives_null_tokens(proxy, agent, connect):
    raw = connect().call(Command.REGISTER_VM, register_payload(agent))
    assert json.loads(raw)["io"]["tokens"] is None


def test_register_vm_allocates_n_tokens(proxy, agent, connect):
    raw = connect().call(Command.REGISTER_VM, register_payload(agent, numIOStreams=3))
    io = json.loads(raw)["io"]
    assert set(io) == {"URL", "tokens"}
    assert io["URL"] == "unix://" + os.path.abspath(proxy.config.socket_path)
    tokens = io["tokens"]
    assert len(tokens) == 3 and len(set(tokens)) == 3
    for token in tokens:
        assert len(token) == 44 and TOKEN_RE.match(token), token
    assert registry(proxy)["tokens"] == 3


def test_register_vm_ignores_unknown_fields(proxy, agent, connect):
    raw = connect().call(Command.REGISTER_VM, register_payload(agent, numIOStreams=1, somethingNew={"a": 1}))
    assert len(json.loads(raw)["io"]["tokens"]) == 1


@pytest.mark.parametrize("missing", ["containerId", "ctlSerial", "ioSerial"])
def test_register_vm_malformed_registers_nothing(proxy, agent, connect, missing):
    runtime = connect()
    payload = register_payload(agent, numIOStreams=2)
    del payload[missing]
    assert expect_error(runtime.call, Command.REGISTER_VM, payload) == "malformed RegisterVM command"
    stats = registry(proxy)
    assert stats["registered"] == [] and stats["reserved"] == [] and stats["tokens"] == 0
    assert expect_error(connect().attach_vm, "pod1") == "unknown containerID: pod1"
    # The connection is not attached either, and still serves.
    assert expect_error(runtime.hyper, "ping") == "client not attached to a vm"
    assert agent.ctl_accepts == 0


def test_register_vm_empty_payload_is_malformed(proxy, connect):
    assert expect_error(connect().call, Command.REGISTER_VM, b"") == "malformed RegisterVM command"


def test_register_vm_duplicate(pod, connect):
    runtime, agent = pod
    with running_agent() as other:
        text = expect_error(connect().register_vm, "pod1", other.ctl_path, other.io_path)
        assert text == "pod1: container already registered"
        assert other.ctl_accepts == 0
    # The first registration is untouched.
    assert runtime.hyper("ping") == b""
    agent.wait_command("ping")


def test_register_vm_agent_socket_missing_frees_the_id(proxy, connect):
    runtime = connect()
    with running_agent() as agent:
        missing = agent.ctl_path + ".missing"
        text = expect_error(runtime.register_vm, "pod1", missing, agent.io_path, num_io_streams=2)
        assert text.startswith("dial unix ")
        assert text == f"dial unix {missing}: connect: no such file or directory"
        stats = registry(proxy)
        assert stats["registered"] == [] and stats["reserved"] == [] and stats["tokens"] == 0
        assert expect_error(connect().attach_vm, "pod1") == "unknown containerID: pod1"
        # The same id registers fine once the agent is there.
        info = runtime.register_vm("pod1", agent.ctl_path, agent.io_path, num_io_streams=1)
        assert len(info.tokens) == 1
        assert runtime.hyper("ping") == b""


def test_register_vm_dials_ctl_before_io(proxy, connect):
    """io missing: ctl was already dialed (and is closed again), the error names io."""
    with running_agent() as agent:
        os.unlink(agent.io_path)
        text = expect_error(connect().register_vm, "pod1", agent.ctl_path, agent.io_path)
        assert text == f"dial unix {agent.io_path}: connect: no such file or directory"
        # ctl was dialed first; the proxy may have hung up before the agent even accepted it.
        wait_until(lambda: agent.ctl_accepts == 1, what="the ctl connection")
        assert agent.io_accepts == 0
        assert registry(proxy)["registered"] == []


def test_register_vm_waits_for_ready_after_connecting_both_channels(proxy, connect):
    with running_agent(send_ready=False) as agent:
        runtime = connect()
        job = gevent.spawn(runtime.register_vm, "pod1", agent.ctl_path, agent.io_path, num_io_streams=1)
        agent.wait_connected("ctl")
        agent.wait_connected("io")
        assert not job.ready()
        assert registry(proxy)["reserved"] == ["pod1"]
        agent.send_ctl(AgentCode.READY)
        info = job.get(timeout=5)
        assert len(info.tokens) == 1
        assert registry(proxy)["registered"] == ["pod1"]
        assert runtime.hyper("ping") == b""


def test_register_vm_ignores_messages_before_ready(proxy, connect):
    with running_agent(send_ready=False) as agent:
        runtime = connect()
        job = gevent.spawn(runtime.register_vm, "pod1", agent.ctl_path, agent.io_path)
        agent.wait_connected("io")
        agent.send_ctl(AgentCode.NEXT, b"\0\0\0\4")
        agent.send_ctl(AgentCode.READY)
        job.get(timeout=5)
        assert runtime.hyper("ping") == b""


def test_register_vm_ready_timeout_frees_everything():
    with running_proxy(ready_timeout=0.3) as server, running_agent(send_ready=False) as silent:
        runtime = Client(server.config.socket_path, timeout=5)
        try:
            text = expect_error(runtime.register_vm, "pod1", silent.ctl_path, silent.io_path, num_io_streams=2)
            assert "READY" in text
            # The proxy hung up on the silent agent and forgot the id and its (never allocated) tokens.
            silent.wait_ctl_closed()
            silent.wait_io_closed()
            stats = registry(server)
            assert stats["registered"] == [] and stats["reserved"] == [] and stats["tokens"] == 0
            assert stats["vms"] == []
            assert expect_error(runtime.attach_vm, "pod1") == "unknown containerID: pod1"
            with running_agent() as agent:
                info = runtime.register_vm("pod1", agent.ctl_path, agent.io_path, num_io_streams=1)
                assert len(info.tokens) == 1
                assert registry(server)["tokens"] == 1
                assert runtime.hyper("ping") == b""
        finally:
            runtime.close()


def test_register_vm_agent_closing_ctl_before_ready(proxy, connect):
    with running_agent(send_ready=False) as agent:
        runtime = connect()
        job = gevent.spawn(expect_error, runtime.register_vm, "pod1", agent.ctl_path, agent.io_path)
        agent.wait_connected("io")
        agent.close_ctl()
        assert job.get(timeout=5).endswith("the agent closed the ctl channel before READY")
        assert registry(proxy)["registered"] == []


def test_register_vm_same_id_while_the_first_is_connecting(proxy, connect):
    with running_agent(send_ready=False) as slow, running_agent() as other:
        first = connect()
        job = gevent.spawn(first.register_vm, "pod1", slow.ctl_path, slow.io_path)
        slow.wait_connected("io")
        text = expect_error(connect().register_vm, "pod1", other.ctl_path, other.io_path)
        assert text == "pod1: container already registered"
        slow.send_ctl(AgentCode.READY)
        job.get(timeout=5)
        assert first.hyper("ping") == b""
        assert other.ctl_accepts == 0


def test_register_vm_ready_timeout_is_bounded_by_the_setting():
    with running_proxy(ready_timeout=0.3) as server, running_agent(send_ready=False) as silent, \
            Client(server.config.socket_path, timeout=5) as runtime:
        started = time.monotonic()
        expect_error(runtime.register_vm, "pod1", silent.ctl_path, silent.io_path)
        assert 0.25 <= time.monotonic() - started < 2


@pytest.mark.parametrize("debug", [True, False])
def test_register_vm_console_only_at_debug_level_and_first(proxy, connect, monkeypatch, debug):
    monkeypatch.setattr(logsetup, "is_debug", lambda: debug)
    with running_agent(console=True) as agent:
        os.unlink(agent.ctl_path)
        text = expect_error(connect().register_vm, "pod1", agent.ctl_path, agent.io_path, agent.console_path)
        assert text == f"dial unix {agent.ctl_path}: connect: no such file or directory"
        if debug:
            agent.wait_connected("console")  # dialed before ctl
    with running_agent(console=debug) as agent:
        # Without debug the console is not dialed at all: a missing console socket does not matter.
        runtime = connect()
        runtime.register_vm("pod1", agent.ctl_path, agent.io_path, agent.console_path)
        if debug:
            agent.wait_connected("console")
            agent.send_console(b"booting\n")
        assert runtime.hyper("ping") == b""


def test_register_vm_missing_console_at_debug_level(proxy, connect, monkeypatch):
    monkeypatch.setattr(logsetup, "is_debug", lambda: True)
    with running_agent() as agent:
        text = expect_error(connect().register_vm, "pod1", agent.ctl_path, agent.io_path, agent.console_path)
        assert text == f"dial unix {agent.console_path}: connect: no such file or directory"
        assert registry(proxy)["registered"] == [] and registry(proxy)["reserved"] == []


# -- AttachVM / UnregisterVM -----------------------------------------------------------------------------


def test_attach_vm_unknown(proxy, connect):
    assert expect_error(connect().attach_vm, "nope") == "unknown containerID: nope"


def test_attach_vm_allocates_distinct_tokens(proxy, pod, connect):
    first = connect().attach_vm("pod1", num_io_streams=3)
    second = connect().attach_vm("pod1", num_io_streams=2)
    tokens = first.tokens + second.tokens
    assert len(tokens) == 5 and len(set(tokens)) == 5
    assert all(TOKEN_RE.match(t) for t in tokens)
    assert first.url == second.url == "unix://" + os.path.abspath(proxy.config.socket_path)
    assert registry(proxy)["tokens"] == 5


def test_attach_vm_response_shape_without_streams(proxy, pod, connect):
    raw = connect().call(Command.ATTACH_VM, {"containerId": "pod1"})
    assert json.loads(raw) == {"io": {"URL": "unix://" + os.path.abspath(proxy.config.socket_path),
                                      "tokens": None}}


def test_attach_vm_attaches_the_connection(pod, connect):
    client = connect()
    assert expect_error(client.hyper, "ping") == "client not attached to a vm"
    client.attach_vm("pod1")
    assert client.hyper("ping") == b""


def test_unregister_vm_unknown(proxy, connect):
    assert expect_error(connect().unregister_vm, "nope") == "unknown containerID: nope"


def test_unregister_vm_then_attach_is_unknown(proxy, pod, connect):
    runtime, _agent = pod
    runtime.unregister_vm("pod1")
    assert expect_error(connect().attach_vm, "pod1") == "unknown containerID: pod1"
    assert expect_error(runtime.unregister_vm, "pod1") == "unknown containerID: pod1"
    assert registry(proxy)["registered"] == []


# -- Hyper: refusals -------------------------------------------------------------------------------------


def test_hyper_not_attached(proxy, connect):
    assert expect_error(connect().hyper, "ping") == "client not attached to a vm"


@pytest.mark.parametrize("name", ["finishpod", "nosuchthing", "getpod", "stoppod", "restartcontainer",
                                  "finishcmd", "processasyncevent", "PING", ""])
def test_hyper_unknown_command(pod, name):
    runtime, agent = pod
    assert expect_error(runtime.hyper, name) == f"unknown command '{name}'"
    assert runtime.hyper("ping") == b""
    assert agent.command_names() == ["ping"]


@pytest.mark.parametrize("count", [1, 2])
def test_hyper_tokens_for_a_command_that_needs_none(pod, connect, count):
    runtime, agent = pod
    tokens = connect().attach_vm("pod1", num_io_streams=count).tokens
    text = expect_error(runtime.hyper, "killcontainer", {"container": "c"}, tokens=tokens)
    assert text == f"killcontainer doesn't need tokens but {count} token(s) were given"
    assert agent.commands == []


@pytest.mark.parametrize("name", ["newcontainer", "execcmd"])
def test_hyper_relocated_with_two_tokens(pod, connect, name):
    runtime, agent = pod
    tokens = connect().attach_vm("pod1", num_io_streams=2).tokens
    text = expect_error(runtime.hyper, name, {"id": "c1", "process": {"args": ["sh"]}}, tokens=tokens)
    assert text == "expected 0 or 1 token, got 2"
    assert agent.commands == []


def test_hyper_relocated_unknown_token(pod, connect):
    runtime, agent = pod
    bogus = "A" * 43 + "="
    text = expect_error(runtime.hyper, "newcontainer", {"id": "c1", "process": {}}, tokens=[bogus])
    assert text == f"unknown token {bogus}"
    assert agent.commands == []


def test_hyper_relocated_token_of_another_vm(pod, connect):
    runtime, agent = pod
    with running_agent() as other:
        foreign = connect().register_vm("pod2", other.ctl_path, other.io_path, num_io_streams=1).tokens[0]
        text = expect_error(runtime.hyper, "execcmd", {"container": "c1", "process": {}}, tokens=[foreign])
        assert text == f"unknown token {foreign}"
        assert agent.commands == [] and other.commands == []


@pytest.mark.parametrize(("key", "label"), [("stdio", "Stdio"), ("stderr", "Stderr")])
def test_hyper_relocated_prefilled_sequence_numbers(pod, key, label):
    runtime, agent = pod
    text = expect_error(runtime.hyper, "newcontainer", {"id": "c1", "process": {key: 5}})
    assert text == f"expected process.{label} to be 0, got 5"
    assert agent.commands == []


@pytest.mark.parametrize("data", [{"id": "c1"}, {"id": "c1", "process": None}, None, "text", 7])
@pytest.mark.parametrize("name", ["newcontainer", "execcmd"])
def test_hyper_relocated_without_process_is_an_error_not_a_crash(pod, connect, name, data):
    runtime, agent = pod
    with pytest.raises(ResponseError):
        runtime.hyper(name, data)
    assert agent.commands == []
    # Same connection, another connection: the proxy carries on.
    assert runtime.hyper("ping") == b""
    assert attached(connect).hyper("version") == b""


@pytest.mark.parametrize("name", ["newcontainer", "execcmd"])
def test_hyper_relocated_with_data_absent(pod, name):
    runtime, agent = pod
    with pytest.raises(ResponseError):
        runtime.hyper(name)
    assert runtime.hyper("ping") == b""
    assert agent.command_names() == ["ping"]


# -- Hyper: relocation -----------------------------------------------------------------------------------

PROCESS = {"user": "root", "args": ["sh", "-c", "echo hi"], "envs": [{"env": "A", "value": "1"}],
           "workdir": "/", "futureProcessField": {"nested": [1, 2.5, None, True]}}
DATA = {"id": "c1", "rootfs": "rootfs", "image": "img", "unknownTopLevel": {"keep": ["me"]}, "fsmap": [],
        "process": PROCESS}


def relocated(data, stdio, stderr=None):
    expected = json.loads(json.dumps(data))
    expected["process"]["stdio"] = stdio
    if stderr is not None:
        expected["process"]["stderr"] = stderr
    return expected


@pytest.mark.parametrize("name", ["newcontainer", "execcmd"])
def test_hyper_null_session_uses_1_and_2_and_does_not_wait(name):
    # shim_timeout is far beyond the client timeout: waiting for a shim would fail the call.
    with running_proxy(shim_timeout=60) as server, running_agent() as agent, \
            Client(server.config.socket_path, timeout=5) as runtime:
        runtime.register_vm("pod1", agent.ctl_path, agent.io_path)
        assert runtime.hyper(name, DATA) == b""
        assert agent.wait_command(name).json == relocated(DATA, 1, 2)


def test_hyper_relocation_keeps_every_other_field_exactly(pod, connect):
    runtime, agent = pod
    token = connect().attach_vm("pod1", num_io_streams=1).tokens[0]
    shim = connect()
    shim.connect_shim(token)
    assert runtime.hyper("newcontainer", DATA, tokens=[token]) == b""
    assert agent.wait_command("newcontainer").json == relocated(DATA, 3, 4)


def test_hyper_relocation_terminal_has_no_stderr(pod, connect):
    runtime, agent = pod
    data = dict(DATA, process=dict(PROCESS, terminal=True))
    assert runtime.hyper("execcmd", data) == b""
    received = agent.wait_command("execcmd").json
    assert received == relocated(data, 1)
    assert "stderr" not in received["process"]


def test_hyper_relocation_explicit_zero_and_terminal_false(pod):
    runtime, agent = pod
    data = dict(DATA, process=dict(PROCESS, terminal=False, stdio=0, stderr=0))
    runtime.hyper("newcontainer", data)
    assert agent.wait_command("newcontainer").json == relocated(data, 1, 2)


def test_hyper_relocation_bases_follow_token_order(pod, connect):
    runtime, agent = pod
    tokens = connect().attach_vm("pod1", num_io_streams=3).tokens
    shims = []
    for token in tokens:
        shim = connect()
        shim.connect_shim(token)
        shims.append(shim)
    for index, token in reversed(list(enumerate(tokens))):
        runtime.hyper("execcmd", {"container": "c1", "process": {"args": ["true"]}}, tokens=[token])
        base = 3 + 2 * index
        assert agent.commands[-1].json["process"] == {"args": ["true"], "stdio": base, "stderr": base + 1}


def test_hyper_with_token_waits_for_the_shim(pod, connect):
    runtime, agent = pod
    token = connect().attach_vm("pod1", num_io_streams=1).tokens[0]
    job = gevent.spawn(runtime.hyper, "newcontainer", DATA, tokens=[token])
    gevent.idle()  # the proxy reads the Hyper and starts waiting for the shim
    # A round trip on another connection of the same VM: ctl works, the Hyper is still held back.
    assert attached(connect).hyper("ping") == b""
    gevent.idle()
    assert not job.ready()
    assert "newcontainer" not in agent.command_names()
    shim = connect()
    shim.connect_shim(token)
    assert agent.wait_command("newcontainer").json == relocated(DATA, 3, 4)
    assert job.get(timeout=5) == b""


def test_hyper_with_token_times_out_without_a_shim():
    with running_proxy(shim_timeout=0.3) as server, running_agent() as agent, \
            Client(server.config.socket_path, timeout=5) as runtime:
        token = runtime.register_vm("pod1", agent.ctl_path, agent.io_path, num_io_streams=1).tokens[0]
        text = expect_error(runtime.hyper, "newcontainer", DATA, tokens=[token])
        assert text == f"timeout waiting for shim with token {token}"
        # A shim arriving late changes nothing: the command was never sent and left no reply slot.
        with Client(server.config.socket_path, timeout=5) as shim:
            shim.connect_shim(token)
            assert runtime.hyper("ping") == b""
        assert agent.command_names() == ["ping"]


# -- Hyper: replies --------------------------------------------------------------------------------------


def test_hyper_returns_the_ack_payload_verbatim(pod):
    runtime, agent = pod
    payload = b'{"pid": 1, "cmd": "sh"}\n\x00\xff not even json'
    agent.reply_with("pscontainer", ack=payload)
    assert runtime.hyper("pscontainer", {"container": "c1", "format": "json", "psArgs": ["-ef"]}) == payload
    assert agent.wait_command("pscontainer").json == {"container": "c1", "format": "json", "psArgs": ["-ef"]}


def test_hyper_empty_ack(pod):
    runtime, _agent = pod
    assert runtime.hyper("startpod", {"hostname": "h"}) == b""


def test_hyper_data_absent_sends_an_empty_payload(pod):
    runtime, agent = pod
    runtime.hyper("ping")
    assert agent.wait_command("ping").payload == b""


def test_hyper_agent_error(pod):
    runtime, agent = pod
    agent.reply_with("killcontainer", error=b"no such container c9")
    text = expect_error(runtime.hyper, "killcontainer", {"container": "c9", "signal": 9})
    assert text == "ERROR received from VM agent, control msg received : no such container c9"
    assert runtime.hyper("ping") == b""


def test_hyper_message_too_long_leaves_no_reply_slot(pod):
    runtime, agent = pod
    data = "x" * 10240
    length = 8 + len(encode_json(data))
    assert expect_error(runtime.hyper, "writefile", data) == f"message too long {length}"
    assert expect_error(runtime.hyper, "finishpod") == "unknown command 'finishpod'"
    agent.reply_with("version", ack=b"v1")
    assert runtime.hyper("version") == b"v1"
    assert runtime.hyper("ping") == b""
    assert agent.command_names() == ["version", "ping"]


def test_hyper_largest_message_that_fits(pod):
    runtime, agent = pod
    data = "y" * (10240 - 8 - 2)  # the JSON string adds two quotes
    assert runtime.hyper("writefile", data) == b""
    assert len(agent.wait_command("writefile").payload) == 10240 - 8


def test_concurrent_hyper_from_several_clients_each_get_their_own_reply(pod, connect):
    _runtime, agent = pod
    names = ["version", "ping", "pscontainer", "readfile", "onlinecpumem", "setuproute"]
    gate = gevent.event.Event()
    agent.reply_with(names[0], ack=b"reply-" + names[0].encode(), delay_event=gate)
    for name in names[1:]:
        agent.reply_with(name, ack=b"reply-" + name.encode())
    clients = [attached(connect) for _ in names]
    jobs = [gevent.spawn(clients[0].hyper, names[0])]
    agent.wait_command(names[0])
    jobs += [gevent.spawn(client.hyper, name) for client, name in zip(clients[1:], names[1:], strict=True)]
    for name in names:
        agent.wait_command(name)
    assert not any(job.ready() for job in jobs)  # every reply is held back behind the first one
    gate.set()
    gevent.joinall(jobs, timeout=5, raise_error=True)
    assert [job.value for job in jobs] == [b"reply-" + name.encode() for name in names]


def test_concurrent_hyper_stress(pod, connect):
    _runtime, agent = pod
    names = ["version", "ping", "pscontainer", "readfile", "onlinecpumem"]
    for name in names:
        agent.reply_with(name, ack=name.encode())

    def worker(client, offset):
        for i in range(40):
            name = names[(offset + i) % len(names)]
            assert client.hyper(name) == name.encode()

    jobs = [gevent.spawn(worker, attached(connect), n) for n in range(len(names))]
    gevent.joinall(jobs, timeout=20, raise_error=True)
    assert all(job.successful() for job in jobs)
    assert len(agent.commands) == 40 * len(names)


def test_next_and_async_events_are_not_replies(pod):
    runtime, agent = pod
    gate = gevent.event.Event()
    agent.reply_with("ping", ack=b"pong", delay_event=gate)
    job = gevent.spawn(runtime.hyper, "ping")
    agent.wait_command("ping")
    agent.send_ctl(AgentCode.NEXT, b"\0\0\x10\0")
    agent.send_ctl(AgentCode.PROCESSASYNCEVENT, b'{"container": "c1", "process": "init", "event": "exit"}')
    agent.send_ctl(AgentCode.NEXT, b"")
    gate.set()
    assert job.get(timeout=5) == b"pong"
    agent.reply_with("ping", ack=b"pong2")
    assert runtime.hyper("ping") == b"pong2"


def test_undecodable_agent_events_are_logged_and_ignored(pod):
    runtime, agent = pod
    agent.send_ctl(AgentCode.PROCESSASYNCEVENT, b"\xff\xfe{not json")
    agent.send_ctl(AgentCode.PROCESSASYNCEVENT, b"")
    agent.send_ctl(99, b"\x00garbage")
    agent.send_ctl(AgentCode.READY)
    agent.reply_with("version", ack=b"after")
    assert runtime.hyper("version") == b"after"
    assert runtime.hyper("ping") == b""


def test_ctl_death_fails_a_waiting_hyper_at_once(pod, connect):
    runtime, agent = pod
    agent.reply_with("ping", ack=None, error=None)  # never answered
    job = gevent.spawn(expect_error, runtime.hyper, "ping")
    agent.wait_command("ping")
    assert not job.ready()
    agent.close_ctl()
    text = job.get(timeout=3)  # the client's own timeout is 5 s: an error response, not a timeout
    assert "ctl" in text
    # Later commands on that VM fail at once too, instead of hanging.
    assert expect_error(attached(connect).hyper, "version")


def test_ctl_death_with_delayed_reply(pod):
    runtime, agent = pod
    gate = gevent.event.Event()
    agent.reply_with("readfile", ack=b"late", delay_event=gate)
    job = gevent.spawn(expect_error, runtime.hyper, "readfile", {"container": "c1", "file": "/etc/hosts"})
    agent.wait_command("readfile")
    agent.close_ctl()
    assert job.get(timeout=3)
    gate.set()


# -- log stream ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", [
    {"source": "runtime", "level": "info", "msg": "hello"},
    {"source": "shim", "level": "debug", "msg": "x", "containerId": "c1"},
    {"source": "runtime", "level": "warn", "msg": "careful", "extra": 1},
    {"source": "shim", "level": "error", "msg": "bad"},
])
def test_log_valid_entry_keeps_the_connection(proxy, connect, entry):
    client = connect()
    client.send_frame(FrameType.STREAM, Stream.LOG, encode_json(entry))
    assert_serving(client)
    client.log("runtime", "info", "second line")
    assert_serving(client)


@pytest.mark.parametrize("payload", [
    {"source": "kernel", "level": "info", "msg": "m"},
    {"level": "info", "msg": "m"},
    {"source": "runtime", "level": "trace", "msg": "m"},
    {"source": "runtime", "level": "warning", "msg": "m"},
    {"source": "runtime", "msg": "m"},
    {"source": "runtime", "level": "info", "msg": ""},
    {"source": "runtime", "level": "info"},
    b"not json",
    b"[1, 2]",
])
def test_log_invalid_entry_drops_only_that_client(pod, connect, payload):
    runtime, _agent = pod
    other = connect()
    bad = connect()
    data = payload if isinstance(payload, bytes) else encode_json(payload)
    bad.send_frame(FrameType.STREAM, Stream.LOG, data)
    assert assert_dropped(bad) == []
    assert_serving(other)
    assert runtime.hyper("ping") == b""


@pytest.mark.parametrize(("level", "loguru_level"), [("debug", "DEBUG"), ("info", "INFO"), ("warn", "WARNING"),
                                                     ("error", "ERROR")])
def test_log_entry_is_written_at_its_level_with_fields(proxy, connect, log_records, level, loguru_level):
    client = connect()
    client.log("shim", level, f"entry at {level}", container_id="c42")
    assert_serving(client)  # the entry, sent before, has been handled
    matching = [r for r in log_records if r["message"] == f"entry at {level}"]
    assert len(matching) == 1
    record = matching[0]
    assert record["level"].name == loguru_level
    assert record["extra"]["source"] == "shim"
    assert record["extra"]["container"] == "c42"
