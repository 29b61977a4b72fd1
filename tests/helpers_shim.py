"""Helpers for the shim and output scenario tests: the runtime's and the shim's steps of SPEC.md section 8.

Each runtime operation uses a fresh connection, as the real runtime does. Waits are bounded: either the
client's own timeouts, the fake agent's ``wait_*`` helpers, or ``wait_until`` on the in-process proxy's state.
"""

from __future__ import annotations

import gevent

from cc_proxy.client import Client, ResponseError

VM_ID = "pod1"


def container_data(container_id: str = "c1", terminal: bool = False, **extra) -> dict:
    """A newcontainer ``data`` object, as the runtime builds it (stdio/stderr left to the proxy)."""
    data = {"id": container_id, "rootfs": "rootfs", "image": container_id,
            "process": {"terminal": terminal, "args": ["/bin/sh"], "envs": [], "workdir": "/"}}
    data.update(extra)
    return data


def exec_data(container_id: str = "c1", terminal: bool = False) -> dict:
    """An execcmd ``data`` object."""
    return {"container": container_id, "process": {"terminal": terminal, "args": ["/bin/ls"], "workdir": "/"}}


def new_token(connect, vm: str = VM_ID) -> str:
    """Container create: AttachVM numIOStreams 1 on a fresh connection; exactly one token."""
    runtime = connect()
    try:
        tokens = runtime.attach_vm(vm, 1).tokens
    finally:
        runtime.close()
    assert len(tokens) == 1, tokens
    return tokens[0]


def hyper(connect, name: str, data, tokens: list[str] | None = None, vm: str = VM_ID) -> bytes:
    """Container start / exec / any agent command: AttachVM 0 then Hyper on a fresh connection."""
    runtime = connect()
    try:
        runtime.attach_vm(vm, 0)
        return runtime.hyper(name, data, tokens=tokens)
    finally:
        runtime.close()


def spawn_hyper(connect, name: str, data, tokens: list[str] | None = None, vm: str = VM_ID) -> gevent.Greenlet:
    """``hyper`` in a greenlet: ``.get(timeout)`` returns the ACK payload or raises the error."""
    return gevent.spawn(hyper, connect, name, data, tokens, vm)


def open_shim(connect, token: str, wait: bool = True) -> Client:
    """A shim connection that sent ConnectShim (without waiting for the answer when ``wait`` is False)."""
    shim = connect()
    shim.connect_shim(token, wait=wait)
    return shim


def find_command(agent, name: str, predicate) -> object:
    """The agent command called ``name`` whose JSON matches ``predicate`` (it must have arrived already)."""
    matching = [c for c in agent.commands if c.name == name and predicate(c.json)]
    assert len(matching) == 1, (name, [c.json for c in agent.commands if c.name == name])
    return matching[0]


def start_process(connect, agent, container_id: str = "c1", vm: str = VM_ID, name: str = "newcontainer",
                  terminal: bool = False) -> tuple[Client, str, int]:
    """The whole shim flow up to a running process: (shim, token, base sequence number).

    The shim sends ConnectShim without waiting, as cc-shim does; the runtime's Hyper returns once the agent
    has ACKed, and then the process counts as started.
    """
    token = new_token(connect, vm)
    shim = open_shim(connect, token, wait=False)
    data = container_data(container_id, terminal) if name == "newcontainer" else exec_data(container_id, terminal)
    hyper(connect, name, data, tokens=[token], vm=vm)
    shim.read_response()  # ConnectShim succeeded
    key = "id" if name == "newcontainer" else "container"
    command = find_command(agent, name, lambda d: d.get(key) == container_id)
    return shim, token, command.json["process"]["stdio"]


def wait_until(predicate, timeout: float = 5, what: str = "a condition") -> None:
    """Poll the in-process proxy's state (a condition, not a delay) until ``predicate()`` is true."""
    try:
        with gevent.Timeout(timeout):
            while not predicate():
                gevent.sleep(0.005)
    except gevent.Timeout:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


def session_of(server, token: str):
    """The proxy's session for ``token`` (None once freed)."""
    return server.router.tokens.get(token)


def wait_shim_released(server, token: str, timeout: float = 5) -> None:
    """The proxy noticed the shim's connection drop: the token is claimable again."""
    session = session_of(server, token)
    assert session is not None, "token was freed"
    wait_until(lambda: session.shim is None, timeout, "the proxy to release the shim's token")


def reconnect_shim(connect, token: str, timeout: float = 5) -> Client:
    """What cc-shim does after the proxy closed its connection: retry ConnectShim every 100 ms."""
    with gevent.Timeout(timeout, AssertionError("could not reclaim the token")):
        while True:
            shim = connect()
            try:
                shim.connect_shim(token)
                return shim
            except ResponseError as exc:
                shim.close()
                if not exc.message.startswith("token already claimed"):
                    raise
            gevent.sleep(0.1)


def read_stdout(shim: Client, nbytes: int, timeout: float = 5) -> bytes:
    """Exactly ``nbytes`` of stdout; any other event fails."""
    data = bytearray()
    with gevent.Timeout(timeout, AssertionError(f"timed out with {len(data)} of {nbytes} stdout bytes")):
        while len(data) < nbytes:
            event = shim.read_event()
            assert event is not None and event[0] == "stdout", (event, bytes(data[-64:]))
            data += event[1]
    assert len(data) == nbytes, (len(data), nbytes)
    return bytes(data)


def assert_dropped(client: Client, timeout: float = 5) -> None:
    """The proxy closed this client's connection (EOF, possibly after frames it had already sent)."""
    with gevent.Timeout(timeout, AssertionError("the proxy did not close the connection")):
        while True:
            try:
                event = client.read_event()
            except ConnectionResetError:
                return
            if event is None:
                return
