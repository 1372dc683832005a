"""A small albedo-compatible backend: the demo application of the local
stack, and the reflection server that CRS's response tests expect
(../shared/crs/albedo-capabilities.yaml).

    python deploy/backend/albedo.py --listen 127.0.0.1:8000

Any path answers 200 with an empty body; /reflect, /configure_reflection,
/reset, /capabilities and /inspect behave as albedo documents. /leaks/...
serves pages that leak what CRS's response rules look for (LEAK_PAGES),
to show and test response inspection.

Like albedo, a Go net/http server, a body sent without a Content-Type gets
one sniffed from its first bytes (http.DetectContentType): libmodsecurity
reads only the response bodies of the types SecResponseBodyMimeType lists,
so without it phase 4 would skip every reflected body.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CAPABILITIES = [
    {"path": "/*", "methods": ["any"], "description": "200 with an empty body"},
    {"path": "/capabilities", "methods": ["GET"], "description": "this document"},
    {"path": "/reflect", "methods": ["POST"], "description": "respond as the JSON spec says"},
    {"path": "/configure_reflection", "methods": ["POST"], "description": "make endpoints reflect"},
    {"path": "/reset", "methods": ["PUT"], "description": "forget configured endpoints"},
    {"path": "/inspect", "methods": ["any"], "description": "log the request"},
]

log = logging.getLogger("albedo")

# What CRS's RESPONSE-95x rules catch: a database error in a page (951230),
# a web server's directory listing (950130), PHP source sent as text (953120).
LEAK_PAGES = {
    "/leaks/sql-error": b"<html><body><h1>Orders</h1><b>Warning</b>: You have an error in your SQL syntax; "
                        b"check the manual that corresponds to your MySQL server version for the right syntax "
                        b"to use near ''1'' at line 1</body></html>\n",
    "/leaks/directory-listing": b"<html><head><title>Index of /backup</title></head><body><h1>Index of /backup"
                                b"</h1><ul><li><a href=\"db.sql\">db.sql</a></li></ul></body></html>\n",
    "/leaks/php-source": b"<?php\n$db = mysqli_connect('localhost', 'shop', 'hunter2');\n"
                         b"$orders = $db->query('SELECT * FROM orders');\n?>\n",
}
CAPABILITIES += [
    {"path": "/leaks/*", "methods": ["GET"], "description": "pages that leak an SQL error, a directory listing, "
                                                            "PHP source; ?pad=<bytes> adds that much text after "
                                                            "the leak (at most 16 MiB)"},
    {"path": "/large/<bytes>", "methods": ["GET"], "description": "that many bytes of plain text (at most 16 MiB)"},
    {"path": "/delay/<ms>", "methods": ["GET"], "description": "200 after that many ms (at most 30 s): a slow "
                                                               "response, its request long answered"},
]
MAX_LARGE = 16 * 1024 * 1024
MAX_DELAY_MS = 30_000

# net/http/sniff.go, the part text bodies can reach: HTML signatures,
# matched case-insensitively after leading whitespace and followed by a
# space or '>'; XML; PDF; UTF-16/UTF-8 marks; binary bytes; else text.
HTML_SIGNATURES = (b"<!DOCTYPE HTML", b"<HTML", b"<HEAD", b"<SCRIPT", b"<IFRAME", b"<H1", b"<DIV", b"<FONT",
                   b"<TABLE", b"<A", b"<STYLE", b"<TITLE", b"<B", b"<BODY", b"<BR", b"<P", b"<!--")
WHITESPACE = b"\t\n\x0c\r "
BINARY = set(range(0x00, 0x09)) | {0x0B} | set(range(0x0E, 0x1B)) | set(range(0x1C, 0x20))


def text(size: int) -> bytes:
    """That many bytes of plain text, at most MAX_LARGE."""
    size = min(size, MAX_LARGE)
    line = b"all work and no play makes a large response\n"
    return (line * (size // len(line) + 1))[:size]


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


class Reflections:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._specs: dict[tuple[str, str], dict] = {}

    def configure(self, spec: dict) -> None:
        with self._lock:
            for endpoint in spec.get("endpoints", []):
                self._specs[(endpoint["method"].upper(), endpoint["url"])] = spec

    def reset(self) -> None:
        with self._lock:
            self._specs.clear()

    def get(self, method: str, url: str) -> dict | None:
        with self._lock:
            return self._specs.get((method.upper(), url))


REFLECTIONS = Reflections()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "albedo-py"

    def log_message(self, fmt: str, *args) -> None:  # quiet by default
        log.debug(fmt, *args)

    def parse_request(self) -> bool:
        # albedo is Go: net/http refuses protocol versions other than
        # HTTP/1.x. Python would instead answer an HTTP/0.9 request without a
        # status line, which a proxy sees as no answer at all (then 504 after
        # its server timeout). Refuse such versions with 400 instead.
        if not super().parse_request():
            return False
        if self.request_version not in ("HTTP/1.0", "HTTP/1.1"):
            version, self.request_version = self.request_version, "HTTP/1.1"
            self.close_connection = True
            self.send_error(400, f"unsupported protocol version {version}")
            return False
        return True

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            # Envoy's ext_proc in STREAMED mode drops Content-Length and
            # forwards the body chunked.
            return self._chunked_body()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _chunked_body(self) -> bytes:
        parts = []
        while True:
            size = int(self.rfile.readline(1024).split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass   # trailers
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline(1024)   # the CRLF after each chunk

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str | None = None) -> None:
        self.send_response(status)
        # HAProxy's unique-id (also the WAF's transaction id): echoed so that a
        # client can find its own request in the WAF's audit log.
        if self.headers.get("X-Unique-ID"):
            self.send_header("X-Unique-ID", self.headers["X-Unique-ID"])
        headers = headers or {}
        for name, value in headers.items():
            self.send_header(name, str(value))
        if not content_type and body and not any(name.lower() == "content-type" for name in headers):
            content_type = detect_content_type(body)  # as Go's net/http does
        if content_type:
            self.send_header("Content-Type", content_type)
        if not 100 <= status < 200 and status not in (204, 304):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _reflect(self, spec: dict) -> None:
        """As albedo (Go net/http): a body without a Content-Type gets one
        sniffed (conformance/albedo.py explains), which decides whether the
        WAF reads the response body at all."""
        status = int(spec.get("status", 200))
        if not 100 <= status <= 599:
            self._send(400, b"status must be within [100, 599]")
            return
        if spec.get("encodedBody"):
            body = base64.b64decode(spec["encodedBody"])
        else:
            body = str(spec.get("body", "")).encode()
        if spec.get("logMessage"):
            log.info("%s", spec["logMessage"])
        headers = dict(spec.get("headers") or {})
        if body and not any(name.lower() == "content-type" for name in headers):
            headers["Content-Type"] = detect_content_type(body)
        self._send(status, body, headers)

    def handle_any(self) -> None:
        body = self._body()
        path = self.path.split("?", 1)[0]
        configured = REFLECTIONS.get(self.command, self.path)
        if configured is not None:
            self._reflect(configured)
        elif path == "/capabilities" and self.command == "GET":
            quiet = "quiet=true" in self.path
            doc = [{"path": c["path"]} for c in CAPABILITIES] if quiet else CAPABILITIES
            self._send(200, json.dumps({"endpoints": doc}).encode(), content_type="application/json")
        elif path == "/reflect" and self.command == "POST":
            try:
                self._reflect(json.loads(body or b"{}"))
            except (ValueError, TypeError) as exc:
                self._send(400, f"bad reflection spec: {exc}".encode())
        elif path == "/configure_reflection" and self.command == "POST":
            try:
                REFLECTIONS.configure(json.loads(body or b"{}"))
            except (ValueError, TypeError, KeyError) as exc:
                self._send(400, f"bad reflection spec: {exc}".encode())
                return
            self._send(200)
        elif path == "/reset" and self.command == "PUT":
            REFLECTIONS.reset()
            self._send(200)
        elif path in LEAK_PAGES and self.command in ("GET", "HEAD"):
            query = dict(pair.partition("=")[::2] for pair in self.path.partition("?")[2].split("&"))
            pad = query.get("pad", "0")
            self._send(200, LEAK_PAGES[path] + text(int(pad) if pad.isdigit() else 0))
        elif path.startswith("/large/") and path[7:].isdigit():
            self._send(200, text(int(path[7:])))
        elif path.startswith("/delay/") and path[7:].isdigit():
            time.sleep(min(int(path[7:]), MAX_DELAY_MS) / 1000)
            self._send(200, b"delayed\n")
        elif path == "/inspect":
            log.info("inspect %s %s headers=%d body=%d", self.command, self.path, len(self.headers), len(body))
            self._send(200)
        else:
            self._send(200)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = handle_any

    def __getattr__(self, name: str):
        # Any other method (PROPFIND, custom verbs CRS tests use) is accepted too.
        if name.startswith("do_"):
            return self.handle_any
        raise AttributeError(name)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512

    def handle_error(self, request, client_address) -> None:
        # Clients (HAProxy included) close idle keep-alive connections: normal.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def _stop(signo, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8000")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    logging.basicConfig(level=logging.INFO, format="albedo %(message)s")
    server = Server((host or "127.0.0.1", int(port)), Handler)
    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
