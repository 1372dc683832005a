"""WSGI middleware (Flask, Django, any WSGI app): every request is evaluated
before the app sees it.

    app.wsgi_app = WafWSGIMiddleware(app.wsgi_app, Client(target="dns:///wafsvc:50051"))

Same behaviour as the ASGI middleware: the verdict's status (403) for a
blocked request, the body replayed to the app, the failure policy ("closed"
= 503, "open" = pass) without a verdict, and environ["modsec_spoa.verdict"].

WSGI hands headers over as HTTP_* variables, so their original case and
order are lost and repeated headers arrive joined; the request line comes
from RAW_URI or REQUEST_URI when the server sets one (gunicorn, waitress
does not), else from the decoded PATH_INFO, quoted again.
"""

from __future__ import annotations

import http
import io
import ipaddress
import urllib.parse

from modsec_spoa_client.client import Client
from modsec_spoa_client.errors import WafError
from modsec_spoa_client.models import HttpRequest
from modsec_spoa_client.policy import Middleware, Outcome, decide

_UNRESERVED = "/;:@!$&'()*+,=-._~%"


class WafWSGIMiddleware(Middleware):
    client: Client

    def __call__(self, environ, start_response):
        stream = environ["wsgi.input"]
        declared = environ.get("CONTENT_LENGTH", "")
        length = int(declared) if declared.isdigit() else None
        limit = self.client.config.max_body_bytes
        if length is not None:
            want = min(length, limit + 1) if limit else length
            body = stream.read(want) if want else b""
            complete = len(body) >= length
        elif environ.get("wsgi.input_terminated"):  # chunked, the server de-chunked it
            body = stream.read(limit + 1) if limit else stream.read()
            complete = not limit or len(body) <= limit
        else:
            body, complete = b"", True
        try:
            verdict, error = self.client.evaluate(self._request(environ, body, complete, length)), None
        except WafError as exc:
            verdict, error = None, exc
        decision = decide(verdict, error, self.failure_policy)
        if decision.outcome is Outcome.BLOCK:
            body_out = decision.body
            headers = [(k.decode(), v.decode("latin-1")) for k, v in decision.headers]
            start_response(f"{decision.status} {_phrase(decision.status)}",
                           headers + [("Content-Length", str(len(body_out)))])
            return [body_out]
        environ["modsec_spoa.verdict"] = decision.verdict
        environ["wsgi.input"] = io.BytesIO(body) if complete else _Chain(body, stream)
        return self.app(environ, start_response)

    def _request(self, environ, body: bytes, complete: bool, length: int | None) -> HttpRequest:
        uri = environ.get("RAW_URI") or environ.get("REQUEST_URI")
        if not uri:
            path = (environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")).encode("latin-1")
            uri = urllib.parse.quote(path, safe=_UNRESERVED) or "/"
            if environ.get("QUERY_STRING"):
                uri += "?" + environ["QUERY_STRING"]
        headers = [(key[5:].replace("_", "-").lower(), value) for key, value in environ.items()
                   if key.startswith("HTTP_")]
        for key, name in (("CONTENT_TYPE", "content-type"), ("CONTENT_LENGTH", "content-length")):
            if environ.get(key):
                headers.append((name, environ[key]))
        protocol = environ.get("SERVER_PROTOCOL", "HTTP/1.1")
        return HttpRequest(
            method=environ["REQUEST_METHOD"], uri=uri, headers=headers, body=body,
            http_version=protocol[5:] if protocol.startswith("HTTP/") else "1.1",
            client_ip=environ.get("REMOTE_ADDR", ""), client_port=_port(environ.get("REMOTE_PORT")),
            server_ip=_ip_or_empty(environ.get("SERVER_NAME", "")), server_port=_port(environ.get("SERVER_PORT")),
            application=self.application, body_truncated=not complete, content_length=length)


class _Chain(io.RawIOBase):
    """The body read for inspection, then the rest of the original input."""

    def __init__(self, head: bytes, rest) -> None:
        self._head = io.BytesIO(head)
        self._rest = rest

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._head.read(size)
        if size is None or size < 0:
            return data + self._rest.read()
        if len(data) < size:
            data += self._rest.read(size - len(data))
        return data

    def readline(self, size: int = -1) -> bytes:
        line = self._head.readline(size)
        if line.endswith(b"\n") or (size is not None and 0 <= size <= len(line)):
            return line
        return line + self._rest.readline(-1 if size is None or size < 0 else size - len(line))


def _port(text) -> int:
    return int(text) if text and str(text).isdigit() else 0


def _ip_or_empty(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return ""


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Refused"
