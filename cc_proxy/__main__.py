"""Entry point: monkey-patch first, before anything else is imported."""

from gevent import monkey

monkey.patch_all()

import sys


def main() -> int:
    from cc_proxy import cli

    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
