import os
import shutil
import subprocess
import sys

import pytest

from cc_proxy import units

pytestmark = pytest.mark.timeout(60)

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.fixture
def bindir(tmp_path):
    """A directory with an executable stub named cc-proxy, for ExecStart."""
    path = tmp_path / "bin"
    path.mkdir()
    stub = path / "cc-proxy"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return path


def test_render_substitutes_bindir():
    assert units.render("ExecStart=@BINDIR@/cc-proxy\n", "/opt/cc/bin/") == "ExecStart=/opt/cc/bin/cc-proxy\n"


def test_render_rejects_unknown_variable():
    with pytest.raises(ValueError, match="@LIBDIR@"):
        units.render("X=@LIBDIR@\n", "/usr/bin")


def test_templates_ship_as_package_data():
    service = units.template("cc-proxy.service.in")
    socket_unit = units.template("cc-proxy.socket.in")
    assert "ExecStart=@BINDIR@/cc-proxy" in service
    assert "Type=notify" in service and "WatchdogSec=30" in service
    assert "ListenStream=/run/clear-containers/proxy.sock" in socket_unit
    assert "SocketMode=0660" in socket_unit and "DirectoryMode=0770" in socket_unit


def test_main_writes_units(tmp_path, bindir):
    out = tmp_path / "units"
    assert units.main(["--output-dir", str(out), "--bindir", str(bindir)]) == 0
    assert sorted(os.listdir(out)) == ["cc-proxy.service", "cc-proxy.socket"]
    service = (out / "cc-proxy.service").read_text()
    assert f"ExecStart={bindir}/cc-proxy\n" in service
    assert "@" not in service and "@" not in (out / "cc-proxy.socket").read_text()


def test_module_runs_as_script(tmp_path, bindir):
    out = tmp_path / "units"
    result = subprocess.run(
        [sys.executable, "-m", "cc_proxy.units", "--output-dir", str(out), "--bindir", str(bindir)],
        check=False, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert (out / "cc-proxy.service").exists() and (out / "cc-proxy.socket").exists()


def test_default_bindir_is_an_absolute_directory():
    assert os.path.isabs(units.default_bindir())
    assert os.path.isdir(units.default_bindir())


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (apt install systemd)")
def test_systemd_analyze_verify(tmp_path, bindir):
    out = tmp_path / "units"
    units.main(["--output-dir", str(out), "--bindir", str(bindir)])
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no",
         str(out / "cc-proxy.socket"), str(out / "cc-proxy.service")],
        check=False, capture_output=True, text=True, timeout=30, cwd=out,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    ours = [line for line in report.splitlines() if "cc-proxy" in line]
    assert ours == [], report
