import os
import socket
import stat

import pytest

from cc_proxy import systemd

pytestmark = pytest.mark.timeout(60)


# -- listen_fds / activated_listener ------------------------------------------

def activation_env(count=1, pid=None):
    return {
        "LISTEN_PID": str(os.getpid() if pid is None else pid),
        "LISTEN_FDS": str(count),
        "LISTEN_FDNAMES": "proxy.sock",
        "OTHER": "kept",
    }


def test_listen_fds_counts_and_unsets():
    env = activation_env(2)
    assert systemd.listen_fds(env) == 2
    assert env == {"OTHER": "kept"}


def test_listen_fds_keeps_variables_when_asked():
    env = activation_env(1)
    assert systemd.listen_fds(env, unset=False) == 1
    assert env["LISTEN_FDS"] == "1"


@pytest.mark.parametrize(
    "env",
    [
        {},
        activation_env(1, pid=os.getpid() + 1),
        activation_env(0),
        {"LISTEN_PID": "garbage", "LISTEN_FDS": "1"},
        {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"},
    ],
    ids=["unset", "other-pid", "zero-fds", "bad-pid", "bad-count"],
)
def test_listen_fds_not_for_us(env):
    assert systemd.listen_fds(env) == 0
    assert "LISTEN_PID" not in env and "LISTEN_FDS" not in env


def test_activated_listener_none_when_not_activated():
    assert systemd.activated_listener({}) is None


def test_activated_listener_uses_the_fd(tmp_path):
    path = str(tmp_path / "s.sock")
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.bind(path)
    raw.listen(1)
    fd = raw.detach()
    env = activation_env(1)
    sock = systemd.activated_listener(env, fd=fd)
    try:
        assert sock.fileno() == fd
        assert "LISTEN_PID" not in env
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        conn, _ = sock.accept()
        conn.close()
        client.close()
    finally:
        sock.close()


def test_activated_listener_refuses_several_fds():
    with pytest.raises(systemd.ActivationError, match=r"too many activated sockets \(2\)"):
        systemd.activated_listener(activation_env(2))


def test_activated_listener_refuses_wrong_socket_kind():
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with pytest.raises(systemd.ActivationError, match="not an AF_UNIX stream socket"):
            systemd.activated_listener(activation_env(1), fd=udp.fileno())
        # The fd is left open for its owner.
        os.fstat(udp.fileno())
    finally:
        udp.close()


def test_activated_listener_refuses_non_socket(tmp_path):
    fd = os.open(tmp_path / "plain", os.O_CREAT | os.O_RDWR)
    try:
        with pytest.raises(systemd.ActivationError, match="not a usable socket"):
            systemd.activated_listener(activation_env(1), fd=fd)
    finally:
        os.close(fd)


# -- bind_unix ----------------------------------------------------------------

def test_bind_unix_creates_dir_and_modes(tmp_path):
    path = tmp_path / "run" / "clear-containers" / "proxy.sock"
    sock = systemd.bind_unix(str(path))
    try:
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o750
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))
        conn, _ = sock.accept()
        conn.close()
        client.close()
    finally:
        sock.close()


def test_bind_unix_leaves_existing_dir_mode(tmp_path):
    os.chmod(tmp_path, 0o755)
    sock = systemd.bind_unix(str(tmp_path / "proxy.sock"))
    sock.close()
    assert stat.S_IMODE(os.stat(tmp_path).st_mode) == 0o755


def test_bind_unix_removes_stale_socket(tmp_path):
    path = str(tmp_path / "proxy.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    sock = systemd.bind_unix(path)
    try:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        client.close()
    finally:
        sock.close()


def test_bind_unix_refuses_live_socket(tmp_path):
    path = str(tmp_path / "proxy.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(4)
    try:
        with pytest.raises(systemd.ActivationError, match="another process is listening on"):
            systemd.bind_unix(path)
        # The other listener still owns its file.
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        live.close()


def test_bind_unix_refuses_regular_file(tmp_path):
    path = tmp_path / "proxy.sock"
    path.write_text("precious")
    with pytest.raises(systemd.ActivationError, match="not a socket"):
        systemd.bind_unix(str(path))
    assert path.read_text() == "precious"


# -- notify / watchdog ----------------------------------------------------------

def test_notify_without_socket_is_false():
    assert systemd.notify("READY=1", {}) is False


def test_notify_path_socket(tmp_path):
    path = str(tmp_path / "notify")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(5)
    try:
        assert systemd.notify("READY=1", {"NOTIFY_SOCKET": path}) is True
        assert receiver.recv(4096) == b"READY=1"
    finally:
        receiver.close()


def test_notify_abstract_socket():
    name = f"cc-proxy-test-{os.getpid()}-{id(object())}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    receiver.settimeout(5)
    try:
        assert systemd.notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@" + name}) is True
        assert receiver.recv(4096) == b"WATCHDOG=1"
    finally:
        receiver.close()


def test_notify_unreachable_socket_raises(tmp_path):
    with pytest.raises(OSError):
        systemd.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "absent")})


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env, expected):
    assert systemd.watchdog_interval(env) == expected
