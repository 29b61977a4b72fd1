"""Text for the SIGUSR1 operator dump: greenlet and thread stacks, tables.

Pure formatting: nothing here logs, signals or changes state.
"""

from __future__ import annotations

import gc
import sys
import threading
import traceback

from greenlet import greenlet as _greenlet_type


def _greenlet_label(glet) -> str:
    label = f"{type(glet).__name__} at {id(glet):#x}"
    name = getattr(glet, "name", None)  # gevent.Greenlet has one, raw greenlets don't
    if name:
        label += f" {name!r}"
    spawned = getattr(glet, "_run", None)
    if spawned is not None:
        label += f" running {getattr(spawned, '__qualname__', repr(spawned))}"
    return label


def greenlet_stacks() -> str:
    """Every live greenlet's stack, then every thread's, as one text block.

    Greenlets are found through the garbage collector; the one running now
    (the caller) has no saved frame, so it is shown through its thread below.
    """
    out: list[str] = []
    current = _greenlet_type.getcurrent()
    glets = [
        obj for obj in gc.get_objects()
        if isinstance(obj, _greenlet_type) and not obj.dead
    ]
    out.append(f"=== {len(glets)} live greenlets ===")
    for glet in glets:
        out.append(f"--- {_greenlet_label(glet)}{' (current)' if glet is current else ''}")
        frame = glet.gr_frame
        if frame is None:
            out.append("    (running now)" if glet is current else "    (not started)")
            continue
        out.extend(line.rstrip("\n") for line in traceback.format_stack(frame))

    threads = {t.ident: t.name for t in threading.enumerate()}
    frames = sys._current_frames()
    out.append(f"=== {len(frames)} threads ===")
    for ident, frame in frames.items():
        out.append(f"--- thread {threads.get(ident, '?')} ({ident})")
        out.extend(line.rstrip("\n") for line in traceback.format_stack(frame))
    return "\n".join(out) + "\n"


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain text table: a header, a rule, one line per row.

    Missing keys show as "-"; columns are as wide as their widest cell.
    """
    cells = [[str(col) for col in columns]]
    for row in rows:
        cells.append(["-" if row.get(col) is None else str(row[col]) for col in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]

    def render(line: list[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()

    lines = [render(cells[0]), "  ".join("-" * w for w in widths)]
    lines.extend(render(line) for line in cells[1:])
    return "\n".join(lines) + "\n"
