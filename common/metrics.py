"""Helpers both services' metrics share: bounded label values and the
/metrics HTTP listener.

Why bounded labels: some label values come from requests (the Host header)
or from another system (frontend names). An attacker who can choose them
could create one time series per request and exhaust Prometheus. Such values
go through `BoundedValues`, which keeps the first `limit` distinct ones and
maps every later newcomer to OTHER.
"""

from __future__ import annotations

from typing import Callable, Generic, Hashable, TypeVar

from common.options import host_port

OTHER = "_other"
MAX_LABEL_LENGTH = 120

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedValues:
    """Maps raw label values to at most `limit` distinct ones, plus OTHER."""

    __slots__ = ("limit", "_known")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._known: dict[str, str] = {}

    def __call__(self, raw: str) -> str:
        value = self._known.get(raw)
        if value is not None:
            return value
        if len(self._known) >= self.limit:
            return OTHER
        value = raw.strip().lower()[:MAX_LABEL_LENGTH] or "_none"
        self._known[raw] = value
        return value

    def __len__(self) -> int:
        return len(self._known)


class ChildCache(Generic[K, V]):
    """`metric.labels(...)` costs a lock and a dict build per call; the hot
    path asks this cache instead, which calls `make` once per key."""

    __slots__ = ("_make", "_children")

    def __init__(self, make: Callable[[K], V]) -> None:
        self._make = make
        self._children: dict[K, V] = {}

    def __getitem__(self, key: K) -> V:
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._make(key)
        return child


def bind_http(address: str, registry):
    """Binds the /metrics listener now (so a taken port fails at start with a
    clear error) and returns the server; call serve_forever() to serve it.
    Requests are answered on their own threads and never logged."""
    from prometheus_client.exposition import (ThreadingWSGIServer, _SilentHandler,
                                              make_wsgi_app)
    from wsgiref.simple_server import make_server

    host, port = host_port(address)

    class Server(ThreadingWSGIServer):
        address_family = _family(host)

    return make_server(host, port, make_wsgi_app(registry), Server, handler_class=_SilentHandler)


def _family(host: str):
    import socket
    return socket.AF_INET6 if ":" in host else socket.AF_INET
