"""Throughput and latency of the real cc-proxy, next to the raw-socket limit of this machine.

Not a test: it prints figures and asserts nothing. Machines are noisy, so every
proxy figure is printed with its ratio to a raw AF_UNIX socketpair measured in
the same run by the same writer and reader code::

    python tests/bench_proxy.py [--seconds N] [--shims N]

The proxy runs as a subprocess (``python -m cc_proxy``) so that it has a core
of its own; the fake agent and the shims are plain blocking sockets and threads
in this process (no gevent here). Scenarios:

1. raw limits: writer -> socketpair -> reader, no proxy, for 10240-byte agent
   messages (the stdout size) and 8192-byte stdin frames (the cc-shim size);
2. stdout through the proxy: agent -> proxy -> one shim;
3. stdout with N shims of one VM in parallel (aggregate);
4. stdin through the proxy: one shim -> proxy -> agent;
5. command latency: AttachVM round trips on one connection, Hyper ping round
   trips on one connection.

The writer sends one prebuilt blob of messages in a loop, so its Python cost per
message is close to nothing; the reader does one large ``recv_into`` per wake-up
and decodes every complete message with the codecs the proxy and the client use.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cc_proxy import frames
from cc_proxy.agent_codec import CTL_HEADER, IO_HEADER, MAX_MESSAGE, AgentCode, CtlDecoder, IoDecoder
from cc_proxy.client import Client
from cc_proxy.frames import FrameDecoder, FrameType, Notification, Stream

STDOUT_PAYLOAD = MAX_MESSAGE - IO_HEADER.size  # the largest io message the agent may send
STDIN_PAYLOAD = 8192  # cc-shim's stdin read size
BLOB_MESSAGES = 64  # messages per sendall of the writers
RECV_SIZE = 1 << 20
VM_ID = "bench-vm"
JOIN_SLACK = 30.0  # how long past its deadline a scenario may take before we call it stuck


@dataclass
class Result:
    name: str
    nbytes: int
    messages: int
    seconds: float

    @property
    def mbps(self) -> float:
        return self.nbytes / self.seconds / 1e6

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


# -- writer and reader shared by the raw limit and the proxy scenarios --------------------------------


def blob_writer(sock: socket.socket, blob: bytes, seconds: float) -> int:
    """Send ``blob`` again and again for ``seconds``; return how many times it went out whole."""
    deadline = time.monotonic() + seconds
    count = 0
    sendall = sock.sendall
    while time.monotonic() < deadline:
        sendall(blob)
        count += 1
    return count


def stream_reader(sock: socket.socket, decoder, done: Callable[[object], bool]) -> tuple[int, int]:
    """Read with one large recv_into per wake-up, decode everything; stop at EOF or when ``done(item)``.

    Returns (payload bytes, messages) of the data items; ``decoder.feed`` yields
    ``Frame`` objects (FrameDecoder) or ``(seq, payload)`` tuples (IoDecoder).
    """
    buffer = bytearray(RECV_SIZE)
    view = memoryview(buffer)
    nbytes = messages = 0
    framed = isinstance(decoder, FrameDecoder)
    while True:
        count = sock.recv_into(buffer)
        if not count:
            return nbytes, messages
        for item in decoder.feed(view[:count]):
            if done(item):
                return nbytes, messages
            nbytes += len(item.payload if framed else item[1])
            messages += 1


def never(_item) -> bool:
    return False


def stdout_blob(seqs: list[int]) -> bytes:
    """io messages of the largest size, round robin over ``seqs``."""
    payload = b"x" * STDOUT_PAYLOAD
    one_round = b"".join(IO_HEADER.pack(seq, MAX_MESSAGE) + payload for seq in seqs)
    return one_round * max(1, BLOB_MESSAGES // len(seqs))


def stdin_blob() -> bytes:
    return frames.encode(FrameType.STREAM, Stream.STDIN, b"i" * STDIN_PAYLOAD) * BLOB_MESSAGES


# -- raw limit ---------------------------------------------------------------------------------------


def raw(name: str, blob: bytes, decoder, seconds: float) -> Result:
    """writer -> socketpair -> reader in two threads of this process, no proxy."""
    writer_sock, reader_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        def write():
            try:
                blob_writer(writer_sock, blob, seconds)
            finally:
                writer_sock.shutdown(socket.SHUT_WR)

        start = time.monotonic()
        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        nbytes, messages = stream_reader(reader_sock, decoder, never)
        elapsed = time.monotonic() - start
        thread.join(JOIN_SLACK)
        return Result(name, nbytes, messages, elapsed)
    finally:
        writer_sock.close()
        reader_sock.close()


def raw_stdout_blob() -> bytes:
    """The stdout blob as the shim receives it: stdout frames, same sizes as the io messages."""
    return frames.encode(FrameType.STREAM, Stream.STDOUT, b"x" * STDOUT_PAYLOAD) * BLOB_MESSAGES


def raw_stdin_blob() -> bytes:
    """The stdin blob as the agent receives it: io messages, same sizes as the frames."""
    return (IO_HEADER.pack(3, IO_HEADER.size + STDIN_PAYLOAD) + b"i" * STDIN_PAYLOAD) * BLOB_MESSAGES


# -- a minimal agent ---------------------------------------------------------------------------------


class BenchAgent:
    """Listens on ctl.sock and io.sock; READY on ctl, ACK to every command, output and stdin on io.

    The ctl thread records the stdio sequence number of every newcontainer; the io
    thread counts stdin per sequence number and signals the end of a stdin run
    (the empty message). Output is written by ``stream()`` under the io write lock.
    """

    def __init__(self, directory: str):
        self.ctl_path = os.path.join(directory, "ctl.sock")
        self.io_path = os.path.join(directory, "io.sock")
        self._listeners = []
        for path in (self.ctl_path, self.io_path):
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(4)
            self._listeners.append(listener)
        self.ctl: socket.socket | None = None
        self.io: socket.socket | None = None
        self.started: list[int] = []  # stdio sequence numbers of newcontainer, in order
        self.commands = 0
        self.stdin_bytes = 0
        self.stdin_messages = 0
        self.stdin_eof = threading.Event()
        self.io_lock = threading.Lock()
        self.errors: list[str] = []
        threading.Thread(target=self._accept, daemon=True, name="agent-accept").start()

    def _accept(self) -> None:
        try:
            self.ctl, _ = self._listeners[0].accept()
            self.ctl.sendall(CTL_HEADER.pack(AgentCode.READY, CTL_HEADER.size))
            self.io, _ = self._listeners[1].accept()
        except OSError as exc:
            self.errors.append(f"accept: {exc}")
            return
        threading.Thread(target=self._serve_ctl, daemon=True, name="agent-ctl").start()
        threading.Thread(target=self._read_io, daemon=True, name="agent-io").start()

    def _serve_ctl(self) -> None:
        decoder = CtlDecoder()
        ack = CTL_HEADER.pack(AgentCode.ACK, CTL_HEADER.size)
        try:
            while True:
                data = self.ctl.recv(RECV_SIZE)
                if not data:
                    return
                messages = decoder.feed(data)
                for code, payload in messages:
                    self.commands += 1
                    if code == AgentCode.NEWCONTAINER:
                        self.started.append(json.loads(payload)["process"]["stdio"])
                if messages:
                    self.ctl.sendall(ack * len(messages))
        except (OSError, ValueError, KeyError) as exc:
            self.errors.append(f"ctl: {exc!r}")

    def _read_io(self) -> None:
        """The stdin reader: the loop of ``stream_reader``, counting as it goes."""
        decoder = IoDecoder()
        buffer = bytearray(RECV_SIZE)
        view = memoryview(buffer)
        try:
            while True:
                count = self.io.recv_into(buffer)
                if not count:
                    return
                for seq, payload in decoder.feed(view[:count]):
                    if payload:
                        self.stdin_bytes += len(payload)
                        self.stdin_messages += 1
                    else:  # empty message: the shim's stdin is at EOF
                        self.stdin_eof.set()
        except OSError as exc:
            self.errors.append(f"io: {exc!r}")

    def stream(self, seqs: list[int], seconds: float) -> None:
        """Output for ``seqs`` as fast as possible for ``seconds``, then EOF and exit code 0 for each."""
        blob = stdout_blob(seqs)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with self.io_lock:
                self.io.sendall(blob)
        with self.io_lock:
            self.io.sendall(b"".join(IO_HEADER.pack(seq, IO_HEADER.size) + IO_HEADER.pack(seq, IO_HEADER.size + 1)
                                     + b"\0" for seq in seqs))

    def close(self) -> None:
        for sock in (*self._listeners, self.ctl, self.io):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()


# -- the proxy subprocess --------------------------------------------------------------------------


class Proxy:
    def __init__(self, directory: str):
        self.socket_path = os.path.join(directory, "proxy.sock")
        argv = [sys.executable, "-m", "cc_proxy", "--ksm", "initial", "--socket-path", self.socket_path,
                "--log", "error"]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        self.process = subprocess.Popen(argv, cwd=root, env=env, stdin=subprocess.DEVNULL)

    def connect(self) -> Client:
        return Client.connect_retry(self.socket_path, attempts=100, interval=0.05, timeout=JOIN_SLACK)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- proxy scenarios -------------------------------------------------------------------------------


def run_threads(targets: list[Callable[[], None]], timeout: float) -> None:
    """Run each target in a thread; re-raise the first failure."""
    failures: list[BaseException] = []

    def wrap(target):
        def run():
            try:
                target()
            except Exception as exc:  # noqa: BLE001 - the main thread re-raises it
                failures.append(exc)
        return run

    threads = [threading.Thread(target=wrap(t), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            raise TimeoutError("a benchmark thread is stuck")
    if failures:
        raise failures[0]


def start_processes(proxy: Proxy, runtime: Client, agent: BenchAgent, count: int, first: int) -> list[Client]:
    """AttachVM for ``count`` tokens, connect a shim for each, newcontainer each; return the shims."""
    tokens = runtime.attach_vm(VM_ID, num_io_streams=count).tokens
    shims = []
    try:
        for token in tokens:
            shim = proxy.connect()
            shims.append(shim)
            shim.connect_shim(token)
        for index, token in enumerate(tokens):
            runtime.hyper("newcontainer", {"id": f"c{first + index}", "process": {"args": ["x"]}}, tokens=[token])
    except BaseException:
        for shim in shims:
            shim.close()
        raise
    return shims


def is_exit(frame) -> bool:
    return frame.type == FrameType.NOTIFICATION and frame.opcode == Notification.PROCESS_EXITED


def stdout_scenario(name: str, proxy: Proxy, runtime: Client, agent: BenchAgent, count: int, first: int,
                    seconds: float) -> Result:
    shims = start_processes(proxy, runtime, agent, count, first)
    seqs = agent.started[-count:]
    totals = [(0, 0)] * count
    try:
        def reader(index):
            def read():
                sock = shims[index].sock
                sock.settimeout(seconds + JOIN_SLACK)
                totals[index] = stream_reader(sock, FrameDecoder(), is_exit)
            return read

        start = time.monotonic()
        run_threads([lambda: agent.stream(seqs, seconds)] + [reader(i) for i in range(count)], seconds + JOIN_SLACK)
        elapsed = time.monotonic() - start
    finally:
        for shim in shims:
            shim.close()
    return Result(name, sum(t[0] for t in totals), sum(t[1] for t in totals), elapsed)


def stdin_scenario(proxy: Proxy, runtime: Client, agent: BenchAgent, first: int, seconds: float) -> Result:
    (shim,) = start_processes(proxy, runtime, agent, 1, first)
    agent.stdin_eof.clear()
    before_bytes, before_messages = agent.stdin_bytes, agent.stdin_messages
    try:
        start = time.monotonic()
        blob_writer(shim.sock, stdin_blob(), seconds)
        shim.send_stdin(b"")  # EOF, after all the data on the agent side
        if not agent.stdin_eof.wait(JOIN_SLACK):
            raise TimeoutError("the agent never saw the end of stdin")
        elapsed = time.monotonic() - start
    finally:
        shim.close()
    return Result("stdin, 1 shim", agent.stdin_bytes - before_bytes, agent.stdin_messages - before_messages, elapsed)


def latency(name: str, call: Callable[[], object], seconds: float) -> tuple[str, int, float, list[float]]:
    samples = []
    deadline = time.monotonic() + seconds
    start = time.monotonic()
    clock = time.perf_counter
    while time.monotonic() < deadline:
        begin = clock()
        call()
        samples.append(clock() - begin)
    return name, len(samples), time.monotonic() - start, samples


# -- output ----------------------------------------------------------------------------------------


def show(result: Result, limit: Result | None) -> None:
    ratio = f"{result.mbps / limit.mbps:6.1%} of raw" if limit is not None else "(limit)"
    print(f"{result.name:<28} {result.mbps:9.1f} MB/s {result.rate:11.0f} msg/s   {ratio}", flush=True)


def show_latency(name: str, count: int, elapsed: float, samples: list[float]) -> None:
    samples.sort()
    p50 = samples[len(samples) // 2] * 1e6
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e6
    print(f"{name:<28} {count / elapsed:9.0f} ops/s  p50 {p50:7.0f} us  p99 {p99:7.0f} us", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each scenario (default 3)")
    parser.add_argument("--shims", type=int, default=8, help="shims of the parallel stdout scenario (default 8)")
    args = parser.parse_args(argv)
    seconds, shim_count = args.seconds, max(1, args.shims)

    print(f"cc-proxy benchmark: {seconds:g} s per scenario, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    raw_out = raw("raw limit, stdout-sized", raw_stdout_blob(), FrameDecoder(), seconds)
    show(raw_out, None)
    raw_in = raw("raw limit, stdin-sized", raw_stdin_blob(), IoDecoder(), seconds)
    show(raw_in, None)

    directory = tempfile.mkdtemp(prefix="ccb", dir="/tmp")  # short: AF_UNIX paths are limited to 107 bytes
    agent = proxy = runtime = None
    try:
        agent = BenchAgent(directory)
        proxy = Proxy(directory)
        runtime = proxy.connect()
        runtime.register_vm(VM_ID, agent.ctl_path, agent.io_path)
        show(stdout_scenario("stdout, 1 shim", proxy, runtime, agent, 1, 0, seconds), raw_out)
        show(stdout_scenario(f"stdout, {shim_count} shims (aggregate)", proxy, runtime, agent, shim_count, 1,
                             seconds), raw_out)
        show(stdin_scenario(proxy, runtime, agent, shim_count + 1, seconds), raw_in)

        with proxy.connect() as attacher:
            show_latency(*latency("AttachVM round trip", lambda: attacher.attach_vm(VM_ID), seconds))
        with proxy.connect() as pinger:
            pinger.attach_vm(VM_ID)
            show_latency(*latency("Hyper ping round trip", lambda: pinger.hyper("ping"), seconds))
        if agent.errors:
            print(f"agent errors: {agent.errors}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if runtime is not None:
            runtime.close()
        if proxy is not None:
            proxy.stop()
        if agent is not None:
            agent.close()
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # during the raw scenarios: nothing to clean up but daemon threads
        sys.exit(130)
