"""Patch before anything else, exactly as the daemon's entry point does."""

from gevent import monkey

monkey.patch_all()
