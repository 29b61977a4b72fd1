"""Client frame codec (SPEC.md section 2): bytes in, frames out; no I/O.

Header, big endian::

    0  u16 version (2)      2  u8 header length in 32-bit words (>= 3)
    3  u8  reserved         4  u16 reserved
    6  u8  flags << 4 | type
    7  u8  opcode           8  u32 payload length

``FrameDecoder.feed()`` takes whatever bytes arrived and returns every complete
frame; a partial frame waits for the next call. Any bad header raises
``PeerProtocolError`` with the original's text.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from cc_proxy.errors import PeerProtocolError

VERSION = 2
HEADER = struct.Struct(">HBBHBBI")
HEADER_SIZE = HEADER.size  # 12 bytes = 3 words, the minimum header length
MIN_HEADER_WORDS = 3
FLAG_ERROR = 0x1
# Large enough for any sane command, small enough that a hostile length
# field cannot make us buffer gigabytes (the original trusted it blindly).
DEFAULT_MAX_PAYLOAD = 1 << 20


class FrameType(IntEnum):
    COMMAND = 0  # client -> proxy request
    RESPONSE = 1  # proxy -> client answer, same opcode as the command
    STREAM = 2  # process I/O and client log lines
    NOTIFICATION = 3  # proxy -> shim event (process exited)


class Command(IntEnum):
    REGISTER_VM = 0  # runtime: connect to a new VM's agent
    UNREGISTER_VM = 1  # runtime: forget a VM
    ATTACH_VM = 2  # runtime: bind this connection to a known VM
    HYPER = 3  # runtime: forward an agent command
    CONNECT_SHIM = 4  # shim: claim an I/O token
    DISCONNECT_SHIM = 5  # shim: free its token for good
    SIGNAL = 6  # shim: deliver a signal or a window size


class Stream(IntEnum):
    STDIN = 0  # shim -> agent
    STDOUT = 1  # agent -> shim
    STDERR = 2  # agent -> shim
    LOG = 3  # any client -> proxy log


class Notification(IntEnum):
    PROCESS_EXITED = 0  # payload: one byte, the exit code


OPCODES = {
    FrameType.COMMAND: Command,
    FrameType.RESPONSE: Command,
    FrameType.STREAM: Stream,
    FrameType.NOTIFICATION: Notification,
}
# Per-frame lookups by plain index: constructing an IntEnum per frame costs
# more than the rest of the header decoding.
_TYPES = tuple(FrameType)
_OPCODE_COUNTS = tuple(len(OPCODES[t]) for t in _TYPES)


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    opcode: int
    payload: bytes = b""
    error: bool = False


def encode(ftype: int, opcode: int, payload: bytes = b"", error: bool = False,
           header_words: int = MIN_HEADER_WORDS) -> bytes:
    """One frame; ``header_words`` above 3 adds zeroed words a decoder must skip."""
    flags_type = (FLAG_ERROR << 4 if error else 0) | ftype
    header = HEADER.pack(VERSION, header_words, 0, 0, flags_type, opcode, len(payload))
    if header_words > MIN_HEADER_WORDS:
        header += bytes(4 * (header_words - MIN_HEADER_WORDS))
    return header + payload


def parse_header(buf: bytes | bytearray, offset: int = 0) -> tuple[int, FrameType, int, bool, int]:
    """Validate the header at ``offset``; return (header bytes, type, opcode, error flag, payload length)."""
    version, words, _, _, flags_type, opcode, length = HEADER.unpack_from(buf, offset)
    if version != VERSION:
        raise PeerProtocolError(f"frame: bad version {version}")
    if words < MIN_HEADER_WORDS:
        raise PeerProtocolError(f"frame: bad header length {words}")
    raw_type = flags_type & 0x0F
    if raw_type >= len(_TYPES):
        raise PeerProtocolError(f"frame: bad type {raw_type}")
    if opcode >= _OPCODE_COUNTS[raw_type]:
        raise PeerProtocolError(f"frame: bad opcode ({opcode}) for type {raw_type}")
    return words * 4, _TYPES[raw_type], opcode, bool((flags_type >> 4) & FLAG_ERROR), length


class FrameDecoder:
    """Incremental decoder; ``feed(b"")`` is a no-op, EOF is the caller's business."""

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD):
        self.max_payload = max_payload
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buffer
        buf += data
        frames = []
        start = 0
        end = len(buf)
        while end - start >= HEADER_SIZE:
            header_size, ftype, opcode, error, length = parse_header(buf, start)
            if length > self.max_payload:
                raise PeerProtocolError(f"frame: payload of {length} bytes exceeds the limit of {self.max_payload}")
            total = header_size + length
            if end - start < total:
                break
            frames.append(Frame(ftype, opcode, bytes(buf[start + header_size:start + total]), error))
            start += total
        if start:
            del buf[:start]
        return frames
