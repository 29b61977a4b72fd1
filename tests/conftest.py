"""Patch before anything else, exactly as the daemon's entry point does."""

from gevent import monkey

monkey.patch_all()

import contextlib
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from loguru import logger

sys.path.insert(0, str(Path(__file__).parent))  # tests share fake_agent and helpers as plain modules

from fake_agent import running_agent, short_tempdir
from fake_sysfs import sysfs  # noqa: F401 (a fixture, shared by the KSM tests)

from cc_proxy import config
from cc_proxy.client import Client
from cc_proxy.server import Server

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


@contextlib.contextmanager
def captured_logs(level: str = "DEBUG"):
    """Every loguru record at ``level`` or above logged meanwhile (dicts with message, level, extra)."""
    records = []
    sink = logger.add(lambda message: records.append(message.record), level=level, format="{message}", catch=False)
    try:
        yield records
    finally:
        logger.remove(sink)


@pytest.fixture
def log_records():
    with captured_logs() as records:
        yield records


@pytest.fixture
def proxy():
    with running_proxy() as server:
        yield server


@pytest.fixture
def workdir():
    """A temporary directory short enough for AF_UNIX socket paths."""
    with short_tempdir("cce") as path:
        yield path


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
