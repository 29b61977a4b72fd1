"""KSM (kernel same-page merging) tuning for system mode.

Modes:

* ``initial``: leave KSM alone; we do not even read it.
* ``off``: save the initial values, write ``run=0``; restore on stop().
* ``auto``: save the initial values and wait. Each vm_registered() (re)starts
  a throttle: aggressive for ``aggressive_seconds``, standard for
  ``standard_seconds``, slow for ``slow_seconds``, then the saved initial
  values are written back. A kick during the cycle restarts it at aggressive.

The throttle is one greenlet owned by the Ksm object; stop() kills it and
restores what we saved. A missing or read-only KSM directory costs one warning
and makes the object inert: the proxy runs fine without KSM.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import gevent
from loguru import logger as _default_logger

MODES = ("off", "initial", "auto")

#: The three knobs we save at start and restore at stop, in write order.
_KNOBS = ("run", "pages_to_scan", "sleep_millisecs")

#: Throttle settings: name -> (divisor of anonymous pages, sleep in ms).
#: Fewer pages per pass and longer sleeps mean less CPU spent merging.
SETTINGS = {
    "aggressive": (10, 1),
    "standard": (100, 10),
    "slow": (500, 100),
}


class Ksm:
    def __init__(
        self,
        mode: str,
        root: str = "/sys/kernel/mm/ksm",
        meminfo_path: str = "/proc/meminfo",
        aggressive_seconds: float = 30.0,
        standard_seconds: float = 120.0,
        slow_seconds: float = 120.0,
        logger=_default_logger,
        on_change: Callable[[str], None] | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"unknown KSM mode {mode!r} (expected one of {', '.join(MODES)})")
        self.mode = mode
        self.root = root
        self.meminfo_path = meminfo_path
        self._schedule = (
            ("aggressive", aggressive_seconds),
            ("standard", standard_seconds),
            ("slow", slow_seconds),
        )
        self._log = logger
        self._on_change = on_change
        self._saved: dict[str, str] | None = None
        self._inert = mode == "initial"
        self._greenlet: gevent.Greenlet | None = None
        self.current = "initial"  # name of the setting last applied

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        if self._inert:
            return
        try:
            saved = {knob: self._read(knob) for knob in _KNOBS}
            for knob in _KNOBS:
                # access(2) also reports a read-only mount (EROFS).
                if not os.access(os.path.join(self.root, knob), os.W_OK):
                    raise PermissionError(f"{knob} is not writable")
            self._saved = saved
            if self.mode == "off":
                self._apply("off")
        except OSError as exc:
            self._disable(exc)

    def vm_registered(self) -> None:
        """A VM was registered: (re)start the throttle cycle in auto mode."""
        if self.mode != "auto" or self._inert or self._saved is None:
            return
        self._kill_throttle()
        self._greenlet = gevent.spawn(self._throttle)

    def stop(self) -> None:
        """Kill the throttle and restore the saved values. Idempotent."""
        self._kill_throttle()
        if self._saved is None or self._inert:
            return
        saved, self._saved = self._saved, None
        try:
            self._restore(saved)
        except OSError as exc:
            self._log.warning("KSM: could not restore initial settings in {}: {}", self.root, exc)

    def statistics(self) -> dict:
        return {
            "mode": self.mode,
            "active": not self._inert,
            "setting": self.current,
            "throttling": self._greenlet is not None and not self._greenlet.dead,
            "saved": dict(self._saved) if self._saved else None,
        }

    # -- internals ---------------------------------------------------------

    def _throttle(self) -> None:
        try:
            for name, seconds in self._schedule:
                self._apply(name)
                gevent.sleep(seconds)
            self._restore(self._saved)
        except OSError as exc:
            saved = self._saved
            self._disable(exc)
            try:
                self._restore(saved)  # don't leave a half-applied setting behind
            except OSError:
                pass

    def _kill_throttle(self) -> None:
        greenlet, self._greenlet = self._greenlet, None
        if greenlet is not None and greenlet is not gevent.getcurrent():
            greenlet.kill(block=True)

    def _disable(self, exc: OSError) -> None:
        self._log.warning("KSM unavailable in {} ({}): no KSM tuning from now on", self.root, exc)
        self._inert = True
        self._saved = None

    def _apply(self, name: str) -> None:
        if name == "off":
            self._write("run", "0")
        else:
            divisor, sleep_ms = SETTINGS[name]
            pages = max(1, self._anon_pages() // divisor)  # before touching anything
            self._write("run", "0")
            self._write("pages_to_scan", str(pages))
            self._write("sleep_millisecs", str(sleep_ms))
            self._write("run", "1")
        self._changed(name)

    def _restore(self, saved: dict[str, str]) -> None:
        self._write("run", "0")
        self._write("pages_to_scan", saved["pages_to_scan"])
        self._write("sleep_millisecs", saved["sleep_millisecs"])
        self._write("run", saved["run"])
        self._changed("initial")

    def _changed(self, name: str) -> None:
        self.current = name
        self._log.debug("KSM setting: {}", name)
        if self._on_change is not None:
            self._on_change(name)

    def _anon_pages(self) -> int:
        with open(self.meminfo_path) as f:
            for line in f:
                if line.startswith("AnonPages:"):
                    kib = int(line.split()[1])
                    return kib * 1024 // os.sysconf("SC_PAGE_SIZE")
        raise OSError(f"no AnonPages line in {self.meminfo_path}")

    def _read(self, knob: str) -> str:
        with open(os.path.join(self.root, knob)) as f:
            return f.read().strip()

    def _write(self, knob: str, value: str) -> None:
        with open(os.path.join(self.root, knob), "w") as f:
            f.write(value)
