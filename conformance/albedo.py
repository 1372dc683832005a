"""What albedo, the CRS project's test backend (coreruleset/albedo, Go),
answers to a request: the response the in-process run feeds into phases 3-4.

- POST /reflect (and /reflect/): status, headers and body from the JSON spec
  in the request body ("status", "headers", "body", "encodedBody"); a spec
  that is not JSON gets 400 "Invalid JSON in request body", a status
  outside [100, 599] 400 "Invalid status code: N".
- GET /capabilities: a JSON document; any other request: 200, no body.

albedo is a Go net/http server, so a body sent without a Content-Type gets
one from http.DetectContentType: "text/html; charset=utf-8" for markup,
"text/plain; charset=utf-8" for other text. That matters: the engine reads
only the response bodies of the types SecResponseBodyMimeType lists. The
sniffing below is the part of DetectContentType that text bodies can reach.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field

# net/http/sniff.go: HTML signatures, matched case-insensitively after
# leading whitespace and followed by a space or '>'.
HTML_SIGNATURES = (b"<!DOCTYPE HTML", b"<HTML", b"<HEAD", b"<SCRIPT", b"<IFRAME", b"<H1", b"<DIV", b"<FONT",
                   b"<TABLE", b"<A", b"<STYLE", b"<TITLE", b"<B", b"<BODY", b"<BR", b"<P", b"<!--")
WHITESPACE = b"\t\n\x0c\r "
BINARY = set(range(0x00, 0x09)) | {0x0B} | set(range(0x0E, 0x1B)) | set(range(0x1C, 0x20))


@dataclass
class Reply:
    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""


def detect_content_type(body: bytes) -> str:
    data = body[:512]
    stripped = data.lstrip(WHITESPACE)
    upper = stripped.upper()
    for sig in HTML_SIGNATURES:
        if upper.startswith(sig) and len(stripped) > len(sig) and stripped[len(sig)] in b" >":
            return "text/html; charset=utf-8"
    if stripped.startswith(b"<?xml"):
        return "text/xml; charset=utf-8"
    if data.startswith(b"%PDF-"):
        return "application/pdf"
    if data.startswith((b"\xfe\xff", b"\xff\xfe")):
        return "text/plain; charset=utf-16"
    if data.startswith(b"\xef\xbb\xbf"):
        return "text/plain; charset=utf-8"
    if any(byte in BINARY for byte in data):
        return "application/octet-stream"
    return "text/plain; charset=utf-8"


def _reply(status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> Reply:
    headers = list(headers or [])
    names = {name.lower() for name, _ in headers}
    if body and b"content-type" not in names:
        headers.append((b"Content-Type", detect_content_type(body).encode()))
    if b"content-length" not in names:
        headers.append((b"Content-Length", str(len(body)).encode()))
    return Reply(status, headers, body)


def respond(method: str, uri: str, body: bytes) -> Reply:
    path = uri.split("?", 1)[0]
    if path in ("/reflect", "/reflect/") and method == "POST":
        return _reflect(body)
    if path in ("/capabilities", "/capabilities/"):
        return _reply(200, b'{"endpoints":[]}', [(b"Content-Type", b"application/json")])
    return _reply(200, b"")


def _reflect(body: bytes) -> Reply:
    try:
        spec = json.loads(body)
        if not isinstance(spec, dict):
            raise ValueError("not an object")
    except ValueError:
        return _reply(400, b"Invalid JSON in request body")
    headers = [(str(k).encode(), str(v).encode()) for k, v in (spec.get("headers") or {}).items()]
    status = int(spec.get("status") or 0)
    if 0 < status < 100 or status >= 600:
        return _reply(400, f"Invalid status code: {status}".encode(), headers)
    if spec.get("body"):
        payload = str(spec["body"]).encode()
    elif spec.get("encodedBody"):
        try:
            payload = base64.b64decode(spec["encodedBody"])
        except (binascii.Error, ValueError):
            return _reply(400, b"invalid base64 encoding of response body", headers)
    else:
        payload = b""
    return _reply(status or 200, payload, headers)
