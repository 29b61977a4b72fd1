"""cc-proxy: the Clear Containers proxy, on gevent.

Only the version lives here: importing the package must neither import gevent
nor configure logging, so the codecs stay usable from any program.
"""

__version__ = "0.1.0"
