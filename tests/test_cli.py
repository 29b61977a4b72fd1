"""The command line entry: --version, --help, configuration errors, hand-over."""

from __future__ import annotations

import sys
import types

import pytest
from loguru import logger

from cc_proxy import __version__, cli, config, logsetup

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def restore_logging():
    yield
    logsetup._remove_ours()
    logsetup._state.level_no = None


@pytest.mark.parametrize("flag", ["--version", "-version"])
def test_version(capsys, flag):
    assert cli.main([flag]) == 0
    out, err = capsys.readouterr()
    assert out == f"cc-proxy version {__version__}\n"
    assert err == ""


def test_version_wins_over_a_bad_conf(capsys, tmp_path):
    assert cli.main(["--version", "--config", str(tmp_path / "absent")]) == 0
    assert capsys.readouterr().out.startswith("cc-proxy version ")


def test_help(capsys):
    assert cli.main(["--help"]) == 0
    assert "usage: cc-proxy" in capsys.readouterr().out


@pytest.mark.parametrize("argv,expected", [
    (["--log", "loud"], "cc-proxy: error: command line --log: invalid log level 'loud'"),
    (["--ready-timeout", "abc"], ("cc-proxy: error: command line --ready-timeout: "
                                 "expected a positive number, got 'abc'")),
    (["-uri", "tcp://x"], "cc-proxy: error: command line --uri: expected"),
    (["--bogus"], "cc-proxy: error: command line: unrecognized arguments: --bogus"),
])
def test_bad_option_returns_2(capsys, tmp_path, argv, expected):
    conf = tmp_path / "c.toml"
    conf.write_text("")
    assert cli.main(argv + ["--config", str(conf)], environ={}) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(expected)
    assert err.count("\n") == 1


def test_bad_environment_returns_2(capsys, tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text("")
    assert cli.main(["--config", str(conf)],
                    environ={"CC_PROXY_LOG_LEVEL": "loud"}) == 2
    assert capsys.readouterr().err.startswith(
        "cc-proxy: error: environment CC_PROXY_LOG_LEVEL: invalid log level")


def test_bad_conf_returns_2(capsys, tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text("bogus = 1\n")
    assert cli.main(["--config", str(conf)], environ={}) == 2
    assert f"conf file {conf}: unknown key 'bogus'" in capsys.readouterr().err


def test_good_config_is_handed_to_the_server(monkeypatch, tmp_path, capsys):
    seen = []
    fake = types.ModuleType("cc_proxy.server")

    def serve(cfg, reload):
        seen.append(cfg)
        conf.write_text('log_level = "debug"\n')
        seen.append(reload())  # SIGHUP re-reads the same sources
        logger.info("serving")
        return 7

    fake.serve = serve
    monkeypatch.setitem(sys.modules, "cc_proxy.server", fake)
    import cc_proxy

    monkeypatch.setattr(cc_proxy, "server", fake, raising=False)
    conf = tmp_path / "c.toml"
    conf.write_text("")
    sock = tmp_path / "proxy.sock"
    rc = cli.main(["-uri", f"unix://{sock}", "-log", "info", "--log-format",
                   "plain", "--config", str(conf)], environ={})
    assert rc == 7
    cfg, reloaded = seen
    assert isinstance(cfg, config.Config)
    assert reloaded.log_level == "INFO"  # the command line still beats the conf file
    assert cfg.pod_mode and cfg.socket_path == str(sock)
    err = capsys.readouterr().err
    assert (f"INFO cc-proxy {__version__} starting in pod mode on {sock} "
            "(socket from command line --uri; log level INFO from command "
            "line --log") in err
    assert "INFO serving" in err
