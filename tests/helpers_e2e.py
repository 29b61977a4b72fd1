"""Shared pieces of the end-to-end tests: the installed daemon as a subprocess.

The tests drive the ``cc-proxy`` command installed on PATH (the console script
of ``pip install``), never the package imported in-process, so they also check
the entry point, the monkey-patching order and the process exit codes.

Rules every e2e test follows through this module:

* socket paths live in a SHORT temporary directory (``tempfile.mkdtemp``):
  pytest's ``tmp_path`` can exceed the 107 bytes of ``sun_path``;
* stdin is /dev/null and stderr goes to a file, read back for diagnostics
  and for log assertions;
* ``--ksm initial`` always: the tests never touch /sys;
* readiness is a bounded dial loop, like the runtime's; waits on the log file
  are bounded polls; every started process is killed at teardown.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence

import pytest

from cc_proxy.client import Client

CC_PROXY = shutil.which("cc-proxy")
requires_cc_proxy = pytest.mark.skipif(
    CC_PROXY is None,
    reason="the cc-proxy command is not installed on PATH (pip install -e '.[test]'); "
    "the e2e tests exercise the installed console script",
)

#: Dial like the runtime does: every 100 ms for up to 5 s.
DIAL_ATTEMPTS = 50
DIAL_INTERVAL = 0.1
#: Time allowed for a graceful exit after SIGTERM/SIGINT or a pod-mode end.
EXIT_TIMEOUT = 10.0
#: Poll interval when waiting for a line in the log file.
POLL_INTERVAL = 0.05

#: Variables of the test environment that would change the daemon's behaviour.
_SCRUBBED_ENV = ("CC_PROXY_LOG_LEVEL", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS",
                 "LISTEN_FDNAMES", "JOURNAL_STREAM")


def clean_env(**extra: str) -> dict[str, str]:
    """The test environment without anything that steers cc-proxy, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env.update(extra)
    return env


def system_args(sock: str, *extra: str) -> list[str]:
    """System mode on ``sock``, never touching the host's KSM."""
    return ["--ksm", "initial", "--socket-path", sock, *extra]


class ProxyProcess:
    """One ``cc-proxy`` (or wrapper) subprocess with its stderr in a file."""

    def __init__(self, argv: Sequence[str], log_path: str, env: dict[str, str] | None = None):
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                     env=clean_env() if env is None else env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def describe(self) -> str:
        return f"{self.argv!r} exit={self.proc.poll()!r}\n--- stderr ---\n{self.log()}--- end ---"

    def dial(self, path: str, attempts: int = DIAL_ATTEMPTS, interval: float = DIAL_INTERVAL,
             timeout: float = 5.0) -> Client:
        """A connected client, dialling like the runtime; fails with the daemon's log."""
        try:
            return Client.connect_retry(path, attempts, interval, timeout=timeout)
        except ConnectionError as exc:
            raise AssertionError(f"{exc}\n{self.describe()}") from None

    def wait_ready(self, path: str) -> None:
        self.dial(path).close()

    def wait_log(self, text: str, timeout: float = 5.0, start: int = 0) -> str:
        """The log once it contains ``text`` (searched from offset ``start``); bounded poll."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if text in log[start:]:
                return log
            if time.monotonic() >= deadline:
                raise AssertionError(f"{text!r} not in the log after {timeout}s\n{self.describe()}")
            if self.proc.poll() is not None:
                # The process is gone: the file is final, one last read decides.
                if text in self.log()[start:]:
                    return self.log()
                raise AssertionError(f"the process exited without logging {text!r}\n{self.describe()}")
            time.sleep(POLL_INTERVAL)

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {timeout}s later\n{self.describe()}") from None

    def stop(self, signum: int = signal.SIGTERM, timeout: float = EXIT_TIMEOUT) -> int:
        self.send_signal(signum)
        return self.wait(timeout)

    def kill(self) -> None:
        """Teardown: SIGKILL if still running, reap, close the log file."""
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        self._log.close()


@contextlib.contextmanager
def proxy_process(args: Sequence[str], log_path: str, env: dict[str, str] | None = None,
                  wrapper: Sequence[str] = ()) -> Iterator[ProxyProcess]:
    """``cc-proxy args...`` (behind ``wrapper`` if given), always killed afterwards."""
    proc = ProxyProcess([*wrapper, CC_PROXY, *args], log_path, env)
    try:
        yield proc
    finally:
        proc.kill()


def run_cc_proxy(args: Sequence[str], timeout: float = 20.0,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``cc-proxy args...`` to completion (configuration errors, --version)."""
    return subprocess.run([CC_PROXY, *args], check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, env=clean_env() if env is None else env)


def newcontainer_data(container_id: str, terminal: bool = False) -> dict:
    """The ``data`` of a Hyper newcontainer whose process leaves stdio/stderr to the proxy (relocation)."""
    return {"id": container_id, "rootfs": "rootfs", "image": container_id,
            "process": {"args": ["/bin/sh", "-c", "echo out; echo err >&2; exit 7"], "terminal": terminal,
                        "workdir": "/", "envs": [{"env": "PATH", "value": "/bin"}]}}
