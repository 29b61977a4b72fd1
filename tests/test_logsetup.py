"""The loguru configuration: formats, structured fields, syslog, helpers."""

from __future__ import annotations

import io
import socket

import pytest
from loguru import logger

from cc_proxy import config, logsetup
from cc_proxy.router import new_token

pytestmark = pytest.mark.timeout(30)


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch, tmp_path):
    # Never reach the host's /dev/log from a test.
    monkeypatch.setattr(logsetup, "SYSLOG_PATH", str(tmp_path / "no-log"))
    yield
    logsetup._remove_ours()
    logsetup._state.config = None
    logsetup._state.level_no = None


def plain(**overrides) -> tuple[config.Config, io.StringIO]:
    buf = io.StringIO()
    cfg = config.build(log_format="plain", **overrides)
    logsetup.configure(cfg, stream=buf, environ={})
    return cfg, buf


def test_plain_renders_bound_fields():
    _, buf = plain(log_level="debug")
    logger.bind(client=3, vm="pod-1", token=logsetup.token_prefix("abcdefghijkl")).info(
        "attached {} streams", 2)
    assert buf.getvalue() == (
        "INFO attached 2 streams client=3 vm=pod-1 token=abcdefgh\n")


def test_plain_without_fields_and_with_braces():
    _, buf = plain(log_level="info")
    logger.info("payload {'a': 1}")  # no args: the braces are not a template
    assert buf.getvalue() == "INFO payload {'a': 1}\n"


def test_field_values_are_quoted_when_needed():
    _, buf = plain(log_level="info")
    logger.bind(vm="a b", err='say "x"\nmore', empty="").warning("w")
    assert buf.getvalue() == (
        'WARNING w vm="a b" err="say \\"x\\"\\nmore" empty=""\n')


def test_field_values_with_braces_and_tags():
    _, buf = plain(log_level="info")
    logger.bind(payload="{x} <red>").error("e")
    assert buf.getvalue() == "ERROR e payload=\"{x} <red>\"\n"


def test_level_filters():
    _, buf = plain()  # default: warn
    logger.info("hidden")
    logger.warning("shown")
    assert buf.getvalue() == "WARNING shown\n"
    assert not logsetup.is_debug()


def test_exception_is_logged():
    _, buf = plain(log_level="error")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("failed")
    text = buf.getvalue()
    assert text.startswith("ERROR failed\nTraceback")
    assert "RuntimeError: boom" in text


def test_set_level_changes_our_sinks():
    _, buf = plain()
    logger.debug("before")
    assert not logsetup.is_debug()
    logsetup.set_level("debug")
    assert logsetup.is_debug()
    logger.debug("after")
    logsetup.set_level("panic")
    logger.error("not shown")
    logger.critical("shown")
    assert buf.getvalue() == "DEBUG after\nCRITICAL shown\n"


def test_set_level_rejects_bad_names():
    plain()
    with pytest.raises(ValueError, match="invalid log level"):
        logsetup.set_level("loud")


def test_reconfigure_replaces_our_sinks():
    _, first = plain(log_level="info")
    _, second = plain(log_level="info")
    logger.info("once")
    assert first.getvalue() == ""
    assert second.getvalue() == "INFO once\n"


def test_auto_is_plain_under_journald_and_off_a_tty():
    tty = TTY()
    logsetup.configure(config.build(log_level="info"), stream=tty,
                       environ={"JOURNAL_STREAM": "8:1234"})
    logger.info("journal")
    assert tty.getvalue() == "INFO journal\n"

    pipe = io.StringIO()
    logsetup.configure(config.build(log_level="info"), stream=pipe, environ={})
    logger.info("pipe")
    assert pipe.getvalue() == "INFO pipe\n"


def test_auto_is_human_on_a_tty():
    tty = TTY()
    logsetup.configure(config.build(log_level="info"), stream=tty, environ={})
    logger.bind(vm="v1").info("hello")
    text = tty.getvalue()
    # Timestamp, padded level, source location, message and fields.
    assert "INFO" in text and "hello" in text and "vm=v1" in text
    assert text[:4].isdigit() or "\x1b[" in text[:10]


def test_human_format_renders_fields():
    buf = io.StringIO()
    logsetup.configure(config.build(log_level="info", log_format="human"),
                       stream=buf, environ={})
    logger.bind(client=1).info("x")
    line = buf.getvalue()
    assert "| INFO     |" in line
    assert line.rstrip().endswith("x client=1")


def test_syslog_missing_path_does_not_raise(tmp_path):
    buf = io.StringIO()
    cfg = config.build(log_format="plain", uri=f"unix://{tmp_path}/p.sock")
    logsetup.configure(cfg, stream=buf, environ={})
    assert "WARNING syslog unavailable" in buf.getvalue()
    assert str(tmp_path / "no-log") in buf.getvalue()


def test_syslog_path_not_a_socket_does_not_raise(tmp_path, monkeypatch):
    path = tmp_path / "file"
    path.write_text("")
    monkeypatch.setattr(logsetup, "SYSLOG_PATH", str(path))
    buf = io.StringIO()
    cfg = config.build(log_format="plain", uri=f"unix://{tmp_path}/p.sock")
    logsetup.configure(cfg, stream=buf, environ={})
    assert "WARNING syslog unavailable" in buf.getvalue()


def test_pod_mode_logs_to_syslog(tmp_path, monkeypatch):
    path = tmp_path / "log"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(10)
    monkeypatch.setattr(logsetup, "SYSLOG_PATH", str(path))
    try:
        cfg = config.build(log_format="plain", log_level="info",
                           uri=f"unix://{tmp_path}/p.sock")
        buf = io.StringIO()
        logsetup.configure(cfg, stream=buf, environ={})
        logger.bind(vm="v1").info("to syslog")
        datagram = server.recv(4096).decode()
    finally:
        logsetup._remove_ours()
        server.close()
    # <30> = facility daemon (3) * 8 + priority info (6).
    assert datagram.startswith("<30>cc-proxy[")
    assert "]: INFO to syslog vm=v1" in datagram
    assert buf.getvalue() == "INFO to syslog vm=v1\n"


def test_system_mode_does_not_use_syslog(tmp_path, monkeypatch):
    path = tmp_path / "log"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.setblocking(False)
    monkeypatch.setattr(logsetup, "SYSLOG_PATH", str(path))
    try:
        plain(log_level="info")
        logger.info("stderr only")
        with pytest.raises(BlockingIOError):
            server.recv(4096)
    finally:
        server.close()


def test_token_prefix():
    assert logsetup.token_prefix("0123456789abcdef") == "01234567"
    assert logsetup.token_prefix("abc") == "abc"
    assert logsetup.token_prefix("") == "-"
    assert logsetup.token_prefix(None) == "-"


def test_redact_tokens_keeps_only_prefixes():
    token = new_token()
    text = f"token already claimed: {token}; again {token}"
    assert logsetup.redact_tokens(text) == f"token already claimed: {token[:8]}; again {token[:8]}"
    assert logsetup.redact_tokens("unknown token: bogus-token") == "unknown token: bogus-token"


def test_hexdump():
    dump = logsetup.hexdump(b"hello\x00world\xff" + bytes(range(0x41, 0x45)))
    assert dump.splitlines() == [
        "0000  68 65 6c 6c 6f 00 77 6f 72 6c 64 ff 41 42 43 44  |hello.world.ABCD|",
    ]
    assert logsetup.hexdump(b"") == "(empty)"


def test_hexdump_truncates():
    dump = logsetup.hexdump(b"a" * 40, limit=20)
    lines = dump.splitlines()
    assert lines[0] == "0000  " + " ".join(["61"] * 16) + "  |" + "a" * 16 + "|"
    assert lines[1] == "0010  61 61 61 61" + " " * 36 + "  |aaaa|"
    assert lines[2] == "... 20 more bytes (40 total)"
    assert len(lines) == 3


def test_hexdump_accepts_memoryview():
    assert "|ab|" in logsetup.hexdump(memoryview(b"ab"))
