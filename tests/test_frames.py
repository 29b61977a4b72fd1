"""Client frame codec: round trips, split input, hostile headers (SPEC.md section 2)."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cc_proxy import frames
from cc_proxy.errors import PeerProtocolError
from cc_proxy.frames import OPCODES, Frame, FrameDecoder, FrameType, encode

pytestmark = pytest.mark.timeout(30)

ALL_OPCODES = [(ftype, opcode) for ftype, enum in OPCODES.items() for opcode in enum]


def header(version=2, words=3, flags_type=0, opcode=0, length=0, reserved=(0, 0)):
    return struct.pack(">HBBHBBI", version, words, reserved[0], reserved[1], flags_type, opcode, length)


def decode_all(data: bytes, max_payload=frames.DEFAULT_MAX_PAYLOAD) -> list[Frame]:
    decoder = FrameDecoder(max_payload)
    out = decoder.feed(data)
    assert decoder.pending == 0
    return out


# -- round trips --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("ftype", "opcode"), ALL_OPCODES, ids=lambda v: getattr(v, "name", str(v)))
@pytest.mark.parametrize("payload", [b"", b"x", b'{"containerId":"c"}', bytes(range(256)) * 5])
def test_round_trip_every_type_and_opcode(ftype, opcode, payload):
    data = encode(ftype, opcode, payload)
    assert len(data) == frames.HEADER_SIZE + len(payload)
    assert decode_all(data) == [Frame(ftype, opcode, payload, False)]


def test_header_layout_is_big_endian_and_exact():
    data = encode(FrameType.STREAM, frames.Stream.STDERR, b"abc")
    assert data == bytes([0, 2, 3, 0, 0, 0, 2, 2, 0, 0, 0, 3]) + b"abc"


def test_longer_header_is_padded_and_skipped():
    data = encode(FrameType.STREAM, 1, b"hello", header_words=5)
    assert data[2] == 5 and data[12:20] == bytes(8) and data[20:] == b"hello"
    assert decode_all(data) == [Frame(FrameType.STREAM, 1, b"hello", False)]


@pytest.mark.parametrize("opcode", list(frames.Command))
def test_error_flag_round_trip(opcode):
    data = encode(FrameType.RESPONSE, opcode, b'{"msg":"nope"}', error=True)
    assert data[6] == 0x11
    assert decode_all(data) == [Frame(FrameType.RESPONSE, opcode, b'{"msg":"nope"}', True)]
    assert decode_all(encode(FrameType.RESPONSE, opcode, b""))[0].error is False


def test_types_and_opcodes_decode_as_enums():
    (frame,) = decode_all(encode(FrameType.COMMAND, frames.Command.SIGNAL))
    assert frame.type is FrameType.COMMAND
    assert frame.opcode == frames.Command.SIGNAL


# -- streams split anywhere ---------------------------------------------------------------------------

STREAM_FRAMES = [
    Frame(FrameType.COMMAND, frames.Command.CONNECT_SHIM, b'{"token":"abc"}'),
    Frame(FrameType.STREAM, frames.Stream.STDIN, b""),
    Frame(FrameType.RESPONSE, frames.Command.HYPER, b'{"msg":"boom"}', True),
    Frame(FrameType.STREAM, frames.Stream.STDOUT, b"\x00\x01" * 40),
    Frame(FrameType.NOTIFICATION, frames.Notification.PROCESS_EXITED, b"\x07"),
]
STREAM = b"".join(encode(f.type, f.opcode, f.payload, f.error) for f in STREAM_FRAMES)


@pytest.mark.parametrize("offset", range(len(STREAM) + 1))
def test_split_at_every_offset(offset):
    decoder = FrameDecoder()
    got = decoder.feed(STREAM[:offset]) + decoder.feed(STREAM[offset:])
    assert got == STREAM_FRAMES
    assert decoder.pending == 0


def test_byte_at_a_time():
    decoder = FrameDecoder()
    got = []
    for i in range(len(STREAM)):
        got += decoder.feed(STREAM[i:i + 1])
    assert got == STREAM_FRAMES


def test_partial_frame_is_held_back():
    decoder = FrameDecoder()
    assert decoder.feed(STREAM[:5]) == []
    assert decoder.pending == 5
    assert decoder.feed(b"") == []
    assert decoder.pending == 5


# -- longer headers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("words", [4, 5, 8, 255])
def test_longer_header_skips_extra_words(words):
    extra = b"\xaa" * ((words - 3) * 4)
    data = header(words=words, flags_type=2, opcode=1, length=3) + extra + b"out"
    data += encode(FrameType.STREAM, 2, b"err")
    expected = [Frame(FrameType.STREAM, 1, b"out"), Frame(FrameType.STREAM, 2, b"err")]
    assert decode_all(data) == expected
    for offset in range(len(data) + 1):
        decoder = FrameDecoder()
        assert decoder.feed(data[:offset]) + decoder.feed(data[offset:]) == expected


def test_reserved_fields_are_ignored():
    data = header(flags_type=0, opcode=0, length=2, reserved=(7, 0xFFFF)) + b"{}"
    assert decode_all(data) == [Frame(FrameType.COMMAND, 0, b"{}")]


# -- hostile headers ----------------------------------------------------------------------------------

def assert_refused(data: bytes, message: str, max_payload=frames.DEFAULT_MAX_PAYLOAD):
    with pytest.raises(PeerProtocolError) as info:
        FrameDecoder(max_payload).feed(data)
    assert str(info.value) == message


@pytest.mark.parametrize("version", [0, 1, 3, 0xFFFF])
def test_bad_version(version):
    assert_refused(header(version=version), f"frame: bad version {version}")


@pytest.mark.parametrize("raw_type", range(4, 16))
def test_bad_type(raw_type):
    assert_refused(header(flags_type=raw_type), f"frame: bad type {raw_type}")


@pytest.mark.parametrize("raw_type", range(4, 16))
def test_bad_type_with_error_flag(raw_type):
    assert_refused(header(flags_type=0x10 | raw_type), f"frame: bad type {raw_type}")


BAD_OPCODES = [(ftype, opcode) for ftype, enum in OPCODES.items() for opcode in (len(enum), len(enum) + 1, 255)]


@pytest.mark.parametrize(("ftype", "opcode"), BAD_OPCODES)
def test_bad_opcode_per_type(ftype, opcode):
    assert_refused(header(flags_type=ftype, opcode=opcode), f"frame: bad opcode ({opcode}) for type {int(ftype)}")


@pytest.mark.parametrize("words", [0, 1, 2])
def test_header_shorter_than_three_words(words):
    with pytest.raises(PeerProtocolError, match="frame: bad header length"):
        FrameDecoder().feed(header(words=words, length=4) + b"abcd")


def test_payload_over_limit_refused_from_header_alone():
    # Only the header arrived: the decoder must refuse before buffering a gigantic payload.
    data = header(flags_type=2, opcode=0, length=0xFFFFFFFF)
    with pytest.raises(PeerProtocolError, match="exceeds the limit"):
        FrameDecoder().feed(data)


def test_payload_limit_is_inclusive():
    payload = b"x" * 100
    assert decode_all(encode(FrameType.STREAM, 0, payload), max_payload=100)[0].payload == payload
    with pytest.raises(PeerProtocolError, match="101 bytes exceeds the limit of 100"):
        FrameDecoder(100).feed(encode(FrameType.STREAM, 0, payload + b"y"))


def test_good_frames_before_a_bad_one_are_not_lost_silently():
    # The error surfaces on the call that completes the bad header; earlier frames came out before it.
    decoder = FrameDecoder()
    good = encode(FrameType.STREAM, 0, b"ok")
    assert decoder.feed(good) == [Frame(FrameType.STREAM, 0, b"ok")]
    with pytest.raises(PeerProtocolError):
        decoder.feed(header(version=1))


@given(st.binary(max_size=200), st.integers(min_value=1, max_value=64))
def test_random_bytes_only_raise_peer_protocol_error(data, chunk):
    decoder = FrameDecoder(max_payload=1024)
    try:
        for i in range(0, len(data), chunk):
            for frame in decoder.feed(data[i:i + chunk]):
                assert isinstance(frame.type, FrameType)
    except PeerProtocolError:
        pass


@given(st.lists(st.tuples(st.sampled_from(ALL_OPCODES), st.binary(max_size=64), st.booleans()), max_size=8),
       st.integers(min_value=1, max_value=50))
def test_random_frames_round_trip_in_random_chunks(items, chunk):
    expected = [Frame(ftype, opcode, payload, error) for (ftype, opcode), payload, error in items]
    data = b"".join(encode(f.type, f.opcode, f.payload, f.error) for f in expected)
    decoder = FrameDecoder()
    got = []
    for i in range(0, len(data), chunk):
        got += decoder.feed(data[i:i + chunk])
    assert got == expected
    assert decoder.pending == 0
