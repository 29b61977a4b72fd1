"""The two kinds of failure, split at one boundary.

* ``ProxyError``: a request we refuse. Its text is the wire text of SPEC.md;
  the dispatcher turns it into an error response and the connection goes on.
* ``PeerProtocolError``: a peer sent bytes we cannot accept (bad header,
  oversized payload, a frame it must not send). It costs that peer its
  connection, never the daemon.

Anything else that escapes a handler is a bug: it is logged with context and
the peer is dropped.
"""


class ProxyError(Exception):
    """A refused request; ``str(error)`` is sent to the client verbatim."""


class PeerProtocolError(Exception):
    """The peer broke the framing or the protocol; drop the peer."""


class AgentError(ProxyError):
    """The agent answered ERROR, or its channel is gone."""
