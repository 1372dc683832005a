"""The request mixes, defined once and used by every setup.

wrk sends them through HAProxy or nginx (bench/lua/mix.lua reads the table
that `write_lua_table` generates); the raw-engine setup turns the same
requests into the SPOE arguments HAProxy would send and maps them with the
gateway's own `mapping.build_request`, so every setup sees the same bytes.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass
from urllib.parse import quote

HOST = "shop.example.com"

# What a current Firefox sends on a page load; wrk adds nothing of its own
# except Host (set here too) and Content-Length for bodies.
BROWSER = (
    ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
    ("Accept", "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"),
    ("Accept-Language", "en-GB,en;q=0.7,de;q=0.3"),
    ("Accept-Encoding", "gzip, deflate, br, zstd"),
    ("Referer", f"https://{HOST}/catalog/shoes?page=2"),
    ("Cookie", "session=6f1c2a9e8b7d4c3f9a0e1d2c3b4a5968; theme=dark; consent=analytics%3Dno"),
    ("Upgrade-Insecure-Requests", "1"),
    ("Sec-Fetch-Dest", "document"),
    ("Sec-Fetch-Mode", "navigate"),
)
FORM = (("Content-Type", "application/x-www-form-urlencoded"), ("Origin", f"https://{HOST}"))
JSON = (("Content-Type", "application/json"), ("Accept", "application/json"), ("Origin", f"https://{HOST}"))


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""

    def all_headers(self) -> list[tuple[str, str]]:
        """The headers on the wire, in order, as HAProxy passes them on."""
        out = [("Host", HOST), *self.headers]
        if self.body or self.method == "POST":
            out.append(("Content-Length", str(len(self.body))))
        return out


def _browser(extra=()) -> tuple[tuple[str, str], ...]:
    names = {name.lower() for name, _ in extra}
    return tuple(h for h in BROWSER if h[0].lower() not in names) + tuple(extra)


def _form(fields: dict[str, str]) -> bytes:
    return "&".join(f"{quote(k)}={quote(v)}" for k, v in fields.items()).encode()


BENIGN = (
    # 60 % page and API GETs, 20 % form POSTs, 20 % JSON POSTs.
    Request("GET", "/", _browser()),
    Request("GET", "/catalog/shoes?page=3&sort=price_asc&size=42", _browser()),
    Request("GET", "/product/8841-trail-runner?colour=blue&ref=homepage_banner", _browser()),
    Request("GET", "/search?q=waterproof+hiking+boots&category=outdoor", _browser()),
    Request("GET", "/static/app.3f9c1b.js", _browser((("Accept", "*/*"), ("Sec-Fetch-Dest", "script"))),),
    Request("GET", "/api/cart?currency=EUR", _browser((("Accept", "application/json"),))),
    Request("POST", "/login", _browser(FORM),
            _form({"username": "maria.keller", "password": "correct horse battery staple",
                   "remember": "on", "csrf_token": "a8f5f167f44f4964e6c998dee827110c"})),
    Request("POST", "/newsletter", _browser(FORM), _form({"email": "maria.keller@example.org", "lang": "en"})),
    Request("POST", "/api/cart/items", _browser(JSON),
            json.dumps({"sku": "8841-BLU-42", "quantity": 1, "options": {"gift_wrap": False}}).encode()),
    Request("POST", "/api/events", _browser(JSON),
            json.dumps({"type": "page_view", "path": "/product/8841", "ts": 1764075000,
                        "props": {"ab_group": "b", "viewport": [1440, 900]}}).encode()),
)

ATTACK = (
    Request("GET", "/search?q=" + quote("1' UNION SELECT username, password FROM users--"), _browser()),
    Request("GET", "/product?id=" + quote("1 or 1=1"), _browser()),
    Request("GET", "/?page=" + quote("../../../../etc/passwd"), _browser()),
    Request("GET", "/comment?text=" + quote("<script>alert(document.cookie)</script>"), _browser()),
    Request("POST", "/login", _browser(FORM), _form({"username": "admin'--", "password": "x' OR '1'='1"})),
    Request("POST", "/api/cart/items", _browser(JSON),
            json.dumps({"sku": "<img src=x onerror=alert(1)>", "quantity": 1}).encode()),
    Request("GET", "/cgi-bin/run?cmd=" + quote(";cat /etc/passwd"), _browser()),
    Request("POST", "/upload", _browser(FORM), _form({"file": "<?php system($_GET['c']); ?>"})),
)

MIXES = {"benign": BENIGN, "attack": ATTACK}


def _lua_string(value: str | bytes) -> str:
    data = value.encode() if isinstance(value, str) else value
    return '"' + "".join(f"\\{b:03d}" if (b < 32 or b > 126 or b in (34, 92)) else chr(b) for b in data) + '"'


def raw_request(req: Request) -> bytes:
    """The exact bytes wrk sends: header order kept, keep-alive."""
    head = [f"{req.method} {req.path} HTTP/1.1"] + [f"{k}: {v}" for k, v in req.all_headers()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + req.body


def write_lua_table(mix: str, path: pathlib.Path) -> pathlib.Path:
    """A Lua file returning the mix as raw request strings, for mix.lua."""
    lines = ["return {"] + [f"  {_lua_string(raw_request(req))}," for req in MIXES[mix]] + ["}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def spoe_args(req: Request, index: int) -> dict:
    """The check-request arguments HAProxy would send for `req`
    (deploy/haproxy/spoe-modsecurity.conf)."""
    from ipaddress import IPv4Address

    from gateway.spop import encode_hdrs_bin

    path, _, query = req.path.partition("?")
    return {
        "id": f"bench-{index}", "app": None,
        "src": IPv4Address("127.0.0.1"), "src_port": 40000 + index % 20000,
        "dst": IPv4Address("127.0.0.1"), "dst_port": 8080,
        "method": req.method, "uri": req.path.encode(), "ver": "1.1",
        "headers": encode_hdrs_bin([(k.lower().encode(), v.encode()) for k, v in req.all_headers()]),
        "body": req.body or None, "ignore": None, "frontend": "web", "body_size": len(req.body),
    }
