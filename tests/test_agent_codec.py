"""Hyperstart ctl and io message codecs (SPEC.md section 5)."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cc_proxy import agent_codec
from cc_proxy.agent_codec import (
    MAX_MESSAGE,
    AgentCode,
    CtlDecoder,
    IoDecoder,
    command_code,
    encode_ctl,
    encode_io,
    encode_io_split,
)
from cc_proxy.errors import PeerProtocolError, ProxyError

pytestmark = pytest.mark.timeout(30)

SPEC_CODES = {
    "version": 0, "startpod": 1, "getpod": 2, "stoppod": 3, "destroypod": 4, "restartcontainer": 5,
    "execcmd": 6, "finishcmd": 7, "ready": 8, "ack": 9, "error": 10, "winsize": 11, "ping": 12,
    "finishpod": 13, "next": 14, "writefile": 15, "readfile": 16, "newcontainer": 17, "killcontainer": 18,
    "onlinecpumem": 19, "setupinterface": 20, "setuproute": 21, "removecontainer": 22, "pscontainer": 23,
    "processasyncevent": 24,
}
CLIENT_NAMES = [
    "version", "startpod", "destroypod", "execcmd", "ready", "ack", "error", "winsize", "ping", "next",
    "writefile", "readfile", "newcontainer", "killcontainer", "onlinecpumem", "setupinterface", "setuproute",
    "removecontainer", "pscontainer",
]


def test_codes_match_spec():
    assert {code.name.lower(): int(code) for code in AgentCode} == SPEC_CODES


@pytest.mark.parametrize("name", CLIENT_NAMES)
def test_command_code_for_client_names(name):
    assert command_code(name) == SPEC_CODES[name]


@pytest.mark.parametrize(
    "name",
    ["finishpod", "getpod", "stoppod", "restartcontainer", "finishcmd", "processasyncevent", "", "NEWCONTAINER",
     "bogus", " ping"],
)
def test_command_code_refuses_other_names(name):
    with pytest.raises(ProxyError) as info:
        command_code(name)
    assert str(info.value) == f"unknown command '{name}'"


@pytest.mark.parametrize("name", [None, 3, ["ping"]])
def test_command_code_refuses_non_strings(name):
    with pytest.raises(ProxyError, match="unknown command"):
        command_code(name)


# -- ctl --------------------------------------------------------------------------------------------------

def test_ctl_layout():
    assert encode_ctl(AgentCode.PING) == struct.pack(">II", 12, 8)
    assert encode_ctl(AgentCode.NEWCONTAINER, b"{}") == struct.pack(">II", 17, 10) + b"{}"


@pytest.mark.parametrize("payload", [b"", b"{}", b"x" * 1000, b"y" * (MAX_MESSAGE - 8)])
@pytest.mark.parametrize("code", [AgentCode.READY, AgentCode.ACK, AgentCode.ERROR, AgentCode.PROCESSASYNCEVENT])
def test_ctl_round_trip(code, payload):
    assert CtlDecoder().feed(encode_ctl(code, payload)) == [(code, payload)]


def test_encode_ctl_too_long():
    encode_ctl(AgentCode.WRITEFILE, b"x" * (MAX_MESSAGE - 8))
    with pytest.raises(ProxyError) as info:
        encode_ctl(AgentCode.WRITEFILE, b"x" * (MAX_MESSAGE - 7))
    assert str(info.value) == f"message too long {MAX_MESSAGE + 1}"
    with pytest.raises(ProxyError, match="^message too long 20008$"):
        encode_ctl(AgentCode.WRITEFILE, b"x" * 20000)


def test_encode_ctl_custom_limit():
    with pytest.raises(ProxyError, match="^message too long 11$"):
        encode_ctl(AgentCode.PING, b"abc", max_message=10)


CTL_MESSAGES = [(AgentCode.READY, b""), (AgentCode.ACK, b'{"a":1}'), (AgentCode.NEXT, b"\x00\x00\x00\x05"),
                (AgentCode.ERROR, b"bad"), (AgentCode.ACK, b"")]
CTL_STREAM = b"".join(encode_ctl(code, payload) for code, payload in CTL_MESSAGES)


@pytest.mark.parametrize("offset", range(len(CTL_STREAM) + 1))
def test_ctl_split_at_every_offset(offset):
    decoder = CtlDecoder()
    assert decoder.feed(CTL_STREAM[:offset]) + decoder.feed(CTL_STREAM[offset:]) == CTL_MESSAGES


@pytest.mark.parametrize("length", [0, 1, 7, MAX_MESSAGE + 1, 0xFFFFFFFF])
def test_ctl_bad_length(length):
    with pytest.raises(PeerProtocolError) as info:
        CtlDecoder().feed(struct.pack(">II", AgentCode.ACK, length))
    assert str(info.value) == f"ctl message: bad length {length}"


def test_ctl_decoder_limit_is_configurable():
    data = encode_ctl(AgentCode.ACK, b"x" * 20, max_message=100)
    assert CtlDecoder(max_message=100).feed(data) == [(AgentCode.ACK, b"x" * 20)]
    with pytest.raises(PeerProtocolError):
        CtlDecoder(max_message=20).feed(data)


# -- io ---------------------------------------------------------------------------------------------------

def test_io_layout():
    assert encode_io(3, b"hi") == struct.pack(">QI", 3, 14) + b"hi"
    assert encode_io(2**64 - 1) == struct.pack(">QI", 2**64 - 1, 12)


@pytest.mark.parametrize("payload", [b"", b"\x00", b"output\n", b"z" * (MAX_MESSAGE - 12)])
@pytest.mark.parametrize("seq", [1, 2, 3, 4, 1000])
def test_io_round_trip(seq, payload):
    assert IoDecoder().feed(encode_io(seq, payload)) == [(seq, payload)]


IO_MESSAGES = [(3, b"hello"), (4, b"err"), (3, b""), (3, b"\x02"), (1, b"null session")]
IO_STREAM = b"".join(encode_io(seq, payload) for seq, payload in IO_MESSAGES)


@pytest.mark.parametrize("offset", range(len(IO_STREAM) + 1))
def test_io_split_at_every_offset(offset):
    decoder = IoDecoder()
    assert decoder.feed(IO_STREAM[:offset]) + decoder.feed(IO_STREAM[offset:]) == IO_MESSAGES


@pytest.mark.parametrize("length", [0, 11, MAX_MESSAGE + 1, 0xFFFFFFFF])
def test_io_bad_length(length):
    with pytest.raises(PeerProtocolError) as info:
        IoDecoder().feed(struct.pack(">QI", 5, length))
    assert str(info.value) == f"io message: bad length {length}"


CHUNK = MAX_MESSAGE - 12


@pytest.mark.parametrize(
    ("size", "sizes"),
    [
        (0, [0]),
        (1, [1]),
        (CHUNK, [CHUNK]),
        (CHUNK + 1, [CHUNK, 1]),
        (2 * CHUNK, [CHUNK, CHUNK]),
        (2 * CHUNK + 5, [CHUNK, CHUNK, 5]),
        (100_000, [CHUNK] * (100_000 // CHUNK) + [100_000 % CHUNK]),
    ],
)
def test_encode_io_split_chunking(size, sizes):
    payload = bytes(i % 251 for i in range(size))
    data = encode_io_split(7, payload)
    messages = IoDecoder().feed(data)
    assert [len(p) for _, p in messages] == sizes
    assert all(seq == 7 for seq, _ in messages)
    assert b"".join(p for _, p in messages) == payload
    assert len(data) == size + 12 * len(sizes)


def test_encode_io_split_empty_is_one_eof_message():
    assert encode_io_split(9, b"") == encode_io(9, b"")


def test_encode_io_split_custom_size():
    messages = IoDecoder().feed(encode_io_split(3, b"abcdefghij", max_message=16))
    assert messages == [(3, b"abcd"), (3, b"efgh"), (3, b"ij")]


@given(st.binary(max_size=30_000), st.integers(min_value=13, max_value=MAX_MESSAGE))
def test_encode_io_split_property(payload, max_message):
    data = encode_io_split(5, payload, max_message)
    messages = IoDecoder(max_message).feed(data)
    assert b"".join(p for _, p in messages) == payload
    assert all(len(p) + 12 <= max_message for _, p in messages)
    assert len(messages) >= 1


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=40))
def test_random_bytes_only_raise_peer_protocol_error(data, chunk):
    for decoder in (CtlDecoder(), IoDecoder()):
        try:
            for i in range(0, len(data), chunk):
                decoder.feed(data[i:i + chunk])
        except PeerProtocolError:
            pass


def test_module_limit_is_hyperstart_buffer():
    assert agent_codec.MAX_MESSAGE == 10240
