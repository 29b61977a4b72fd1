"""The router: sole owner of the VM registry and the token table.

Client greenlets never touch the registry themselves: they send the router a
request (a function of the router and its arguments) through a bounded queue
and wait for the answer. The router greenlet runs requests one at a time and
never blocks inside one, so every change of registry or token state is atomic
and a snapshot (``statistics``) is always consistent.

Blocking work (connecting to an agent) happens in the client greenlet between
two requests: ``reserve`` a container id, connect, then ``commit`` or ``abort``.
"""

from __future__ import annotations

import base64
import os

import gevent
from gevent.event import AsyncResult
from gevent.queue import Queue

from cc_proxy.errors import ProxyError
from cc_proxy.session import Session
from cc_proxy.vm import VM

# Requests are tiny and run at once; a full queue means the router is wedged,
# so callers wait rather than pile up without bound.
QUEUE_BOUND = 1024
TOKEN_BYTES = 32


def new_token() -> str:
    """32 bytes from the OS CSPRNG, URL-safe base64 with padding (44 characters)."""
    return base64.urlsafe_b64encode(os.urandom(TOKEN_BYTES)).decode()


class Router:
    def __init__(self, on_vm_gone=None):
        self.vms: dict[str, VM] = {}
        self.reserved: set[str] = set()
        self.tokens: dict[str, Session] = {}
        self.live_vms: set[VM] = set()  # registered or not, until their channels close
        self.on_vm_gone = on_vm_gone  # e.g. pod mode exit
        self._queue: Queue = Queue(QUEUE_BOUND)
        self._greenlet = None

    # -- the greenlet ------------------------------------------------------------

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()
            self._greenlet = None

    def _run(self) -> None:
        while True:
            func, args, result = self._queue.get()
            try:
                result.set(func(*args))
            except ProxyError as exc:
                result.set_exception(exc)
            except Exception as exc:  # noqa: BLE001 (a bug: the caller logs it with context)
                result.set_exception(exc)

    def call(self, func, *args):
        """Run ``func(*args)`` in the router greenlet and return its result.

        Never call it from the router greenlet itself (a request waiting on itself).
        """
        result = AsyncResult()
        self._queue.put((func, args, result))
        return result.get()

    # -- requests: each runs inside the router greenlet --------------------------

    def reserve(self, container_id: str) -> None:
        if container_id in self.vms or container_id in self.reserved:
            raise ProxyError(f"{container_id}: container already registered")
        self.reserved.add(container_id)

    def abort(self, container_id: str) -> None:
        self.reserved.discard(container_id)

    def commit(self, vm: VM, num_io_streams: int) -> list[str]:
        self.reserved.discard(vm.container_id)
        self.vms[vm.container_id] = vm
        self.live_vms.add(vm)
        vm.on_lost = self._vm_lost
        return self._allocate(vm, num_io_streams)

    def attach(self, container_id: str, num_io_streams: int) -> tuple[VM, list[str]]:
        vm = self.vms.get(container_id)
        if vm is None:
            raise ProxyError(f"unknown containerID: {container_id}")
        return vm, self._allocate(vm, num_io_streams)

    def unregister(self, container_id: str) -> VM:
        vm = self.vms.pop(container_id, None)
        if vm is None:
            raise ProxyError(f"unknown containerID: {container_id}")
        return vm

    def claim(self, token: str, shim) -> Session:
        session = self.tokens.get(token)
        if session is None:
            raise ProxyError(f"unknown token: {token}")
        if session.shim is not None:
            raise ProxyError(f"token already claimed: {token}")
        session.attach_shim(shim)
        return session

    def release(self, session: Session, shim) -> None:
        """The shim's connection dropped without DisconnectShim: the token may be claimed again."""
        if session.shim is shim:
            session.detach_shim()

    def free(self, session: Session) -> None:
        """DisconnectShim: the token is gone for good."""
        self.tokens.pop(session.token, None)
        session.detach_shim()
        session.vm.forget_session(session)

    def _allocate(self, vm: VM, count: int) -> list[str]:
        tokens = []
        for _ in range(count):
            token = new_token()
            session = vm.new_session(token)
            self.tokens[token] = session
            tokens.append(token)
        return tokens

    def _vm_lost(self, vm: VM) -> None:
        """Called from the VM's teardown: forget it and every token it had."""
        self.call(self._forget_vm, vm)
        if self.on_vm_gone is not None:
            self.on_vm_gone(vm)

    def _forget_vm(self, vm: VM) -> None:
        if self.vms.get(vm.container_id) is vm:
            del self.vms[vm.container_id]
        for token in list(vm.sessions_by_token):
            session = self.tokens.pop(token, None)
            if session is not None:
                vm.forget_session(session)
        self.live_vms.discard(vm)

    # -- inspection ----------------------------------------------------------------

    def statistics(self) -> dict:
        """A consistent snapshot (call through ``call`` from other greenlets)."""
        return {
            "vms": [vm.statistics() for vm in self.live_vms],
            "registered": sorted(self.vms),
            "tokens": len(self.tokens),
            "shims": sum(1 for s in self.tokens.values() if s.shim is not None),
            "sessions": [dict(s.statistics(), vm=s.vm.container_id) for s in self.tokens.values()],
        }
