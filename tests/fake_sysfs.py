"""A fake KSM sysfs directory and meminfo file, so no test writes /sys."""

import os

import pytest

PAGE = os.sysconf("SC_PAGE_SIZE")
ANON_KB = 4_000_000
ANON_PAGES = ANON_KB * 1024 // PAGE
INITIAL = {"run": "1", "pages_to_scan": "100", "sleep_millisecs": "20"}


@pytest.fixture
def sysfs(tmp_path):
    """(KSM directory holding INITIAL, meminfo file with ANON_KB of AnonPages)."""
    root = tmp_path / "ksm"
    root.mkdir()
    for name, value in INITIAL.items():
        (root / name).write_text(value + "\n")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal:       16000000 kB\nAnonPages:       {ANON_KB} kB\nMapped: 1 kB\n")
    return root, meminfo


def values(root):
    """The knobs as the kernel would show them."""
    return {name: (root / name).read_text().strip() for name in INITIAL}
