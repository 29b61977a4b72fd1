"""The client library against a tiny scripted peer (no proxy involved)."""

import json
import os
import socket

import gevent
import pytest
from fake_agent import short_tempdir

from cc_proxy.client import Client, IoInfo, ResponseError, response_message, socket_path
from cc_proxy.errors import PeerProtocolError
from cc_proxy.frames import Command, Frame, FrameDecoder, FrameType, Notification, Stream, encode

pytestmark = pytest.mark.timeout(30)


class Peer:
    """The proxy's side: one accepted connection, a decoder, helpers to answer."""

    def __init__(self, sock):
        self.sock = sock
        self.sock.settimeout(5)
        self.decoder = FrameDecoder()
        self.queue = []

    def read(self) -> Frame:
        while not self.queue:
            data = self.sock.recv(65536)
            assert data, "EOF from the client"
            self.queue += self.decoder.feed(data)
        return self.queue.pop(0)

    def read_json(self):
        frame = self.read()
        return frame, json.loads(frame.payload) if frame.payload else None

    def respond(self, opcode, payload=b"", error=False):
        self.sock.sendall(encode(FrameType.RESPONSE, opcode, payload, error))

    def fail(self, opcode, msg):
        self.respond(opcode, json.dumps({"msg": msg}).encode(), error=True)

    def stdout(self, data):
        self.sock.sendall(encode(FrameType.STREAM, Stream.STDOUT, data))

    def stderr(self, data):
        self.sock.sendall(encode(FrameType.STREAM, Stream.STDERR, data))

    def exit(self, code):
        self.sock.sendall(encode(FrameType.NOTIFICATION, Notification.PROCESS_EXITED, bytes([code])))


@pytest.fixture
def sockdir():
    with short_tempdir("ccc") as directory:
        yield directory


@pytest.fixture
def pair(sockdir):
    """A connected (client, peer)."""
    path = os.path.join(sockdir, "proxy.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    accepting = gevent.spawn(listener.accept)
    client = Client("unix://" + path, timeout=5)
    peer = Peer(accepting.get(timeout=5)[0])
    yield client, peer
    client.close()
    peer.sock.close()
    listener.close()


def serve(func, *args):
    """Run a peer script in a greenlet; the test joins it with .get() to see its failures."""
    return gevent.spawn(func, *args)


def test_socket_path():
    assert socket_path("unix:///run/cc/proxy.sock") == "/run/cc/proxy.sock"
    assert socket_path("/run/cc/proxy.sock") == "/run/cc/proxy.sock"


def test_response_message():
    assert response_message(b'{"msg":"unknown token: x"}') == "unknown token: x"
    assert response_message(b"not json") == "not json"


def test_response_error_text():
    error = ResponseError("client isn't a shim", Command.SIGNAL)
    assert str(error) == error.message == "client isn't a shim"
    assert error.opcode == Command.SIGNAL


def test_call_returns_response_and_queues_stream_frames(pair):
    client, peer = pair

    def script():
        frame, body = peer.read_json()
        assert (frame.type, frame.opcode, body) == (FrameType.COMMAND, Command.HYPER, {"hyperName": "ping"})
        peer.stdout(b"early out")
        peer.stderr(b"early err")
        peer.respond(Command.HYPER, b"pong")
        peer.exit(3)

    peer_task = serve(script)
    assert client.call(Command.HYPER, {"hyperName": "ping"}) == b"pong"
    peer_task.get(timeout=5)
    assert client.read_event() == ("stdout", b"early out")
    assert client.read_event() == ("stderr", b"early err")
    assert client.read_event() == ("exit", 3)


def test_call_raises_response_error(pair):
    client, peer = pair

    def script():
        peer.read()
        peer.fail(Command.ATTACH_VM, "unknown containerID: nope")

    peer_task = serve(script)
    with pytest.raises(ResponseError) as info:
        client.attach_vm("nope")
    assert str(info.value) == "unknown containerID: nope"
    assert info.value.opcode == Command.ATTACH_VM
    peer_task.get(timeout=5)


def test_register_attach_and_io_info(pair):
    client, peer = pair

    def script():
        frame, body = peer.read_json()
        assert frame.opcode == Command.REGISTER_VM
        assert body == {"containerId": "pod", "ctlSerial": "/c", "ioSerial": "/i", "console": "/k",
                        "numIOStreams": 0}
        peer.respond(Command.REGISTER_VM, b'{"io":{"URL":"unix:///p.sock","tokens":null}}')
        frame, body = peer.read_json()
        assert (frame.opcode, body) == (Command.ATTACH_VM, {"containerId": "pod", "numIOStreams": 2})
        peer.respond(Command.ATTACH_VM, b'{"io":{"URL":"unix:///p.sock","tokens":["a","b"]}}')
        frame, body = peer.read_json()
        assert (frame.opcode, body) == (Command.UNREGISTER_VM, {"containerId": "pod"})
        peer.respond(Command.UNREGISTER_VM)

    peer_task = serve(script)
    assert client.register_vm("pod", "/c", "/i", console="/k") == IoInfo("unix:///p.sock", [])
    assert client.attach_vm("pod", 2) == IoInfo("unix:///p.sock", ["a", "b"])
    client.unregister_vm("pod")
    peer_task.get(timeout=5)


def test_register_without_console_omits_it(pair):
    client, peer = pair

    def script():
        _, body = peer.read_json()
        assert "console" not in body
        peer.respond(Command.REGISTER_VM, b'{"io":{"URL":"unix:///p.sock","tokens":null}}')

    peer_task = serve(script)
    client.register_vm("pod", "/c", "/i")
    peer_task.get(timeout=5)


def test_malformed_io_response(pair):
    client, peer = pair

    def script():
        peer.read()
        peer.respond(Command.ATTACH_VM, b"{}")

    peer_task = serve(script)
    with pytest.raises(PeerProtocolError, match="malformed io response"):
        client.attach_vm("pod")
    peer_task.get(timeout=5)


def test_hyper_payloads(pair):
    client, peer = pair

    def script():
        bodies = []
        for _ in range(3):
            _, body = peer.read_json()
            bodies.append(body)
            peer.respond(Command.HYPER, b"ack")
        return bodies

    peer_task = serve(script)
    assert client.hyper("startpod", {"hostname": "h"}) == b"ack"
    assert client.hyper("newcontainer", {"id": "c", "process": {}}, tokens=["t"]) == b"ack"
    assert client.hyper("ping", None) == b"ack"
    assert peer_task.get(timeout=5) == [
        {"hyperName": "startpod", "data": {"hostname": "h"}},
        {"hyperName": "newcontainer", "tokens": ["t"], "data": {"id": "c", "process": {}}},
        {"hyperName": "ping", "data": None},
    ]


def test_hyper_without_data_sends_no_data_key(pair):
    client, peer = pair

    def script():
        _, body = peer.read_json()
        peer.respond(Command.HYPER)
        return body

    peer_task = serve(script)
    assert client.hyper("destroypod") == b""
    assert peer_task.get(timeout=5) == {"hyperName": "destroypod"}


def test_shim_flow_connect_without_waiting_then_output(pair):
    client, peer = pair

    def script():
        frame, body = peer.read_json()
        assert (frame.opcode, body) == (Command.CONNECT_SHIM, {"token": "tok"})
        assert peer.read() == Frame(FrameType.STREAM, Stream.STDIN, b"input")
        assert peer.read() == Frame(FrameType.STREAM, Stream.STDIN, b"")
        peer.stdout(b"out1 ")
        peer.respond(Command.CONNECT_SHIM)
        peer.stderr(b"warn")
        peer.stdout(b"out2")
        peer.exit(7)
        assert peer.read() == Frame(FrameType.COMMAND, Command.DISCONNECT_SHIM)

    peer_task = serve(script)
    client.connect_shim("tok", wait=False)
    client.send_stdin(b"input")
    client.send_stdin(b"")
    assert client.read_output_until_exit() == (b"out1 out2", b"warn", 7)
    client.disconnect_shim()
    peer_task.get(timeout=5)


def test_read_output_until_exit_raises_on_error_response(pair):
    client, peer = pair

    def script():
        peer.read()
        peer.fail(Command.CONNECT_SHIM, "unknown token: tok")

    peer_task = serve(script)
    client.connect_shim("tok", wait=False)
    with pytest.raises(ResponseError, match="^unknown token: tok$"):
        client.read_output_until_exit()
    peer_task.get(timeout=5)


def test_read_output_until_exit_eof(pair):
    client, peer = pair
    peer.stdout(b"partial")
    peer.sock.close()
    with pytest.raises(ConnectionError, match="partial"):
        client.read_output_until_exit()


def test_call_after_fire_and_forget_gets_its_own_response(pair):
    client, peer = pair

    def script():
        assert peer.read().opcode == Command.CONNECT_SHIM
        frame, body = peer.read_json()
        assert (frame.opcode, body) == (Command.SIGNAL, {"signalNumber": 28, "columns": 80, "rows": 24})
        peer.fail(Command.CONNECT_SHIM, "token already claimed: tok")
        peer.respond(Command.SIGNAL)

    peer_task = serve(script)
    client.connect_shim("tok", wait=False)
    client.signal(28, columns=80, rows=24)  # the Signal response, not the ConnectShim error
    with pytest.raises(ResponseError, match="token already claimed: tok"):
        client.read_response()
    peer_task.get(timeout=5)


def test_signal_error_and_payload(pair):
    client, peer = pair

    def script():
        _, body = peer.read_json()
        assert body == {"signalNumber": 15}
        peer.fail(Command.SIGNAL, "client isn't a shim")

    peer_task = serve(script)
    with pytest.raises(ResponseError, match="^client isn't a shim$"):
        client.signal(15)
    peer_task.get(timeout=5)


def test_read_event_returns_responses_too(pair):
    client, peer = pair
    client.send_command(Command.DISCONNECT_SHIM)
    peer.respond(Command.DISCONNECT_SHIM)
    kind, frame = client.read_event()
    assert kind == "response"
    assert frame == Frame(FrameType.RESPONSE, Command.DISCONNECT_SHIM)


def test_log_frame(pair):
    client, peer = pair
    client.log("shim", "info", "hello", container_id="c")
    client.log("runtime", "debug", "m")
    first, second = peer.read(), peer.read()
    assert (first.type, first.opcode) == (FrameType.STREAM, Stream.LOG)
    assert json.loads(first.payload) == {"source": "shim", "level": "info", "msg": "hello", "containerId": "c"}
    assert json.loads(second.payload) == {"source": "runtime", "level": "debug", "msg": "m"}


def test_send_frame_with_longer_header_and_raw(pair):
    client, peer = pair
    client.send_frame(FrameType.COMMAND, Command.HYPER, b"{}", header_words=5)
    client.send_raw(encode(FrameType.STREAM, Stream.STDIN, b"raw"))
    assert peer.read() == Frame(FrameType.COMMAND, Command.HYPER, b"{}")
    assert peer.read() == Frame(FrameType.STREAM, Stream.STDIN, b"raw")


def test_read_frame_split_delivery_and_eof(pair):
    client, peer = pair
    data = encode(FrameType.STREAM, Stream.STDOUT, b"x" * 100_000) + encode(FrameType.STREAM, Stream.STDERR, b"e")

    def script():
        for i in range(0, len(data), 777):
            peer.sock.sendall(data[i:i + 777])
        peer.sock.close()

    peer_task = serve(script)
    assert client.read_frame() == Frame(FrameType.STREAM, Stream.STDOUT, b"x" * 100_000)
    assert client.read_frame() == Frame(FrameType.STREAM, Stream.STDERR, b"e")
    assert client.read_frame() is None
    assert client.read_event() is None
    peer_task.get(timeout=5)


def test_read_frame_timeout(pair):
    client, _ = pair
    with pytest.raises(TimeoutError):
        client.read_frame(timeout=0.05)


def test_timeout_keeps_partial_frame(pair):
    client, peer = pair
    data = encode(FrameType.STREAM, Stream.STDOUT, b"hello")
    peer.sock.sendall(data[:7])
    with pytest.raises(TimeoutError):
        client.read_frame(timeout=0.05)
    peer.sock.sendall(data[7:])
    assert client.read_frame() == Frame(FrameType.STREAM, Stream.STDOUT, b"hello")


def test_eof_inside_a_frame(pair):
    client, peer = pair
    peer.sock.sendall(encode(FrameType.STREAM, Stream.STDOUT, b"hello")[:-1])
    peer.sock.close()
    with pytest.raises(PeerProtocolError, match="closed inside a frame"):
        client.read_frame()


def test_call_raises_when_peer_closes(pair):
    client, peer = pair

    def script():
        peer.read()
        peer.sock.close()

    peer_task = serve(script)
    with pytest.raises(ConnectionError, match="before responding"):
        client.unregister_vm("pod")
    peer_task.get(timeout=5)


def test_bad_frame_from_peer(pair):
    client, peer = pair
    peer.sock.sendall(b"\x00\x01" + b"\x00" * 10)
    with pytest.raises(PeerProtocolError, match="frame: bad version 1"):
        client.read_event()


def test_context_manager_closes(sockdir):
    path = os.path.join(sockdir, "p.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    with Client(path) as client:
        assert not client.closed
    assert client.closed
    client.close()
    listener.close()


def test_connect_retry_gives_up(sockdir):
    path = os.path.join(sockdir, "absent.sock")
    with pytest.raises(ConnectionError) as info:
        Client.connect_retry(path, attempts=3, interval=0.01)
    assert f"could not connect to {path} after 3 attempts" in str(info.value)
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_connect_retry_refused_socket(sockdir):
    path = os.path.join(sockdir, "dead.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)  # bound but never listening: connection refused
    with pytest.raises(ConnectionError, match="after 2 attempts"):
        Client.connect_retry("unix://" + path, attempts=2, interval=0.01)
    dead.close()


def test_connect_retry_succeeds_once_listening(sockdir):
    path = os.path.join(sockdir, "late.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def attempt():
        return Client.connect_retry(path, attempts=200, interval=0.01)

    dialer = gevent.spawn(attempt)
    gevent.sleep(0)  # the first attempt fails: nothing is bound yet
    listener.bind(path)
    listener.listen(1)
    client = dialer.get(timeout=5)
    assert not client.closed
    client.close()
    listener.close()


def test_connect_retry_needs_an_attempt():
    with pytest.raises(ValueError):
        Client.connect_retry("/nonexistent", attempts=0, interval=0.1)
