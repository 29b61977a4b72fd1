"""Patch before anything else, exactly as the daemon's entry point does."""

from gevent import monkey

monkey.patch_all()

import contextlib  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # tests share fake_agent and helpers as plain modules

from cc_proxy import config  # noqa: E402
from cc_proxy.client import Client  # noqa: E402
from cc_proxy.server import Server  # noqa: E402
from fake_agent import running_agent  # noqa: E402

# Small timeouts so failure paths take milliseconds, not the production 30 s.
FAST = {"ready_timeout": 2, "shim_timeout": 2, "process_timeout": 2, "stop_timeout": 2}


@contextlib.contextmanager
def running_proxy(**overrides):
    """An in-process proxy on a short temporary socket path, stopped afterwards."""
    directory = tempfile.mkdtemp(prefix="ccp")
    settings = dict(FAST, socket_path=f"{directory}/proxy.sock", ksm="initial")
    settings.update(overrides)
    server = Server(config.build(**settings))
    server.start()
    try:
        yield server
    finally:
        server.request_stop()
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def proxy():
    with running_proxy() as server:
        yield server


@pytest.fixture
def agent():
    with running_agent() as fake:
        yield fake


@pytest.fixture
def connect(proxy):
    """connect() -> a new Client on the proxy socket; every client is closed afterwards."""
    clients = []

    def factory(timeout=5.0):
        client = Client(proxy.config.socket_path, timeout=timeout)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.close()


@pytest.fixture
def pod(proxy, agent, connect):
    """A VM registered with the proxy: returns (runtime client, agent)."""
    runtime = connect()
    runtime.register_vm("pod1", agent.ctl_path, agent.io_path)
    return runtime, agent
