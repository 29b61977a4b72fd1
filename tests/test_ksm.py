import os

import gevent
import gevent.event
import pytest
from fake_sysfs import ANON_PAGES, INITIAL, values

from cc_proxy.ksm import Ksm

pytestmark = pytest.mark.timeout(60)



class Recorder:
    """Collects loguru-style calls and Ksm setting changes."""

    def __init__(self):
        self.warnings = []
        self.changes = []
        self.changed = gevent.event.Event()

    def warning(self, msg, *args):
        self.warnings.append(msg.format(*args))

    def debug(self, msg, *args):
        pass

    def on_change(self, name):
        self.changes.append(name)
        self.changed.set()

    def wait_changes(self, count, timeout=5):
        with gevent.Timeout(timeout, AssertionError(f"only saw {self.changes}")):
            while len(self.changes) < count:
                self.changed.clear()
                self.changed.wait()


def make(sysfs, mode, rec, seconds=(0.005, 0.005, 0.005), on_change=None):
    root, meminfo = sysfs
    return Ksm(
        mode, root=str(root), meminfo_path=str(meminfo),
        aggressive_seconds=seconds[0], standard_seconds=seconds[1], slow_seconds=seconds[2],
        logger=rec, on_change=on_change or rec.on_change,
    )


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown KSM mode"):
        Ksm("sometimes")


def test_initial_touches_nothing(sysfs):
    root, _ = sysfs
    before = {name: os.stat(root / name) for name in INITIAL}
    rec = Recorder()
    ksm = make(sysfs, "initial", rec)
    ksm.start()
    ksm.vm_registered()
    ksm.stop()
    for name, st in before.items():
        after = os.stat(root / name)
        assert (after.st_mtime_ns, after.st_atime_ns) == (st.st_mtime_ns, st.st_atime_ns)
    assert values(root) == INITIAL
    assert rec.changes == [] and rec.warnings == []


def test_off_writes_zero_and_stop_restores(sysfs):
    root, _ = sysfs
    rec = Recorder()
    ksm = make(sysfs, "off", rec)
    ksm.start()
    assert values(root)["run"] == "0"
    assert ksm.statistics()["setting"] == "off"
    ksm.vm_registered()  # no throttling in off mode
    assert rec.changes == ["off"]
    ksm.stop()
    assert values(root) == INITIAL
    ksm.stop()  # idempotent
    assert rec.changes == ["off", "initial"]


def test_auto_waits_for_a_vm(sysfs):
    root, _ = sysfs
    mtimes = {name: os.stat(root / name).st_mtime_ns for name in INITIAL}
    rec = Recorder()
    ksm = make(sysfs, "auto", rec)
    ksm.start()
    gevent.idle()  # let a wrongly started throttle run first
    assert rec.changes == []
    assert {name: os.stat(root / name).st_mtime_ns for name in INITIAL} == mtimes
    stats = ksm.statistics()
    assert stats["setting"] == "initial" and stats["saved"] == INITIAL
    ksm.stop()
    assert values(root) == INITIAL


def test_kick_cycles_to_initial(sysfs):
    root, _ = sysfs
    rec = Recorder()
    seen = []

    def on_change(name):
        seen.append((name, values(root)))
        rec.on_change(name)

    ksm = make(sysfs, "auto", rec, on_change=on_change)
    ksm.start()
    ksm.vm_registered()
    rec.wait_changes(4)
    assert rec.changes == ["aggressive", "standard", "slow", "initial"]
    assert seen[0][1] == {"run": "1", "pages_to_scan": str(ANON_PAGES // 10), "sleep_millisecs": "1"}
    assert seen[1][1] == {"run": "1", "pages_to_scan": str(ANON_PAGES // 100), "sleep_millisecs": "10"}
    assert seen[2][1] == {"run": "1", "pages_to_scan": str(ANON_PAGES // 500), "sleep_millisecs": "100"}
    assert seen[3][1] == INITIAL
    assert not ksm.statistics()["throttling"]
    ksm.stop()
    assert values(root) == INITIAL


def test_second_kick_restarts_at_aggressive(sysfs):
    root, _ = sysfs
    rec = Recorder()
    # Long standard phase: the second kick lands while it is running.
    ksm = make(sysfs, "auto", rec, seconds=(0.005, 30, 30))
    ksm.start()
    ksm.vm_registered()
    rec.wait_changes(2)
    assert rec.changes == ["aggressive", "standard"]
    ksm.vm_registered()
    rec.wait_changes(3)
    assert rec.changes == ["aggressive", "standard", "aggressive"]
    rec.wait_changes(4)
    assert rec.changes[3] == "standard"
    assert ksm.statistics()["throttling"]
    ksm.stop()
    assert not ksm.statistics()["throttling"]
    assert values(root) == INITIAL
    assert rec.changes[-1] == "initial"


def test_stop_during_aggressive_restores(sysfs):
    root, _ = sysfs
    rec = Recorder()
    ksm = make(sysfs, "auto", rec, seconds=(30, 30, 30))
    ksm.start()
    ksm.vm_registered()
    rec.wait_changes(1)
    assert values(root)["sleep_millisecs"] == "1"
    ksm.stop()
    assert values(root) == INITIAL
    assert rec.changes == ["aggressive", "initial"]


def test_tiny_memory_scans_at_least_one_page(sysfs):
    root, meminfo = sysfs
    meminfo.write_text("AnonPages:  1 kB\n")
    rec = Recorder()
    ksm = make(sysfs, "auto", rec, seconds=(30, 30, 30))
    ksm.start()
    ksm.vm_registered()
    rec.wait_changes(1)
    assert values(root)["pages_to_scan"] == "1"
    ksm.stop()


@pytest.mark.parametrize("mode", ["off", "auto"])
def test_missing_dir_warns_once_and_is_inert(tmp_path, mode):
    rec = Recorder()
    ksm = Ksm(mode, root=str(tmp_path / "absent"), meminfo_path=str(tmp_path / "meminfo"),
              logger=rec, on_change=rec.on_change)
    ksm.start()
    ksm.vm_registered()
    ksm.stop()
    assert len(rec.warnings) == 1 and "KSM unavailable" in rec.warnings[0]
    assert rec.changes == []
    assert ksm.statistics()["active"] is False


def test_missing_meminfo_makes_throttle_inert(sysfs, tmp_path):
    root, meminfo = sysfs
    meminfo.unlink()
    rec = Recorder()
    ksm = make(sysfs, "auto", rec, seconds=(30, 30, 30))
    ksm.start()
    ksm.vm_registered()
    rec.wait_changes(1)  # the restore after the failure reports "initial"
    assert rec.changes == ["initial"]
    assert len(rec.warnings) == 1 and "KSM unavailable" in rec.warnings[0]
    assert ksm.statistics()["active"] is False
    assert values(root) == INITIAL
    ksm.stop()
