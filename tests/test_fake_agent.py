"""The fake hyperstart agent, driven over raw sockets the way the proxy drives the real one."""

import os
import socket

import gevent
import gevent.event
import pytest
from fake_agent import FakeAgent, running_agent, short_tempdir

from cc_proxy.agent_codec import AgentCode, CtlDecoder, IoDecoder, encode_ctl, encode_io

pytestmark = pytest.mark.timeout(30)


class Peer:
    """The proxy's side of one agent channel: a socket and a decoder."""

    def __init__(self, path, decoder):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.decoder = decoder
        self.queue = []

    def read(self):
        while not self.queue:
            data = self.sock.recv(65536)
            assert data, "EOF from the fake agent"
            self.queue += self.decoder.feed(data)
        return self.queue.pop(0)

    def at_eof(self):
        return not self.queue and self.sock.recv(65536) == b""

    def close(self):
        self.sock.close()


@pytest.fixture
def agent():
    with running_agent() as agent:
        yield agent


def connect(agent):
    ctl = Peer(agent.ctl_path, CtlDecoder())
    io = Peer(agent.io_path, IoDecoder())
    return ctl, io


def test_paths_are_short_and_inside_the_directory():
    with short_tempdir() as directory:
        agent = FakeAgent(directory)
        for path in (agent.ctl_path, agent.io_path, agent.console_path):
            assert os.path.dirname(path) == directory
            assert len(path.encode()) < 108


def test_ready_on_ctl_accept(agent):
    ctl, io = connect(agent)
    assert ctl.read() == (AgentCode.READY, b"")
    agent.wait_connected("ctl")
    agent.wait_connected("io")
    ctl.close()
    io.close()


def test_no_ready_when_told():
    with running_agent(send_ready=False) as agent:
        ctl, _ = connect(agent)
        agent.wait_connected("ctl")
        agent.send_ctl(AgentCode.PING)  # the first message the proxy sees is not READY
        assert ctl.read() == (AgentCode.PING, b"")


def test_commands_recorded_and_answered_in_order(agent):
    ctl, _ = connect(agent)
    assert ctl.read()[0] == AgentCode.READY
    agent.reply_with("pscontainer", ack=b'{"ps":1}')
    agent.reply_with("killcontainer", error=b"no such container")
    ctl.sock.sendall(encode_ctl(AgentCode.STARTPOD, b'{"hostname":"h"}') + encode_ctl(AgentCode.PSCONTAINER, b"{}")
                     + encode_ctl(AgentCode.KILLCONTAINER, b'{"signal":9}') + encode_ctl(AgentCode.PING))
    assert ctl.read() == (AgentCode.ACK, b"")
    assert ctl.read() == (AgentCode.ACK, b'{"ps":1}')
    assert ctl.read() == (AgentCode.ERROR, b"no such container")
    assert ctl.read() == (AgentCode.ACK, b"")
    assert agent.command_names() == ["startpod", "pscontainer", "killcontainer", "ping"]
    assert agent.wait_command("killcontainer").json == {"signal": 9}
    assert agent.wait_command("startpod").code is AgentCode.STARTPOD
    assert agent.commands[3].json is None


def test_delayed_reply_holds_back_later_replies(agent):
    ctl, _ = connect(agent)
    ctl.read()
    release = gevent.event.Event()
    agent.reply_with("newcontainer", ack=b"first", delay_event=release)
    agent.reply_with("ping", ack=b"second")
    ctl.sock.sendall(encode_ctl(AgentCode.NEWCONTAINER, b"{}") + encode_ctl(AgentCode.PING))
    agent.wait_command("ping")  # both recorded while the first reply is held back
    ctl.sock.settimeout(0.05)
    with pytest.raises(TimeoutError):
        ctl.sock.recv(1)
    ctl.sock.settimeout(5)
    release.set()
    assert ctl.read() == (AgentCode.ACK, b"first")
    assert ctl.read() == (AgentCode.ACK, b"second")


def test_wait_command_by_index_and_timeout(agent):
    ctl, _ = connect(agent)
    ctl.read()
    ctl.sock.sendall(encode_ctl(AgentCode.PING) + encode_ctl(AgentCode.PING, b"2"))
    assert agent.wait_command("ping", index=1).payload == b"2"
    with pytest.raises(AssertionError, match="timed out .* 'ping' #2"):
        agent.wait_command("ping", timeout=0.1, index=2)


def test_wait_command_wakes_on_arrival(agent):
    ctl, _ = connect(agent)
    ctl.read()
    waiter = gevent.spawn(agent.wait_command, "destroypod")
    gevent.sleep(0)  # let it start waiting
    ctl.sock.sendall(encode_ctl(AgentCode.DESTROYPOD))
    assert waiter.get(timeout=5).name == "destroypod"


def test_injected_ctl_messages(agent):
    ctl, _ = connect(agent)
    ctl.read()
    agent.send_ctl(AgentCode.NEXT, b"\x00\x00\x00\x10")
    agent.send_ctl(AgentCode.PROCESSASYNCEVENT, b'{"container":"c","status":"exited"}')
    assert ctl.read() == (AgentCode.NEXT, b"\x00\x00\x00\x10")
    assert ctl.read()[0] == AgentCode.PROCESSASYNCEVENT
    agent.send_ctl_raw(b"\x00\x00\x00\x63\x00\x00\x00\x02")  # garbage: length below the header size
    assert ctl.sock.recv(100) == b"\x00\x00\x00\x63\x00\x00\x00\x02"


def test_stdin_recorded_per_sequence(agent):
    _, io = connect(agent)
    io.sock.sendall(encode_io(3, b"hel") + encode_io(4, b"x") + encode_io(3, b"lo") + encode_io(3, b""))
    assert agent.wait_stdin(3, 5) == b"hello"
    assert agent.wait_io_message(3, lambda p: p == b"") == b""
    assert agent.io_messages == [(3, b"hel"), (4, b"x"), (3, b"lo"), (3, b"")]
    assert bytes(agent.io_received[4]) == b"x"
    with pytest.raises(AssertionError, match="6 bytes on seq 3"):
        agent.wait_stdin(3, 6, timeout=0.1)


def test_output_injection_is_split_and_exit_follows(agent):
    _, io = connect(agent)
    agent.wait_connected("io")
    big = bytes(range(256)) * 100  # 25600 bytes: three messages
    agent.send_io(5, big)
    agent.send_io(6, b"err")
    agent.exit_process(5, 42)
    got = [io.read() for _ in range(6)]
    assert [len(p) for s, p in got[:3]] == [10228, 10228, 25600 - 2 * 10228]
    assert b"".join(p for _, p in got[:3]) == big
    assert got[3:] == [(6, b"err"), (5, b""), (5, b"\x2a")]


def test_console():
    with running_agent(console=True) as agent:
        console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        console.settimeout(5)
        console.connect(agent.console_path)
        agent.send_console(b"boot log\n")
        assert console.recv(100) == b"boot log\n"
        console.close()


def test_close_io_and_ctl_give_the_proxy_eof(agent):
    ctl, io = connect(agent)
    ctl.read()
    agent.wait_connected("io")
    agent.close_io()
    assert io.at_eof()
    agent.wait_io_closed()
    agent.close_ctl()
    assert ctl.at_eof()
    agent.wait_ctl_closed()


def test_agent_notices_proxy_closing(agent):
    ctl, io = connect(agent)
    agent.wait_connected("io")
    ctl.close()
    io.close()
    agent.wait_ctl_closed()
    agent.wait_io_closed()


def test_oversized_io_from_the_proxy_is_recorded_as_error(agent):
    _, io = connect(agent)
    io.sock.sendall(encode_io(3, b"x" * 20000))
    assert io.at_eof()
    assert agent.errors == ["io message: bad length 20012"]


def test_close_kills_everything_and_removes_sockets():
    with short_tempdir() as directory:
        agent = FakeAgent(directory, console=True)
        agent.start()
        ctl, io = connect(agent)
        ctl.read()
        agent.wait_connected("io")
        assert agent.greenlets >= 4
        agent.close()
        assert agent.greenlets == 0
        assert os.listdir(directory) == []
        assert ctl.at_eof()
        assert io.at_eof()
        agent.close()  # idempotent


def test_hung_agent_answers_nothing(agent):
    ctl, _ = connect(agent)
    ctl.read()
    agent.reply_with("ping", ack=None)
    ctl.sock.sendall(encode_ctl(AgentCode.PING) + encode_ctl(AgentCode.VERSION))
    agent.wait_command("version")
    ctl.sock.settimeout(0.05)
    with pytest.raises(TimeoutError):
        ctl.sock.recv(1)
