"""Hyperstart agent message codecs (SPEC.md section 5); no I/O.

ctl message: u32 code, u32 length (header included), payload.
io message:  u64 sequence number, u32 length (header included), payload.
Both big endian, and no message may exceed ``MAX_MESSAGE`` bytes in all.
"""

from __future__ import annotations

import struct
from enum import IntEnum

from cc_proxy.errors import PeerProtocolError, ProxyError

# hyperstart's own buffer size: a longer message is refused by the agent.
MAX_MESSAGE = 10240
CTL_HEADER = struct.Struct(">II")
IO_HEADER = struct.Struct(">QI")


class AgentCode(IntEnum):
    VERSION = 0
    STARTPOD = 1
    GETPOD = 2  # obsolete in hyperstart, never forwarded
    STOPPOD = 3  # obsolete in hyperstart, never forwarded
    DESTROYPOD = 4
    RESTARTCONTAINER = 5  # obsolete, never forwarded
    EXECCMD = 6
    FINISHCMD = 7  # obsolete, never forwarded
    READY = 8  # agent -> proxy once the channel is up
    ACK = 9  # success reply
    ERROR = 10  # failure reply
    WINSIZE = 11
    PING = 12
    FINISHPOD = 13  # agent-side only
    NEXT = 14  # agent -> proxy flow-control hint, carries no reply
    WRITEFILE = 15
    READFILE = 16
    NEWCONTAINER = 17
    KILLCONTAINER = 18
    ONLINECPUMEM = 19
    SETUPINTERFACE = 20
    SETUPROUTE = 21
    REMOVECONTAINER = 22
    PSCONTAINER = 23
    PROCESSASYNCEVENT = 24  # agent -> proxy event, not a reply


# The names a client may put in Hyper's hyperName.
CLIENT_COMMANDS = {
    code.name.lower(): code
    for code in (
        AgentCode.VERSION, AgentCode.STARTPOD, AgentCode.DESTROYPOD, AgentCode.EXECCMD,
        AgentCode.READY, AgentCode.ACK, AgentCode.ERROR, AgentCode.WINSIZE, AgentCode.PING,
        AgentCode.NEXT, AgentCode.WRITEFILE, AgentCode.READFILE, AgentCode.NEWCONTAINER,
        AgentCode.KILLCONTAINER, AgentCode.ONLINECPUMEM, AgentCode.SETUPINTERFACE,
        AgentCode.SETUPROUTE, AgentCode.REMOVECONTAINER, AgentCode.PSCONTAINER,
    )
}


def command_code(name: str) -> AgentCode:
    try:
        return CLIENT_COMMANDS[name]
    except (KeyError, TypeError):
        raise ProxyError(f"unknown command '{name}'") from None


def encode_ctl(code: int, payload: bytes = b"", max_message: int = MAX_MESSAGE) -> bytes:
    length = CTL_HEADER.size + len(payload)
    if length > max_message:
        raise ProxyError(f"message too long {length}")
    return CTL_HEADER.pack(code, length) + payload


def encode_io(seq: int, payload: bytes = b"") -> bytes:
    return IO_HEADER.pack(seq, IO_HEADER.size + len(payload)) + payload


def encode_io_split(seq: int, payload: bytes, max_message: int = MAX_MESSAGE) -> bytes:
    """Stdin for one sequence number as messages of at most ``max_message``.

    An empty payload stays one empty message: it tells the agent stdin is at EOF.
    """
    chunk = max_message - IO_HEADER.size
    if len(payload) <= chunk:
        return encode_io(seq, payload)
    view = memoryview(payload)
    return b"".join(encode_io(seq, view[i:i + chunk]) for i in range(0, len(payload), chunk))


class _Decoder:
    """Shared incremental decoder for both agent channels."""

    header: struct.Struct
    kind: str

    def __init__(self, max_message: int = MAX_MESSAGE):
        self.max_message = max_message
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Every complete (code or sequence number, payload) in the bytes so far."""
        buf = self._buffer
        buf += data
        header = self.header
        size = header.size
        out = []
        start = 0
        end = len(buf)
        while end - start >= size:
            key, length = header.unpack_from(buf, start)
            if length < size or length > self.max_message:
                raise PeerProtocolError(f"{self.kind} message: bad length {length}")
            if end - start < length:
                break
            out.append((key, bytes(buf[start + size:start + length])))
            start += length
        if start:
            del buf[:start]
        return out


class CtlDecoder(_Decoder):
    header = CTL_HEADER
    kind = "ctl"


class IoDecoder(_Decoder):
    header = IO_HEADER
    kind = "io"
