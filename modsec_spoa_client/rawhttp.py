"""HTTP requests from what people have at hand: raw HTTP/1.x bytes (a capture,
a file) or a URL with curl-like options."""

from __future__ import annotations

import urllib.parse
from typing import Iterable

from modsec_spoa_client.models import HttpRequest, header_list


class RawRequestError(ValueError):
    """The bytes are not an HTTP/1.x request."""


def parse_request(raw: bytes) -> HttpRequest:
    """Request line, headers (order, case and duplicates kept) and body.

    The body is what follows the headers: Content-Length bytes of it, or the
    decoded chunks when Transfer-Encoding is chunked, or all of it. A body
    shorter than its Content-Length is kept and flagged body_truncated."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        head, sep, rest = raw.partition(b"\n\n")
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    while lines and not lines[0]:
        lines.pop(0)  # leading blank lines are tolerated (RFC 9112, 2.2)
    if not lines:
        raise RawRequestError("no request line")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        raise RawRequestError(f"not an HTTP/1.x request line: {lines[0][:80]!r}")
    method, target, version = parts
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise RawRequestError(f"not a header line: {line[:80]!r}")
        headers.append((name, value.strip(b" \t")))
    body, truncated, declared = _body(headers, rest)
    return HttpRequest(method=method.decode("latin-1"), uri=target, headers=tuple(headers), body=body,
                       http_version=version[5:].decode("latin-1"), body_truncated=truncated,
                       content_length=declared)


def _body(headers: list[tuple[bytes, bytes]], rest: bytes) -> tuple[bytes, bool, int | None]:
    values = {name.lower(): value for name, value in headers}
    if b"chunked" in values.get(b"transfer-encoding", b"").lower():
        body, complete = _dechunk(rest)
        return body, not complete, None
    if b"content-length" in values:
        try:
            declared = int(values[b"content-length"])
        except ValueError:
            raise RawRequestError(f"bad Content-Length {values[b'content-length']!r}") from None
        return rest[:declared], len(rest) < declared, declared
    return rest, False, None


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    """The chunks' data, and whether the last chunk arrived."""
    out, pos = [], 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return b"".join(out), False
        try:
            size = int(data[pos:end].split(b";")[0], 16)
        except ValueError:
            raise RawRequestError(f"bad chunk size {data[pos:end][:20]!r}") from None
        if size == 0:
            return b"".join(out), True
        out.append(data[end + 2:end + 2 + size])
        if end + 2 + size > len(data):
            return b"".join(out), False
        pos = end + 2 + size + 2


def request_from_url(url: str, method: str = "GET", headers: Iterable[tuple[str, str]] = (),
                     body: bytes = b"", **fields) -> HttpRequest:
    """A request as curl would send it: Host from the URL unless given, and
    Content-Length for a body."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    uri = (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else "")
    given = list(header_list(headers))
    names = {name.lower() for name, _ in given}
    extra = []
    if b"host" not in names:
        extra.append((b"Host", parsed.netloc.encode()))
    if body and b"content-length" not in names:
        given.append((b"Content-Length", str(len(body)).encode()))
    return HttpRequest(method=method, uri=uri, headers=tuple(extra + given), body=body,
                       content_length=len(body) if body else None, **fields)
