"""Client framing against a running proxy (SPEC.md section 2).

A frame the proxy cannot accept ends that client's connection and nothing
else: every test keeps a second client open across the bad frame and checks
the proxy still answers it (and a registered VM still works).
"""

import gevent
import pytest
from conftest import running_proxy
from fake_agent import running_agent
from helpers_runtime import assert_dropped, assert_serving, raw_header

from cc_proxy import frames
from cc_proxy.client import Client
from cc_proxy.frames import Command, FrameType, Notification, Stream
from cc_proxy.payloads import encode_json

pytestmark = pytest.mark.timeout(30)

ATTACH_NOPE = encode_json({"containerId": "nope"})


def attach_frame(words: int = 3) -> bytes:
    return raw_header(words=words, ftype=FrameType.COMMAND, opcode=Command.ATTACH_VM,
                      length=len(ATTACH_NOPE)) + ATTACH_NOPE


BAD_HEADERS = {
    "version 1": raw_header(version=1),
    "version 3": raw_header(version=3),
    "version 0xffff": raw_header(version=0xFFFF),
    "type 4": raw_header(ftype=4),
    "type 15": raw_header(ftype=15),
    "command opcode 7": raw_header(ftype=FrameType.COMMAND, opcode=7),
    "command opcode 255": raw_header(ftype=FrameType.COMMAND, opcode=255),
    "stream opcode 4": raw_header(ftype=FrameType.STREAM, opcode=4),
    "notification opcode 1": raw_header(ftype=FrameType.NOTIFICATION, opcode=1),
    "header length 0": raw_header(words=0),
    "header length 2": raw_header(words=2),
    "payload 4 GiB": raw_header(ftype=FrameType.COMMAND, opcode=Command.ATTACH_VM, length=0xFFFFFFFF),
}


@pytest.mark.parametrize("data", list(BAD_HEADERS.values()), ids=list(BAD_HEADERS))
def test_bad_header_drops_only_that_client(proxy, connect, data):
    other = connect()
    assert_serving(other)
    bad = connect()
    bad.send_raw(data)
    assert assert_dropped(bad) == []
    assert_serving(other)
    assert_serving(connect())


def test_bad_frame_after_good_ones_drops_the_client_after_answering_them(proxy, connect):
    bad = connect()
    bad.send_raw(attach_frame() + attach_frame() + raw_header(version=9))
    responses = assert_dropped(bad)
    # Responses already queued may or may not make it before the close; none may be wrong.
    for frame in responses:
        assert frame.type == FrameType.RESPONSE and frame.error and frame.opcode == Command.ATTACH_VM
    assert_serving(connect())


def test_payload_over_max_payload_drops_the_client():
    with running_proxy(max_payload=1024) as server, Client(server.config.socket_path, timeout=5) as other, \
            Client(server.config.socket_path, timeout=5) as big:
        assert_serving(other)
        big.send_frame(FrameType.STREAM, Stream.LOG, b"x" * 1025)
        assert assert_dropped(big) == []
        assert_serving(other)


def test_payload_at_max_payload_is_accepted():
    with running_proxy(max_payload=1024) as server, Client(server.config.socket_path, timeout=5) as client:
        payload = encode_json({"containerId": "n" * 1000})
        payload += b" " * (1024 - len(payload))  # JSON allows trailing blanks
        assert len(payload) == 1024
        client.send_frame(FrameType.COMMAND, Command.ATTACH_VM, payload)
        frame = client.read_frame()
        assert frame.type == FrameType.RESPONSE and frame.error
        assert_serving(client)


def test_oversized_header_alone_is_enough_to_drop():
    """The proxy refuses on the header: it does not wait for (or buffer) the announced payload."""
    with running_proxy(max_payload=1024) as server, Client(server.config.socket_path, timeout=5) as big:
        big.send_raw(raw_header(ftype=FrameType.COMMAND, opcode=Command.HYPER, length=1 << 30))
        assert assert_dropped(big) == []


@pytest.mark.parametrize("words", [4, 5, 16])
def test_longer_header_is_accepted(proxy, connect, words):
    client = connect()
    client.send_frame(FrameType.COMMAND, Command.ATTACH_VM, ATTACH_NOPE, header_words=words)
    frame = client.read_frame()
    assert frame.type == FrameType.RESPONSE and frame.error and frame.opcode == Command.ATTACH_VM
    assert frame.payload == encode_json({"msg": "unknown containerID: nope"})
    assert_serving(client)


def test_longer_header_with_nonzero_padding_is_skipped(proxy, connect):
    client = connect()
    header = frames.HEADER.pack(frames.VERSION, 5, 0, 0, FrameType.COMMAND, Command.ATTACH_VM, len(ATTACH_NOPE))
    client.send_raw(header + b"\xde\xad\xbe\xef" * 2 + ATTACH_NOPE)
    frame = client.read_frame()
    assert frame.error and frame.payload == encode_json({"msg": "unknown containerID: nope"})


@pytest.mark.parametrize("words", [3, 4])
def test_frame_in_one_byte_pieces(proxy, connect, words):
    client = connect()
    data = attach_frame(words) * 2
    for index in range(len(data)):
        client.send_raw(data[index:index + 1])
        gevent.idle()  # the proxy reads each piece on its own (checked: 1-byte reads)
    for _ in range(2):
        frame = client.read_frame()
        assert frame.type == FrameType.RESPONSE and frame.error
        assert frame.payload == encode_json({"msg": "unknown containerID: nope"})
    assert_serving(client)


@pytest.mark.parametrize("split", [1, 2, 5, 7, 8, 11, 12, 13])
def test_frame_split_at_any_offset(proxy, connect, split):
    client = connect()
    data = attach_frame()
    client.send_raw(data[:split])
    gevent.idle()
    client.send_raw(data[split:])
    frame = client.read_frame()
    assert frame.error and frame.payload == encode_json({"msg": "unknown containerID: nope"})


def test_many_frames_in_one_write(proxy, connect):
    client = connect()
    client.send_raw(attach_frame() * 50)
    for _ in range(50):
        frame = client.read_frame()
        assert frame.type == FrameType.RESPONSE and frame.error and frame.opcode == Command.ATTACH_VM


FORBIDDEN = {
    "response": (FrameType.RESPONSE, Command.ATTACH_VM, b"{}", False),
    "error response": (FrameType.RESPONSE, Command.HYPER, encode_json({"msg": "x"}), True),
    "notification": (FrameType.NOTIFICATION, Notification.PROCESS_EXITED, b"\0", False),
    "stdout stream": (FrameType.STREAM, Stream.STDOUT, b"out", False),
    "stderr stream": (FrameType.STREAM, Stream.STDERR, b"err", False),
}


@pytest.mark.parametrize("frame", list(FORBIDDEN.values()), ids=list(FORBIDDEN))
def test_frames_a_client_may_not_send_drop_it(proxy, agent, connect, frame):
    runtime = connect()
    runtime.register_vm("pod1", agent.ctl_path, agent.io_path)
    bad = connect()
    bad.attach_vm("pod1")
    ftype, opcode, payload, error = frame
    bad.send_frame(ftype, opcode, payload, error=error)
    assert assert_dropped(bad) == []
    assert runtime.hyper("ping") == b""
    assert_serving(connect())


def test_stdin_from_a_non_shim_drops_it(proxy, connect):
    other = connect()
    bad = connect()
    bad.send_stdin(b"hello")
    assert assert_dropped(bad) == []
    assert_serving(other)


def test_a_dropped_client_does_not_disturb_a_vm_or_its_shim(proxy, connect):
    with running_agent() as agent:
        runtime = connect()
        token = runtime.register_vm("pod1", agent.ctl_path, agent.io_path, num_io_streams=1).tokens[0]
        shim = connect()
        shim.connect_shim(token)
        bad = connect()
        bad.send_raw(raw_header(version=1))
        assert_dropped(bad)
        runtime.hyper("newcontainer", {"id": "c1", "process": {"args": ["sh"]}}, tokens=[token])
        agent.send_io(3, b"still here")
        assert shim.read_event() == ("stdout", b"still here")
