"""One client connection: a reader greenlet (this one) and a writer greenlet.

The reader decodes every complete frame of each read and runs its handler;
commands are answered in order. The writer is the only greenlet that writes
to the socket: it sends the session's output (when the client is a shim) and
then the queued responses, each as one write per wake-up. Bad input costs
this client its connection and nothing else.
"""

from __future__ import annotations

import itertools
import socket
from collections import deque

import gevent
from gevent.event import Event

from cc_proxy import commands, frames, logsetup, payloads
from cc_proxy.errors import PeerProtocolError, ProxyError
from cc_proxy.frames import FrameType, Stream

READ_SIZE = 256 * 1024
# How long a closing connection may take to flush its last responses.
FLUSH_TIMEOUT = 1.0

_ids = itertools.count(1)


class Connection:
    def __init__(self, sock: socket.socket, proxy):
        self.id = next(_ids)
        self.sock = sock
        self.proxy = proxy  # config, router, url, log, vm_unregistered()
        self.log = proxy.log.bind(client=self.id)
        self.vm = None  # attached VM (RegisterVM / AttachVM)
        self.session = None  # claimed session (ConnectShim)
        self._responses: deque[bytes] = deque()
        self._wake = Event()
        self._closing = False
        self._closed_here = False  # we shut the socket: the reader's error is expected
        self._writer = None

    # -- reader ------------------------------------------------------------------

    def serve(self) -> None:
        """Run until the client leaves or misbehaves; always cleans up."""
        self._writer = gevent.spawn(self._write_loop)
        self.log.debug("client connected")
        try:
            self._read_loop()
        except PeerProtocolError as exc:
            self.log.error("dropping client: {}", logsetup.redact_tokens(str(exc)))
        except OSError as exc:
            if not self._closed_here:
                self.log.info("client connection error: {}", exc)
        except Exception:
            self.log.exception("bug while serving client; dropping it")
        finally:
            self._finish()

    def _read_loop(self) -> None:
        decoder = frames.FrameDecoder(self.proxy.config.max_payload)
        buffer = bytearray(READ_SIZE)
        view = memoryview(buffer)
        recv_into = self.sock.recv_into
        while True:
            count = recv_into(buffer)
            if not count:
                return
            stdin = []  # consecutive stdin frames of this read go to the agent in one write
            for frame in decoder.feed(view[:count]):
                if frame.type == FrameType.STREAM and frame.opcode == Stream.STDIN and self.session is not None:
                    stdin.append(frame.payload)
                    continue
                if stdin:
                    self._forward_stdin(stdin)
                    stdin = []
                self._dispatch(frame)
            if stdin:
                self._forward_stdin(stdin)

    def _forward_stdin(self, chunks: list[bytes]) -> None:
        session = self.session
        try:
            session.vm.stdin(session, chunks)
        except ProxyError as exc:
            raise PeerProtocolError(f"stdin: {exc}") from None

    def _dispatch(self, frame: frames.Frame) -> None:
        if frame.type == FrameType.COMMAND:
            handler = commands.COMMANDS[frame.opcode]
            try:
                response = handler(self, frame.payload)
            except ProxyError as exc:
                self.log.info("{} failed: {}", frames.Command(frame.opcode).name, logsetup.redact_tokens(str(exc)))
                self.respond(frame.opcode, payloads.encode_json({"msg": str(exc)}), error=True)
            else:
                self.respond(frame.opcode, response)
        elif frame.type == FrameType.STREAM and frame.opcode in commands.STREAMS:
            try:
                commands.STREAMS[frame.opcode](self, frame.payload)
            except ProxyError as exc:
                raise PeerProtocolError(str(exc)) from None
        else:
            kind = frame.type.name.lower()
            name = frames.OPCODES[frame.type](frame.opcode).name.lower()
            raise PeerProtocolError(f"a client may not send a {kind} frame ({name})")

    # -- writer ------------------------------------------------------------------

    def respond(self, opcode: int, payload: bytes, error: bool = False) -> None:
        self._responses.append(frames.encode(FrameType.RESPONSE, opcode, payload, error))
        self._wake.set()

    def wake(self) -> None:
        """New output for this shim's session."""
        self._wake.set()

    def _write_loop(self) -> None:
        try:
            self._write_until_closed()
        except OSError as exc:
            if not self._closed_here:
                self.log.info("writing to client failed: {}", exc)
            self._shutdown()  # wakes the reader, which cleans up

    def _write_until_closed(self) -> None:
        send = self.sock.send
        while True:
            self._wake.wait()
            self._wake.clear()
            session = self.session
            if session is not None and session.outbox and session.shim is self:
                count, data = session.take_output()
                sent = 0
                view = memoryview(data)
                try:
                    while sent < len(data):
                        sent += send(view[sent:])
                except BaseException:
                    session.partially_sent(sent)  # a reconnecting shim gets the rest, whole frames only
                    raise
                session.sent(count, len(data))
                if session.outbox:
                    self._wake.set()  # more than one write's worth was queued
            if self._responses:
                data = b"".join(self._responses)
                self._responses.clear()
                self.sock.sendall(data)
            if self._closing and not self._responses:
                self._shutdown()
                return

    # -- roles ---------------------------------------------------------------------

    def attach(self, vm) -> None:
        """RegisterVM/AttachVM: Hyper goes to this VM; its id tags our log lines."""
        self.vm = vm
        self.log = self.log.bind(vm=vm.container_id)

    def become_shim(self, session) -> None:
        self.session = session
        self.log = self.log.bind(vm=session.vm.container_id, token=logsetup.token_prefix(session.token))
        if session.outbox:
            self.wake()  # output kept while no shim was connected

    # -- closing -------------------------------------------------------------------

    def close_after_flush(self) -> None:
        """Close once the queued responses are written (DisconnectShim)."""
        self._closing = True
        self._wake.set()

    def close(self) -> None:
        """Close from outside (VM gone, proxy stopping): wakes the reader."""
        self._shutdown()

    def _shutdown(self) -> None:
        self._closed_here = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _finish(self) -> None:
        writer = self._writer
        if writer is not None and not writer.dead and self._responses:
            self._closing = True
            self._wake.set()
            writer.join(FLUSH_TIMEOUT)
        if writer is not None:
            writer.kill()
        session = self.session
        if session is not None:
            router = self.proxy.router
            router.call(router.release, session, self)
            if not session.freed:
                self.log.info("shim connection dropped; token {} may reconnect", logsetup.token_prefix(session.token))
        self.sock.close()
        self.log.debug("client gone")
