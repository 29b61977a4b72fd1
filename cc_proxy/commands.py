"""What each client frame does: one handler per command and per client stream.

A command handler takes the connection and the payload and returns the
response payload; a ``ProxyError`` it raises becomes an error response with its
text. A stream handler returns nothing; any error costs the client its
connection (SPEC.md section 2).
"""

from __future__ import annotations

from cc_proxy import config, logsetup, payloads
from cc_proxy.errors import PeerProtocolError, ProxyError
from cc_proxy.frames import Command, Stream
from cc_proxy.vm import VM


def register_vm(conn, payload: bytes) -> bytes:
    request = payloads.RegisterVM.parse(payload)
    proxy = conn.proxy
    router = proxy.router
    router.call(router.reserve, request.container_id)
    console = request.console if request.console and logsetup.is_debug() else None
    vm = VM(request.container_id, request.ctl_serial, request.io_serial, console, proxy.config, proxy.log)
    try:
        vm.link.connect(proxy.config.ready_timeout)
    except BaseException:
        router.call(router.abort, request.container_id)
        raise
    tokens = router.call(router.commit, vm, request.num_io_streams)
    vm.start()
    conn.attach(vm)
    proxy.vm_registered(vm)
    conn.log.info("RegisterVM(containerId={}, ctlSerial={}, ioSerial={}, console={}) gave {} token(s)",
                  request.container_id, request.ctl_serial, request.io_serial, request.console or "", len(tokens))
    return payloads.io_response(proxy.url, tokens)


def attach_vm(conn, payload: bytes) -> bytes:
    request = payloads.AttachVM.parse(payload)
    router = conn.proxy.router
    vm, tokens = router.call(router.attach, request.container_id, request.num_io_streams)
    conn.attach(vm)
    conn.log.info("AttachVM(containerId={}) gave {} token(s)", request.container_id, len(tokens))
    return payloads.io_response(conn.proxy.url, tokens)


def unregister_vm(conn, payload: bytes) -> bytes:
    container_id = payloads.parse_unregister(payload)
    router = conn.proxy.router
    vm = router.call(router.unregister, container_id)
    conn.vm = None
    conn.log.info("UnregisterVM(containerId={})", container_id)
    conn.proxy.vm_unregistered(vm)
    return b""


def hyper(conn, payload: bytes) -> bytes:
    request = payloads.Hyper.parse(payload)
    if conn.vm is None:
        raise ProxyError("client not attached to a vm")
    conn.log.info("hyper(cmd={}, tokens={})", request.name, len(request.tokens))
    return conn.vm.hyper(request)


def connect_shim(conn, payload: bytes) -> bytes:
    token = payloads.parse_connect_shim(payload)
    if conn.session is not None:
        raise ProxyError(f"client is already a shim for token {logsetup.token_prefix(conn.session.token)}")
    router = conn.proxy.router
    conn.become_shim(router.call(router.claim, token, conn))
    conn.log.info("ConnectShim(token={})", logsetup.token_prefix(token))
    return b""


def disconnect_shim(conn, payload: bytes) -> bytes:
    session = _shim_session(conn)
    router = conn.proxy.router
    router.call(router.free, session)
    conn.session = None
    conn.log.info("DisconnectShim(token={})", logsetup.token_prefix(session.token))
    conn.close_after_flush()
    return b""


def signal(conn, payload: bytes) -> bytes:
    session = _shim_session(conn)
    request = payloads.Signal.parse(payload)
    conn.log.info("Signal({},{},{})", request.name, request.columns, request.rows)
    session.vm.signal(session, request)
    return b""


def _shim_session(conn):
    if conn.session is None:
        raise ProxyError("client isn't a shim")
    return conn.session


def stdin(conn, payload: bytes) -> None:
    """Only reached by a client that is not a shim: a shim's stdin is batched by its connection."""
    raise PeerProtocolError("stdin: client not associated with any I/O session")


def log(conn, payload: bytes) -> None:
    entry = payloads.LogEntry.parse(payload)
    fields = {"source": entry.source}
    if entry.container_id:
        fields["container"] = entry.container_id
    conn.log.bind(**fields).log(config.LOG_LEVELS[entry.level], "{}", entry.message)


COMMANDS = {
    Command.REGISTER_VM: register_vm,
    Command.UNREGISTER_VM: unregister_vm,
    Command.ATTACH_VM: attach_vm,
    Command.HYPER: hyper,
    Command.CONNECT_SHIM: connect_shim,
    Command.DISCONNECT_SHIM: disconnect_shim,
    Command.SIGNAL: signal,
}

STREAMS = {
    Stream.STDIN: stdin,
    Stream.LOG: log,
}
