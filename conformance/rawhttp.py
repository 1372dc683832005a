"""Raw HTTP/1.x over a socket, as go-ftw sends it: the bytes a test asks
for, malformed ones included, and a response reader that tolerates servers
closing early. Also the reverse: splitting those same bytes into the parts
the engine takes, for the in-process reference run.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

CRLF = b"\r\n"


def _b(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def build_request(inp) -> bytes:
    """go-ftw's request: `method uri version`, headers in file order, the
    data as given. With autocomplete_headers (the default) it adds
    Content-Length and a form Content-Type for data, and `Connection:
    close`, each only when absent."""
    if inp.encoded_request is not None:
        return inp.encoded_request
    headers = list(inp.headers)
    names = {name.lower() for name, _ in headers}
    data = inp.data or b""
    if inp.autocomplete_headers:
        if data and "content-type" not in names:
            headers.append(("Content-Type", "application/x-www-form-urlencoded"))
        if data and "content-length" not in names:
            headers.append(("Content-Length", str(len(data))))
        if "connection" not in names:
            headers.append(("Connection", "close"))
    lines = [_b(f"{inp.method} {inp.uri} {inp.version}")]
    lines += [_b(name) + b": " + _b(value) for name, value in headers]
    return CRLF.join(lines) + CRLF + CRLF + data


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class NoResponse(Exception):
    """The server closed, reset or timed out without a complete response
    (what go-ftw's expect_error means)."""


def _read_until(sock: socket.socket, buf: bytearray, marker: bytes) -> int:
    while True:
        at = buf.find(marker)
        if at >= 0:
            return at
        chunk = sock.recv(65536)
        if not chunk:
            raise NoResponse("connection closed before the response headers ended"
                             if buf else "connection closed without a response")
        buf += chunk


def _read_exactly(sock: socket.socket, buf: bytearray, size: int) -> None:
    while len(buf) < size:
        chunk = sock.recv(65536)
        if not chunk:
            raise NoResponse(f"connection closed after {len(buf)} of {size} body bytes")
        buf += chunk


def _read_chunked(sock: socket.socket, buf: bytearray) -> bytes:
    body = bytearray()
    while True:
        end = _read_until(sock, buf, CRLF)
        size = int(bytes(buf[:end]).split(b";")[0].strip() or b"0", 16)
        del buf[:end + 2]
        if size == 0:
            _read_until(sock, buf, CRLF)  # trailers end with an empty line; none expected
            return bytes(body)
        _read_exactly(sock, buf, size + 2)
        body += buf[:size]
        del buf[:size + 2]


def read_response(sock: socket.socket, method: str) -> Response:
    buf = bytearray()
    end = _read_until(sock, buf, CRLF + CRLF)
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    del buf[:end + 4]
    parts = head[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise NoResponse(f"not an HTTP status line: {head[0][:80]!r}")
    headers = []
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    resp = Response(int(parts[1]), parts[2] if len(parts) > 2 else "", headers)
    if method.upper() == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200:
        return resp
    if (resp.header("transfer-encoding") or "").lower() == "chunked":
        resp.body = _read_chunked(sock, buf)
    elif resp.header("content-length") is not None:
        size = int(resp.header("content-length"))
        _read_exactly(sock, buf, size)
        resp.body = bytes(buf[:size])
    else:
        while chunk := sock.recv(65536):
            buf += chunk
        resp.body = bytes(buf)
    return resp


def send(host: str, port: int, raw: bytes, timeout: float = 10.0) -> Response:
    """One request on its own connection, so that the response can only be
    this request's. Raises NoResponse when none comes."""
    method = raw.split(b" ", 1)[0].decode("latin-1", "replace")
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            try:
                sock.sendall(raw)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server may already have answered (400) and closed: read it
            return read_response(sock, method)
    except socket.timeout:
        raise NoResponse(f"no response within {timeout}s") from None
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise NoResponse(f"connection reset: {exc}") from None


@dataclass
class ParsedRequest:
    method: str
    uri: str
    version: str  # "1.1", as HAProxy's req.ver gives it
    headers: list[tuple[bytes, bytes]]
    body: bytes


def parse_request(raw: bytes) -> ParsedRequest:
    """Splits raw request bytes the lenient way a server would before handing
    them to ModSecurity: request line on single spaces, headers on the first
    colon, the body up to Content-Length (or de-chunked)."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        head, sep, rest = raw.partition(b"\n\n")
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    request_line = lines[0].decode("latin-1")
    parts = request_line.split(" ")
    # "GET /a b HTTP/1.1": the version is the last token, the method the first.
    method = parts[0] if parts else ""
    if len(parts) >= 3:
        uri, version = " ".join(parts[1:-1]), parts[-1]
    elif len(parts) == 2:
        uri, version = parts[1], "HTTP/0.9"
    else:
        uri, version = "/", "HTTP/0.9"
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        headers.append((name.strip(), value.strip(b" \t")))
    body = rest
    lowered = {n.lower(): v for n, v in headers}
    if b"chunked" in lowered.get(b"transfer-encoding", b"").lower():
        body = _dechunk(rest)
    elif lowered.get(b"content-length", b"").strip().isdigit():
        body = rest[:int(lowered[b"content-length"])]
    return ParsedRequest(method, uri, version.removeprefix("HTTP/"), headers, body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        line, _, data = data.partition(b"\r\n")
        try:
            size = int(line.split(b";")[0].strip() or b"0", 16)
        except ValueError:
            return bytes(out)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return bytes(out)
