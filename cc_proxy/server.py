"""Listener, accept loop and lifecycle of the proxy.

Start: take the socket systemd handed us, or bind our own; start the router;
accept. Each client gets one greenlet in the server's group. Stop (SIGTERM,
SIGINT, or pod mode done): close the listener, close every client and VM,
join the client greenlets for ``stop_timeout``, kill what is left, restore
KSM, remove the socket file if we bound it, exit 0.

Pod mode (one proxy per VM): after UnregisterVM, stop accepting and exit once
the VM's agent channels are gone; exit as well when the VM is lost.
"""

from __future__ import annotations

import errno
import os
import signal

import gevent
from gevent.event import Event
from gevent.pool import Group
from loguru import logger

from cc_proxy import diagnostics, logsetup, systemd
from cc_proxy.connection import Connection
from cc_proxy.ksm import Ksm
from cc_proxy.router import Router

# Back-off when accept() fails for lack of file descriptors.
ACCEPT_BACKOFF = 0.1
# How often STATUS= is refreshed for systemd when no watchdog sets the pace.
STATUS_INTERVAL = 5.0


def _notify(state: str) -> None:
    """Tell systemd, if it listens; a vanished notify socket is logged, never fatal."""
    try:
        systemd.notify(state)
    except OSError as exc:
        logger.warning("sd_notify({}) failed: {}", state.split("=", 1)[0], exc)


class Proxy:
    """What every connection shares: config, router, the URL handed to shims."""

    def __init__(self, config, router: Router, server: Server):
        self.config = config
        self.router = router
        self.url = config.uri_for_clients
        self.log = logger
        self._server = server

    def vm_registered(self, vm) -> None:
        self._server.vm_registered(vm)

    def vm_unregistered(self, vm) -> None:
        self._server.vm_unregistered(vm)


class Server:
    def __init__(self, config, reload=None):
        self.config = config
        self.reload = reload  # callable returning a fresh Config (SIGHUP)
        self.router = Router(on_vm_gone=self._vm_gone)
        self.proxy = Proxy(config, self.router, self)
        self.ksm = Ksm(config.ksm, config.ksm_root, config.meminfo_path, config.ksm_aggressive_seconds,
                       config.ksm_standard_seconds, config.ksm_slow_seconds, logger=logger)
        self.listener = None
        self.bound_inode = None  # set when we bound the socket file ourselves
        self.connections: set[Connection] = set()
        self.clients = Group()
        self.tasks = Group()  # accept loop, watchdog, signal work
        self.stopped = Event()
        self.exit_code = 0
        self._unregistered = False

    # -- start -------------------------------------------------------------------

    def start(self) -> None:
        listener = systemd.activated_listener()
        if listener is None:
            listener = systemd.bind_unix(self.config.socket_path)
            self.bound_inode = os.stat(self.config.socket_path).st_ino
            logger.info("listening on {}", self.config.socket_path)
        else:
            logger.info("listening on the socket handed over by systemd")
        self.listener = listener
        self.router.start()
        self.ksm.start()
        self.tasks.spawn(self._accept_loop)
        _notify("READY=1\nSTATUS=" + self._status())
        if os.environ.get("NOTIFY_SOCKET"):
            self.tasks.spawn(self._notify_loop, systemd.watchdog_interval())

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError as exc:
                if self.stopped.is_set() or exc.errno in (errno.EBADF, errno.EINVAL):
                    return
                logger.error("accept failed: {}", exc)
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    gevent.sleep(ACCEPT_BACKOFF)
                continue
            conn = Connection(sock, self.proxy)
            self.connections.add(conn)
            greenlet = self.clients.spawn(conn.serve)
            greenlet.link(lambda _g, conn=conn: self.connections.discard(conn))

    def _notify_loop(self, watchdog: float | None) -> None:
        """Ping the watchdog from the event loop and keep STATUS= current (shims come and go)."""
        status = None
        while True:
            fresh = self._status()
            state = [f"STATUS={fresh}"] if fresh != status else []
            if watchdog:
                state.append("WATCHDOG=1")
            if state:
                _notify("\n".join(state))
            status = fresh
            gevent.sleep(watchdog or STATUS_INTERVAL)

    def _status(self) -> str:
        vms = len(self.router.live_vms)
        shims = sum(1 for s in self.router.tokens.values() if s.shim is not None)
        return f"{vms} VM(s), {shims} shim(s), {len(self.connections)} client(s)"

    # -- VM events (from a client greenlet or a VM teardown) ------------------------

    def vm_registered(self, vm) -> None:
        self.ksm.vm_registered()
        _notify("STATUS=" + self._status())

    def _vm_gone(self, vm) -> None:
        _notify("STATUS=" + self._status())
        if self.config.pod_mode:
            logger.info("pod mode: the VM {} is gone ({}), exiting", vm.container_id, vm.lost_reason)
            self.request_stop()

    def vm_unregistered(self, vm) -> None:
        if self.config.pod_mode and not self._unregistered:
            self._unregistered = True
            logger.info("pod mode: VM {} unregistered; no new clients, exiting once its channels close",
                        vm.container_id)
            self._close_listener()

    # -- signals -------------------------------------------------------------------

    def install_signals(self) -> list:
        return [
            gevent.signal_handler(signal.SIGTERM, self.request_stop),
            gevent.signal_handler(signal.SIGINT, self.request_stop),
            gevent.signal_handler(signal.SIGUSR1, lambda: self.tasks.spawn(self.dump)),
            gevent.signal_handler(signal.SIGHUP, lambda: self.tasks.spawn(self.reload_config)),
        ]

    def request_stop(self) -> None:
        self.stopped.set()

    def dump(self) -> None:
        """SIGUSR1: every greenlet's stack and a table of VMs and sessions."""
        stats = self.router.call(self.router.statistics)
        vm_table = diagnostics.format_table(stats["vms"], ["vm", "sessions", "shims", "lost"])
        session_table = diagnostics.format_table(
            stats["sessions"], ["vm", "token", "seq", "container", "shim", "started", "bytes_in", "bytes_out",
                                "pending"])
        logger.warning("state dump (SIGUSR1)\nVMs:\n{}\nSessions:\n{}\nGreenlets:\n{}",
                       vm_table, session_table, diagnostics.greenlet_stacks())

    def reload_config(self) -> None:
        """SIGHUP: re-read the conf file; only the log level applies without a restart."""
        if self.reload is None:
            return
        try:
            fresh = self.reload()
        except Exception as exc:  # noqa: BLE001 (any failure keeps the old config)
            logger.error("SIGHUP: configuration not reloaded: {}", exc)
            return
        logsetup.set_level(fresh.log_level)
        changed = [name for name in ("socket_path", "ksm", "ready_timeout", "shim_timeout", "process_timeout",
                                     "max_payload", "agent_message_size", "shim_buffer_bytes", "log_format")
                   if getattr(fresh, name) != getattr(self.config, name)]
        logger.warning("SIGHUP: log level is now {}{}", fresh.log_level,
                       f"; changes to {', '.join(changed)} need a restart" if changed else "")

    # -- stop ----------------------------------------------------------------------

    def _close_listener(self) -> None:
        if self.listener is None:
            return
        listener, self.listener = self.listener, None
        listener.close()
        if self.bound_inode is not None:
            try:
                if os.stat(self.config.socket_path).st_ino == self.bound_inode:
                    os.unlink(self.config.socket_path)
            except OSError:
                pass
            self.bound_inode = None

    def stop(self) -> None:
        _notify("STOPPING=1")
        self._close_listener()
        for vm in list(self.router.live_vms):
            vm.close("the proxy is stopping")
        for conn in list(self.connections):
            conn.close()
        self.clients.join(timeout=self.config.stop_timeout)
        self.clients.kill(timeout=1)
        self.tasks.kill(timeout=1)
        self.router.stop()
        self.ksm.stop()

    def serve_forever(self) -> int:
        handlers = self.install_signals()
        try:
            self.start()
            self.stopped.wait()
            logger.info("stopping")
        finally:
            self.stop()
            for handler in handlers:
                handler.cancel()
        return self.exit_code


def serve(config, reload=None) -> int:
    try:
        server = Server(config, reload)
        return server.serve_forever()
    except (systemd.ActivationError, OSError) as exc:
        logger.error("cannot start: {}", exc)
        return 1
