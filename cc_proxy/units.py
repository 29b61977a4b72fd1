"""Render the systemd unit templates shipped in cc_proxy/data.

    python -m cc_proxy.units --output-dir /etc/systemd/system [--bindir DIR]

writes cc-proxy.service and cc-proxy.socket with @BINDIR@ replaced by the
directory holding the installed ``cc-proxy`` command.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from importlib import resources

#: Template file (package data) -> rendered unit name.
TEMPLATES = {
    "cc-proxy.service.in": "cc-proxy.service",
    "cc-proxy.socket.in": "cc-proxy.socket",
}


def render(template_text: str, bindir: str) -> str:
    """Substitute @BINDIR@; any other @WORD@ left over is a template bug."""
    text = template_text.replace("@BINDIR@", bindir.rstrip("/") or "/")
    leftover = re.search(r"@[A-Z_]+@", text)
    if leftover:
        raise ValueError(f"unknown template variable {leftover.group()}")
    return text


def template(name: str) -> str:
    return resources.files("cc_proxy").joinpath("data", name).read_text(encoding="utf-8")


def default_bindir() -> str:
    found = shutil.which("cc-proxy")
    return os.path.dirname(os.path.abspath(found or sys.executable))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cc_proxy.units",
        description="Write cc-proxy.service and cc-proxy.socket for systemd.",
    )
    parser.add_argument("--output-dir", required=True, help="where to write the units, e.g. /etc/systemd/system")
    parser.add_argument(
        "--bindir",
        help="directory of the cc-proxy command (default: found on PATH, else next to this Python)",
    )
    args = parser.parse_args(argv)

    bindir = os.path.abspath(args.bindir) if args.bindir else default_bindir()
    if not os.access(os.path.join(bindir, "cc-proxy"), os.X_OK):
        print(f"warning: {bindir}/cc-proxy is not an executable file", file=sys.stderr)
    os.makedirs(args.output_dir, exist_ok=True)
    for source, target in TEMPLATES.items():
        path = os.path.join(args.output_dir, target)
        with open(path, "w", encoding="utf-8") as f:
            f.write(render(template(source), bindir))
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
