"""Build the SELinux module with the distribution's devel Makefile.

The build runs in a copy of selinux/ so the source tree stays clean.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        not os.path.exists("/usr/share/selinux/devel/Makefile"),
        reason="SELinux devel Makefile missing (apt install selinux-policy-dev checkpolicy; "
        "dnf install selinux-policy-devel)",
    ),
    pytest.mark.skipif(shutil.which("make") is None, reason="make not installed"),
]

SOURCE = Path(__file__).resolve().parent.parent / "selinux"
MODULE_FILES = ("cc-proxy.te", "cc-proxy.fc", "cc-proxy.if", "Makefile")


@pytest.fixture
def build_dir(tmp_path):
    target = tmp_path / "selinux"
    target.mkdir()
    for name in MODULE_FILES:
        shutil.copy(SOURCE / name, target / name)
    return target


def make(directory, *targets):
    return subprocess.run(
        ["make", "-C", str(directory), *targets],
        check=False, capture_output=True, text=True, timeout=50,
    )


def test_module_builds(build_dir):
    result = make(build_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (build_dir / "cc-proxy.pp").stat().st_size > 0
    assert (build_dir / "cc-proxy.pp.bz2").read_bytes()[:3] == b"BZh"
    # m4 must have expanded every interface: nothing left as literal text.
    assert "undefined" not in result.stderr.lower()

    result = make(build_dir, "clean")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (build_dir / "cc-proxy.pp").exists()
    assert not (build_dir / "cc-proxy.pp.bz2").exists()


def test_interfaces_compile_for_a_client_module(build_dir):
    """A module for the runtime calls every exported interface."""
    (build_dir / "ccclient.te").write_text(
        "policy_module(ccclient, 1.0.0)\n"
        "type ccclient_t;\n"
        "domain_type(ccclient_t)\n"
        "cc_proxy_stream_connect(ccclient_t)\n"
        "cc_proxy_domtrans(ccclient_t)\n"
        'cc_proxy_vm_runtime_filetrans(ccclient_t, "virtcontainers")\n'
        "cc_proxy_manage_runtime(ccclient_t)\n"
    )
    (build_dir / "ccclient.fc").write_text("")
    result = subprocess.run(
        ["make", "-C", str(build_dir), "-f", "/usr/share/selinux/devel/Makefile", "ccclient.pp"],
        check=False, capture_output=True, text=True, timeout=50,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (build_dir / "ccclient.pp").stat().st_size > 0


def test_file_contexts_cover_script_and_run_dirs():
    fc = (SOURCE / "cc-proxy.fc").read_text()
    for path in ("/usr/bin/cc-proxy", "/usr/local/bin/cc-proxy"):
        assert any(line.split()[0] == path and "cc_proxy_exec_t" in line
                   for line in fc.splitlines() if line.strip() and not line.startswith("#"))
    assert "/run/clear-containers(/.*)?" in fc and "cc_proxy_var_run_t" in fc
