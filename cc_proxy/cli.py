"""Command line entry: parse, configure logging, hand over to the server.

``main`` returns the process exit code: 0 for ``--version`` and ``--help``,
2 for a configuration error (nothing is started), otherwise whatever the
server returns. gevent is patched by ``cc_proxy.__main__`` before this module
is imported; the server module is imported only once the configuration is
known to be good.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

from loguru import logger

from cc_proxy import __version__, logsetup
from cc_proxy import config as config_mod

EXIT_USAGE = 2


def _fail(message: str) -> int:
    print(f"cc-proxy: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None,
         environ: Mapping[str, str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else list(argv)
    try:
        args = config_mod.parse_args(args_list)
    except config_mod.ConfigError as e:
        return _fail(str(e))
    except SystemExit as e:  # --help: argparse printed it and wants to exit
        return e.code if isinstance(e.code, int) else 0

    if args.version:
        print(f"cc-proxy version {__version__}")
        return 0

    try:
        cfg = config_mod.from_args(args, environ)
    except config_mod.ConfigError as e:
        return _fail(str(e))

    logsetup.configure(cfg)
    logger.info(
        "cc-proxy {} starting in {} mode on {} (socket from {}; log level {} "
        "from {}; conf file {})",
        __version__,
        "pod" if cfg.pod_mode else "system",
        cfg.socket_path,
        cfg.sources["socket_path"],
        cfg.log_level,
        cfg.sources["log_level"],
        cfg.config_path or "none",
    )

    from cc_proxy import server

    return server.serve(cfg, reload=lambda: config_mod.from_args(args, environ))
