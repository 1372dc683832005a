"""Requests from files: HAR captures (browser devtools, proxies), raw HTTP
requests, and plain lists of URLs."""

from __future__ import annotations

import base64
import json
import pathlib
from typing import Iterator

from modsec_spoa_client.models import HttpRequest
from modsec_spoa_client.rawhttp import parse_request, request_from_url


class InputError(ValueError):
    """A file that holds no requests we can read; the message says where."""


def har_requests(data: dict, where: str = "HAR") -> Iterator[HttpRequest]:
    try:
        entries = data["log"]["entries"]
    except (KeyError, TypeError):
        raise InputError(f"{where}: not a HAR file (no log.entries)") from None
    for index, entry in enumerate(entries):
        try:
            yield _har_request(entry["request"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{where}: entry {index}: {exc}") from None


def _har_request(request: dict) -> HttpRequest:
    headers, authority = [], ""
    for header in request.get("headers", ()):
        name, value = header["name"], header["value"]
        if name.startswith(":"):  # HTTP/2 pseudo-headers: the request line, not headers
            authority = value if name == ":authority" else authority
            continue
        headers.append((name, value))
    if authority and not any(name.lower() == "host" for name, _ in headers):
        headers.insert(0, ("Host", authority))
    post = request.get("postData") or {}
    text = post.get("text", "")
    if post.get("encoding") == "base64":
        body = base64.b64decode(text)
    else:
        body = text.encode("utf-8")
    if body and not any(name.lower() == "content-type" for name, _ in headers) and post.get("mimeType"):
        headers.append(("Content-Type", post["mimeType"]))
    version = request.get("httpVersion", "HTTP/1.1").upper()
    version = {"H2": "2.0", "HTTP/2": "2.0", "HTTP/2.0": "2.0", "H3": "3.0", "HTTP/3": "3.0"}.get(
        version, version.removeprefix("HTTP/") or "1.1")
    return request_from_url(request["url"], request.get("method", "GET"), headers, body, http_version=version)


def requests_in(path: pathlib.Path) -> Iterator[HttpRequest]:
    """Every request in a file: HAR (JSON with log.entries), one raw HTTP
    request, or URLs one per line (GET; # starts a comment)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror}") from None
    stripped = data.lstrip()
    if stripped.startswith(b"{"):
        try:
            har = json.loads(data)
        except ValueError as exc:
            raise InputError(f"{path}: not valid JSON: {exc}") from None
        yield from har_requests(har, str(path))
        return
    first = stripped.split(b"\n", 1)[0].rstrip(b"\r")
    if first.endswith((b"HTTP/1.1", b"HTTP/1.0")) and not first.startswith((b"http:", b"https:")):
        try:
            yield parse_request(data)
        except ValueError as exc:
            raise InputError(f"{path}: {exc}") from None
        return
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            try:
                yield request_from_url(line)
            except ValueError as exc:
                raise InputError(f"{path}:{number}: {exc}") from None
