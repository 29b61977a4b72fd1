"""KSM wired into the proxy: RegisterVM kicks it, stopping restores it (fake sysfs only)."""

import os

import gevent
import pytest
from conftest import running_proxy
from fake_agent import running_agent
from fake_sysfs import ANON_PAGES, INITIAL, values

from cc_proxy.client import Client

pytestmark = pytest.mark.timeout(30)


def wait_for_knobs(root, expected, timeout=5, rewritten=False):
    """Poll the fake sysfs (a condition, bounded) until it holds ``expected``.

    With ``rewritten``, the values must also have been written since ``mark_unwritten``.
    """
    knob = root / "pages_to_scan"
    with gevent.Timeout(timeout, AssertionError(f"KSM knobs never became {expected}, last {values(root)}")):
        while values(root) != expected or (rewritten and knob.stat().st_mtime_ns == 0):
            gevent.sleep(0.005)


def mark_unwritten(root):
    os.utime(root / "pages_to_scan", ns=(0, 0))


def test_register_vm_kicks_ksm_and_stop_restores_it(sysfs):
    root, meminfo = sysfs
    aggressive = {"run": "1", "pages_to_scan": str(ANON_PAGES // 10), "sleep_millisecs": "1"}
    with running_proxy(ksm="auto", ksm_root=str(root), meminfo_path=str(meminfo), ksm_aggressive_seconds=60) as proxy:
        assert values(root) == INITIAL  # no VM yet: the host is left alone
        with running_agent() as agent, Client(proxy.config.socket_path) as runtime:
            runtime.register_vm("pod1", agent.ctl_path, agent.io_path)
            wait_for_knobs(root, aggressive)
    assert values(root) == INITIAL  # the proxy stopped: initial values are back


def test_auto_cycle_returns_to_the_initial_values(sysfs):
    root, meminfo = sysfs
    fast = {"ksm_aggressive_seconds": 0.01, "ksm_standard_seconds": 0.01, "ksm_slow_seconds": 0.01}
    with (running_proxy(ksm="auto", ksm_root=str(root), meminfo_path=str(meminfo), **fast) as proxy,
          running_agent() as agent, Client(proxy.config.socket_path) as runtime):
        mark_unwritten(root)
        runtime.register_vm("pod1", agent.ctl_path, agent.io_path)
        wait_for_knobs(root, INITIAL, rewritten=True)  # the cycle ran and restored the start values


def test_pod_mode_never_touches_ksm(sysfs, tmp_path):
    root, meminfo = sysfs
    before = {name: (root / name).stat().st_mtime_ns for name in INITIAL}
    with running_proxy(uri="unix:///tmp/unused.sock", ksm="auto", ksm_root=str(root),
                       meminfo_path=str(meminfo)) as proxy:
        assert proxy.config.ksm == "initial"  # --ksm auto is overridden by pod mode
        with running_agent() as agent, Client(proxy.config.socket_path) as runtime:
            runtime.register_vm("pod1", agent.ctl_path, agent.io_path)
    assert {name: (root / name).stat().st_mtime_ns for name in INITIAL} == before
