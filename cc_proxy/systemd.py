"""Small systemd helpers: socket activation, sd_notify, binding our own socket.

Nothing here imports gevent: plain ``socket`` and ``os`` calls cooperate once
the entry point has monkey-patched them. Nothing here logs either; callers
decide what is worth telling the operator.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

#: First file descriptor systemd passes (sd_listen_fds(3)).
SD_LISTEN_FDS_START = 3

_ACTIVATION_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(Exception):
    """The socket we were given, or the path we were told to bind, is unusable."""


def listen_fds(environ=os.environ, unset=True) -> int:
    """Return how many listening fds systemd handed to this process.

    0 unless ``LISTEN_PID`` is our pid and ``LISTEN_FDS`` is at least 1. With
    ``unset`` the activation variables are removed so children don't inherit
    them.
    """
    try:
        pid = int(environ.get("LISTEN_PID", ""))
        count = int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        pid, count = -1, 0
    finally:
        if unset:
            for name in _ACTIVATION_VARS:
                environ.pop(name, None)
    if pid != os.getpid() or count < 1:
        return 0
    return count


def activated_listener(environ=os.environ, fd: int = SD_LISTEN_FDS_START) -> socket.socket | None:
    """The listener systemd passed us, or None when not socket-activated.

    ``fd`` is only there for tests; systemd always starts at fd 3.
    """
    count = listen_fds(environ)
    if count == 0:
        return None
    if count > 1:
        raise ActivationError(f"too many activated sockets ({count})")
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ActivationError(f"activated fd {fd} is not a usable socket: {exc.strerror}") from exc
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()  # not ours to close: leave the fd as systemd gave it
        raise ActivationError(
            f"activated fd {fd} is not an AF_UNIX stream socket "
            "(check ListenStream= in cc-proxy.socket)"
        )
    return sock


def _is_listening(path: str) -> bool:
    """True when something accepts connections on the unix socket ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        if isinstance(exc, TimeoutError) or exc.errno == errno.EAGAIN:
            # Backlog full: a live but busy listener.
            return True
        raise
    finally:
        probe.close()
    return True


def bind_unix(path: str, backlog: int = 128) -> socket.socket:
    """Bind and listen on ``path``; the socket ends up mode 0660.

    The parent directory is created with mode 0750 if missing. A stale socket
    file (nobody accepting) is removed; a live one or a non-socket file makes
    us refuse with ActivationError, so we never steal another proxy's socket.
    """
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o750, exist_ok=True)
        os.chmod(parent, 0o750)  # makedirs' mode is filtered by the umask

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ActivationError(f"{path} exists and is not a socket: refusing to replace it")
        if _is_listening(path):
            raise ActivationError(f"another process is listening on {path}")
        os.unlink(path)

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o660)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def notify(state: str, environ=os.environ) -> bool:
    """sd_notify(3): send ``state`` (e.g. "READY=1") to $NOTIFY_SOCKET.

    Returns False, without error, when NOTIFY_SOCKET is unset. A leading "@"
    names an abstract socket.
    """
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(address)
        sock.sendall(state.encode())
    finally:
        sock.close()
    return True


def watchdog_interval(environ=os.environ) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None."""
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = environ.get("WATCHDOG_PID")
    try:
        if pid and int(pid) != os.getpid():
            return None
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2 / 1e6
