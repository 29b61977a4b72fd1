"""A VM: its agent link, its sessions and the rules that use both.

Sequence numbers 1 and 2 belong to the null session (output discarded);
each token's session gets the next pair, from 3 on. The io reader routes every
agent io message by sequence number; the client greenlets call ``hyper``,
``signal`` and ``stdin`` on behalf of the runtime and the shims.
"""

from __future__ import annotations

from gevent.event import Event

from cc_proxy import agent_codec, logsetup, payloads
from cc_proxy.agent_codec import AgentCode
from cc_proxy.agent_link import AgentLink
from cc_proxy.errors import ProxyError
from cc_proxy.session import Session

NULL_SESSION_BASE = 1
FIRST_BASE = 3


class VM:
    def __init__(self, container_id: str, ctl_path: str, io_path: str, console_path: str | None, config, logger):
        self.container_id = container_id
        self.config = config
        self.log = logger.bind(vm=container_id)
        self.lost = Event()
        self.lost_reason = ""
        self.on_lost = None  # set by the router: called once, after the VM is torn down
        self.link = AgentLink(ctl_path, io_path, console_path, on_io=self.route_io, on_lost=self.close,
                              logger=self.log, max_message=config.agent_message_size)
        self.null_session = Session(None, NULL_SESSION_BASE, config.shim_buffer_bytes, self.lost)
        self.null_session.process_started.set()
        self.sessions_by_seq: dict[int, Session] = {NULL_SESSION_BASE: self.null_session,
                                                    NULL_SESSION_BASE + 1: self.null_session}
        self.sessions_by_token: dict[str, Session] = {}
        self._next_base = FIRST_BASE

    # -- sessions (called by the router only) ----------------------------------

    def new_session(self, token: str) -> Session:
        session = Session(token, self._next_base, self.config.shim_buffer_bytes, self.lost)
        session.vm = self
        self._next_base += 2
        self.sessions_by_seq[session.base] = session
        self.sessions_by_seq[session.base + 1] = session
        self.sessions_by_token[token] = session
        return session

    def forget_session(self, session: Session) -> None:
        session.freed = True
        self.sessions_by_token.pop(session.token, None)
        self.sessions_by_seq.pop(session.base, None)
        self.sessions_by_seq.pop(session.base + 1, None)

    # -- agent -> shims ----------------------------------------------------------

    def route_io(self, messages) -> None:
        sessions = self.sessions_by_seq
        debug = logsetup.is_debug()
        for seq, payload in messages:
            session = sessions.get(seq)
            if session is None:
                self.log.warning("io message for sequence number {} that nobody owns: dropped {} bytes",
                                 seq, len(payload))
            elif session is self.null_session:
                if debug:
                    self.log.debug("null session output (seq {}), discarded:\n{}", seq, logsetup.hexdump(payload))
            else:
                if debug:
                    self.log.debug("<- {} bytes for seq {}:\n{}", len(payload), seq, logsetup.hexdump(payload))
                session.output(seq, payload, self.log)

    # -- runtime and shim requests ---------------------------------------------

    def hyper(self, hyper: payloads.Hyper) -> bytes:
        """Forward one agent command, relocating newcontainer/execcmd onto a session."""
        code = agent_codec.command_code(hyper.name)
        token = hyper.check_tokens()
        if not hyper.relocated:
            return self.link.request(code, hyper.encoded_data())
        session = self.null_session if token is None else self.sessions_by_token.get(token)
        if session is None:
            raise ProxyError(f"unknown token {token}")
        data, container_id = payloads.relocate(hyper, session.base)
        if hyper.name == "newcontainer":
            session.container_id = container_id
        session.wait_shim(self.config.shim_timeout)
        reply = self.link.request(code, data)
        session.process_started.set()  # stdin and signals may flow now
        return reply

    def signal(self, session: Session, signal: payloads.Signal) -> None:
        if signal.ends_process and not session.process_started.is_set():
            session.notify_exit(0, self.log)  # nothing to kill yet: let the shim exit
            return
        session.wait_process(self.config.process_timeout)
        if signal.is_winsize:
            body = {"seq": session.base, "row": signal.rows, "column": signal.columns}
            self.link.request(AgentCode.WINSIZE, payloads.encode_json(body))
            return
        if not session.container_id:
            raise ProxyError(f"Could not send the signal {signal.name}: Sending a signal to a process different "
                             "from the initial container process is not supported")
        body = {"container": session.container_id, "signal": signal.number, "allProcesses": False}
        self.link.request(AgentCode.KILLCONTAINER, payloads.encode_json(body))

    def stdin(self, session: Session, chunks: list[bytes]) -> None:
        """Forward stdin frames (an empty one is EOF) to the agent in one write."""
        session.wait_process(self.config.process_timeout)
        size = self.config.agent_message_size
        messages = b"".join(agent_codec.encode_io_split(session.base, chunk, size) for chunk in chunks)
        if logsetup.is_debug():
            data = b"".join(chunks)
            self.log.debug("-> {} bytes of stdin for seq {}:\n{}", len(data), session.base, logsetup.hexdump(data))
        session.bytes_in += sum(map(len, chunks))
        self.link.send_io(messages)

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self.link.start()

    def close(self, reason: str = "closed") -> None:
        """Tear down: agent sockets, every shim connection, then tell the router."""
        if self.lost.is_set():
            return
        self.lost_reason = reason
        self.lost.set()  # wakes every wait on this VM at once
        self.log.info("VM gone: {}", reason)
        self.link.close()
        for session in list(self.sessions_by_token.values()):
            if session.shim is not None:
                session.shim.close()
        if self.on_lost is not None:
            self.on_lost(self)

    def statistics(self) -> dict:
        return {"vm": self.container_id, "sessions": len(self.sessions_by_token),
                "shims": sum(1 for s in self.sessions_by_token.values() if s.shim is not None),
                "lost": self.lost.is_set()}
