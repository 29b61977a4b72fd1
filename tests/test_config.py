"""Configuration: precedence, spellings, sources and every error path."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from cc_proxy import config
from cc_proxy.config import ConfigError, load

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parent.parent
NO_ENV: dict[str, str] = {}


@pytest.fixture
def conf(tmp_path):
    """Write a conf file and return the --config arguments naming it."""

    def write(text: str) -> list[str]:
        path = tmp_path / "cc-proxy.toml"
        path.write_text(text)
        return ["--config", str(path)]

    return write


@pytest.fixture
def empty_conf(conf):
    # Isolate every test from a /etc/cc-proxy/cc-proxy.toml on the host.
    return conf("")


def test_defaults(empty_conf):
    cfg = load(empty_conf, NO_ENV)
    assert cfg.socket_path == config.DEFAULT_SOCKET_PATH
    assert cfg.uri is None and not cfg.pod_mode
    assert cfg.log_level == "WARNING"
    assert cfg.log_format == "auto"
    assert cfg.ksm == "auto"
    assert cfg.ksm_root == "/sys/kernel/mm/ksm"
    assert cfg.meminfo_path == "/proc/meminfo"
    assert (cfg.ksm_aggressive_seconds, cfg.ksm_standard_seconds,
            cfg.ksm_slow_seconds) == (30, 120, 120)
    assert (cfg.ready_timeout, cfg.shim_timeout, cfg.process_timeout,
            cfg.stop_timeout) == (30, 30, 30, 5)
    assert cfg.max_payload == 1048576
    assert cfg.agent_message_size == 10240
    assert cfg.shim_buffer_bytes == 4194304
    assert set(cfg.sources.values()) == {"default"}
    assert set(cfg.sources) == {opt.name for opt in config.OPTIONS}
    assert cfg.uri_for_clients == "unix://" + config.DEFAULT_SOCKET_PATH


def test_missing_default_conf_is_fine(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "DEFAULT_CONF_PATH", str(tmp_path / "none.toml"))
    cfg = load([], NO_ENV)
    assert cfg.config_path is None


def test_default_conf_is_read_when_present(monkeypatch, tmp_path):
    path = tmp_path / "cc-proxy.toml"
    path.write_text("ready_timeout = 7\n")
    monkeypatch.setattr(config, "DEFAULT_CONF_PATH", str(path))
    cfg = load([], NO_ENV)
    assert cfg.ready_timeout == 7.0
    assert cfg.config_path == str(path)
    assert cfg.sources["ready_timeout"] == f"conf file {path}"


def test_log_level_precedence(conf):
    args = conf('log_level = "error"\n')
    cfg = load(args, NO_ENV)
    assert cfg.log_level == "ERROR"
    assert cfg.sources["log_level"] == f"conf file {args[1]}"

    cfg = load(args, {"CC_PROXY_LOG_LEVEL": "info"})
    assert cfg.log_level == "INFO"
    assert cfg.sources["log_level"] == "environment CC_PROXY_LOG_LEVEL"

    cfg = load(args + ["--log", "debug"], {"CC_PROXY_LOG_LEVEL": "info"})
    assert cfg.log_level == "DEBUG"
    assert cfg.sources["log_level"] == "command line --log"


def test_empty_environment_variable_is_ignored(empty_conf):
    cfg = load(empty_conf, {"CC_PROXY_LOG_LEVEL": ""})
    assert cfg.sources["log_level"] == "default"


def test_environment_only_sets_the_log_level(empty_conf):
    cfg = load(empty_conf, {"CC_PROXY_READY_TIMEOUT": "3", "CC_PROXY_KSM": "off"})
    assert cfg.ready_timeout == 30 and cfg.ksm == "auto"


def test_other_options_precedence(conf):
    args = conf('ready_timeout = 2.5\nmax_payload = 4096\nksm = "off"\n'
                'socket_path = "/tmp/conf/proxy.sock"\n')
    cfg = load(args, NO_ENV)
    assert cfg.ready_timeout == 2.5
    assert cfg.max_payload == 4096
    assert cfg.ksm == "off"
    assert cfg.socket_path == "/tmp/conf/proxy.sock"
    assert cfg.sources["max_payload"] == f"conf file {args[1]}"

    cfg = load(args + ["--ready-timeout", "0.25", "--max-payload", "100",
                       "--ksm", "initial", "--socket-path", "/tmp/cli.sock"],
               NO_ENV)
    assert cfg.ready_timeout == 0.25
    assert cfg.max_payload == 100
    assert cfg.ksm == "initial"
    assert cfg.socket_path == "/tmp/cli.sock"
    assert cfg.sources["ready_timeout"] == "command line --ready-timeout"
    assert cfg.sources["ksm"] == "command line --ksm"
    assert cfg.sources["shim_timeout"] == "default"


@pytest.mark.parametrize("flag,value,field,expected", [
    ("--shim-timeout", "1.5", "shim_timeout", 1.5),
    ("--process-timeout", "2", "process_timeout", 2.0),
    ("--stop-timeout", "0.1", "stop_timeout", 0.1),
    ("--agent-message-size", "13", "agent_message_size", 13),
    ("--shim-buffer-bytes", "10", "shim_buffer_bytes", 10),
    ("--ksm-root", "/tmp/ksm", "ksm_root", "/tmp/ksm"),
    ("--meminfo-path", "/tmp/meminfo", "meminfo_path", "/tmp/meminfo"),
    ("--ksm-aggressive-seconds", "1", "ksm_aggressive_seconds", 1.0),
    ("--ksm-standard-seconds", "2", "ksm_standard_seconds", 2.0),
    ("--ksm-slow-seconds", "3", "ksm_slow_seconds", 3.0),
    ("--log-format", "PLAIN", "log_format", "plain"),
    ("-log-format", "human", "log_format", "human"),
])
def test_each_flag(empty_conf, flag, value, field, expected):
    cfg = load(empty_conf + [flag, value], NO_ENV)
    assert getattr(cfg, field) == expected
    assert cfg.sources[field].startswith("command line --")


@pytest.mark.parametrize("name,expected", [
    ("debug", "DEBUG"), ("INFO", "INFO"), ("warn", "WARNING"),
    ("Warning", "WARNING"), ("error", "ERROR"), ("fatal", "CRITICAL"),
    ("panic", "CRITICAL"),
])
def test_log_level_names(empty_conf, name, expected):
    assert load(empty_conf + ["-log", name], NO_ENV).log_level == expected


def test_single_dash_spellings(empty_conf):
    cfg = load(empty_conf + ["-uri", "unix:///tmp/x/proxy.sock", "-log", "debug"],
               NO_ENV)
    assert cfg.pod_mode
    assert cfg.uri == "unix:///tmp/x/proxy.sock"
    assert cfg.socket_path == "/tmp/x/proxy.sock"
    assert cfg.sources["socket_path"] == "command line --uri"
    assert cfg.log_level == "DEBUG"
    assert cfg.uri_for_clients == "unix:///tmp/x/proxy.sock"

    cfg = load(["-config", empty_conf[1], "-socket-path", "/tmp/s.sock",
                "-ksm", "off"], NO_ENV)
    assert cfg.socket_path == "/tmp/s.sock"
    assert cfg.ksm == "off"
    assert cfg.config_path == empty_conf[1]


def test_socket_path_beats_uri(empty_conf):
    cfg = load(empty_conf + ["--uri", "unix:///tmp/x/proxy.sock",
                             "--socket-path", "/tmp/other.sock"], NO_ENV)
    assert cfg.pod_mode
    assert cfg.socket_path == "/tmp/other.sock"
    assert cfg.uri_for_clients == "unix:///tmp/other.sock"
    assert cfg.sources["socket_path"] == "command line --socket-path"


def test_uri_beats_conf_socket_path(conf):
    args = conf('socket_path = "/tmp/conf.sock"\n')
    cfg = load(args + ["-uri", "unix:///tmp/pod.sock"], NO_ENV)
    assert cfg.socket_path == "/tmp/pod.sock"


def test_relative_socket_path_is_made_absolute(empty_conf, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load(empty_conf + ["--socket-path", "proxy.sock"], NO_ENV)
    assert cfg.socket_path == str(tmp_path / "proxy.sock")
    assert os.path.isabs(cfg.socket_path)
    assert cfg.uri_for_clients == "unix://" + str(tmp_path / "proxy.sock")


def test_pod_mode_never_touches_ksm(empty_conf):
    cfg = load(empty_conf + ["-uri", "unix:///tmp/p.sock", "-ksm", "auto"], NO_ENV)
    assert cfg.ksm == "initial"
    assert cfg.sources["ksm"] == "pod mode"


def test_config_is_frozen(empty_conf):
    cfg = load(empty_conf, NO_ENV)
    with pytest.raises(AttributeError):
        cfg.ready_timeout = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.sources["ksm"] = "x"  # type: ignore[index]


# ------------------------------------------------------------------ errors


def test_bad_level_from_each_source(conf):
    args = conf('log_level = "loud"\n')
    with pytest.raises(ConfigError) as e:
        load(args, NO_ENV)
    assert str(e.value) == (
        f"conf file {args[1]}: key 'log_level': invalid log level 'loud' "
        "(choose from debug, info, warn, warning, error, fatal, panic)")

    good = conf("")
    with pytest.raises(ConfigError, match="^environment CC_PROXY_LOG_LEVEL: "
                       "invalid log level 'loud'"):
        load(good, {"CC_PROXY_LOG_LEVEL": "loud"})

    with pytest.raises(ConfigError) as e:
        load(good + ["--log", "loud"], NO_ENV)
    assert str(e.value) == (
        "command line --log: invalid log level 'loud' "
        "(choose from debug, info, warn, warning, error, fatal, panic)")


def test_environment_is_not_read_when_log_flag_is_given(conf):
    # "CC_PROXY_LOG_LEVEL sets the level when --log is not given."
    cfg = load(conf("") + ["--log", "info"], {"CC_PROXY_LOG_LEVEL": "loud"})
    assert cfg.log_level == "INFO"


def test_bad_conf_value_is_an_error_even_when_the_flag_wins(conf):
    with pytest.raises(ConfigError, match="key 'log_level'"):
        load(conf('log_level = "loud"\n') + ["--log", "info"], NO_ENV)


def test_bad_number_in_conf(conf):
    args = conf('ready_timeout = "abc"\n')
    with pytest.raises(ConfigError) as e:
        load(args, NO_ENV)
    assert str(e.value) == (f"conf file {args[1]}: key 'ready_timeout': "
                            "expected a positive number, got 'abc'")


@pytest.mark.parametrize("toml_value", ["0", "-1", "true", "nan", "inf",
                                        "[1]", '"1e"'])
def test_bad_timeouts_in_conf(conf, toml_value):
    args = conf(f"shim_timeout = {toml_value}\n")
    with pytest.raises(ConfigError, match="key 'shim_timeout': expected a "
                       "positive number"):
        load(args, NO_ENV)


@pytest.mark.parametrize("flag,value,message", [
    ("--ready-timeout", "abc", ("command line --ready-timeout: expected a "
                               "positive number, got 'abc'")),
    ("--ready-timeout", "0", ("command line --ready-timeout: expected a "
                             "positive number, got '0'")),
    ("--max-payload", "1.5", ("command line --max-payload: expected a positive "
                             "integer, got '1.5'")),
    ("--max-payload", "0", ("command line --max-payload: expected a positive "
                           "integer, got '0'")),
    ("--shim-buffer-bytes", "x", ("command line --shim-buffer-bytes: expected "
                                 "a positive integer")),
    ("--agent-message-size", "12", ("command line --agent-message-size: "
                                   "expected an integer between 13 and 10240")),
    ("--agent-message-size", "10241", ("command line --agent-message-size: "
                                      "expected an integer between 13 and")),
    ("--ksm", "fast", ("command line --ksm: invalid KSM mode 'fast' "
                      "(choose from off, initial, auto)")),
    ("--log-format", "json", "command line --log-format: invalid log format"),
    ("--ksm-slow-seconds", "-3", "command line --ksm-slow-seconds: expected"),
])
def test_bad_command_line_values(empty_conf, flag, value, message):
    with pytest.raises(ConfigError) as e:
        load(empty_conf + [flag, value], NO_ENV)
    assert str(e.value).startswith(message)


def test_float_in_conf_for_integer_option(conf):
    with pytest.raises(ConfigError, match="key 'max_payload': expected a "
                       "positive integer, got 1.5"):
        load(conf("max_payload = 1.5\n"), NO_ENV)


def test_unknown_conf_key(conf):
    args = conf("ready_timeout = 1\nfrobnicate = 2\n")
    with pytest.raises(ConfigError, match=f"^conf file {args[1]}: unknown key "
                       "'frobnicate'"):
        load(args, NO_ENV)


def test_uri_is_command_line_only(conf):
    with pytest.raises(ConfigError, match="unknown key 'uri' \\(command line only\\)"):
        load(conf('uri = "unix:///tmp/p.sock"\n'), NO_ENV)


def test_nested_table_is_not_a_value(conf):
    with pytest.raises(ConfigError, match="unknown key 'timeouts'"):
        load(conf("[timeouts]\nready_timeout = 1\n"), NO_ENV)


def test_missing_explicit_conf(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=f"--config: conf file {path} does "
                       "not exist"):
        load(["--config", str(path)], NO_ENV)


def test_unreadable_conf(tmp_path):
    # A directory cannot be read as a file, even by root.
    with pytest.raises(ConfigError, match=f"^conf file {tmp_path}: cannot read"):
        load(["--config", str(tmp_path)], NO_ENV)


def test_invalid_toml(conf):
    args = conf("ready_timeout = = 3\n")
    with pytest.raises(ConfigError, match=f"^conf file {args[1]}: invalid TOML"):
        load(args, NO_ENV)


def test_long_socket_path(empty_conf):
    long_path = "/tmp/" + "x" * 103  # 108 bytes
    with pytest.raises(ConfigError, match="^command line --socket-path: socket "
                       "path is 108 bytes long, the limit is 107"):
        load(empty_conf + ["--socket-path", long_path], NO_ENV)
    # 107 bytes is fine.
    assert load(empty_conf + ["--socket-path", long_path[:-1]], NO_ENV)


def test_long_socket_path_counts_bytes_not_characters(empty_conf):
    path = "/tmp/" + "é" * 52  # 57 characters, 109 bytes
    with pytest.raises(ConfigError, match="109 bytes long"):
        load(empty_conf + ["--socket-path", path], NO_ENV)


def test_long_uri_path(empty_conf):
    with pytest.raises(ConfigError, match="^command line --uri: socket path is"):
        load(empty_conf + ["-uri", "unix:///" + "y" * 120], NO_ENV)


def test_long_socket_path_in_conf(conf):
    args = conf(f'socket_path = "/{"z" * 120}"\n')
    with pytest.raises(ConfigError, match="key 'socket_path': socket path is"):
        load(args, NO_ENV)


@pytest.mark.parametrize("uri", ["tcp://1.2.3.4:5", "unix://relative/path",
                                 "/tmp/proxy.sock", "unix://", ""])
def test_bad_uri(empty_conf, uri):
    with pytest.raises(ConfigError, match="^command line --uri: expected "
                       "unix:///ABSOLUTE/PATH"):
        load(empty_conf + ["--uri", uri], NO_ENV)


@pytest.mark.parametrize("argv,message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--log"], "argument --log/-log: expected one argument"),
    (["stray"], "unrecognized arguments: stray"),
])
def test_bad_command_line_syntax(empty_conf, argv, message):
    with pytest.raises(ConfigError) as e:
        load(empty_conf + argv, NO_ENV)
    assert str(e.value).startswith("command line: ")
    assert message in str(e.value)


def test_abbreviations_are_not_accepted(empty_conf):
    with pytest.raises(ConfigError, match="unrecognized"):
        load(empty_conf + ["--ready", "3"], NO_ENV)


# ---------------------------------------------------------------- shipped


def test_shipped_conf_parses_and_documents_every_option():
    path = REPO / "conf" / "cc-proxy.toml"
    cfg = load(["--config", str(path)], NO_ENV)
    assert set(cfg.sources.values()) == {"default"}
    # Uncommenting every setting gives the built-in defaults.
    text = path.read_text()
    uncommented = "\n".join(
        line[1:] for line in text.splitlines()
        if line.startswith("#") and " = " in line and not line.startswith("# ")
    )
    data = tomllib.loads(uncommented)
    assert set(data) == config.CONF_KEYS
    defaults = load(["--config", str(path)], NO_ENV)
    for key, value in data.items():
        opt = config.OPTIONS_BY_NAME[key]
        assert opt.convert(value) == getattr(defaults, key), key


def test_help_shows_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # no wrapping inside the defaults
    with pytest.raises(SystemExit) as e:
        config.build_parser().parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for text in ("-log LEVEL", "-uri URI", "(default: warn)",
                 "(default: /var/run/clear-containers/proxy.sock)",
                 "(default: 1048576)", "(default: auto)"):
        assert text in out


def test_build_for_tests():
    cfg = config.build(ready_timeout="0.5", uri="unix:///tmp/b.sock")
    assert cfg.ready_timeout == 0.5
    assert cfg.socket_path == "/tmp/b.sock"
    assert cfg.ksm == "initial"
    assert cfg.sources["ready_timeout"] == "override"
    with pytest.raises(ConfigError, match="unknown option"):
        config.build(nope=1)
    with pytest.raises(ConfigError, match="override 'max_payload'"):
        config.build(max_payload=0)
