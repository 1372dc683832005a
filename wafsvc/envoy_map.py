"""What Envoy's ext_authz and ext_proc calls and wafsvc's engine share: one
mapping, used by wafsvc/envoy_authz.py and wafsvc/envoy_extproc.py.

Byte-exact values. HTTP header values may hold any byte but CR, LF and NUL;
a protobuf `string` must be UTF-8. Envoy once sent such values as they came
and the authorization service failed to decode the message, which
`failure_mode_allow: true` turned into a pass (CVE-2023-27488,
GHSA-9g5w-hqr3-w2ph); since then it replaces bytes that are not UTF-8 with
"!" in `string` fields. Neither is what the engine must see. So the shipped
configs ask for bytes (ext_authz `encode_raw_headers: true`: `header_map`
with `raw_value`; ext_proc sends `raw_value`), and every value reaches the
engine as those bytes: `raw_value` when Envoy filled it, else `value` as
UTF-8, never decoded or re-encoded on the way. Pseudo-headers give the
request line; `:authority` becomes Host, as HTTP/1.1 would carry it.

Which rule set: gRPC metadata that the Envoy config sets on the filter's
`grpc_service.initial_metadata` (or per route): `x-waf-app` names the
application, `x-waf-ignore-rules` lists rule ids to ignore, as HAProxy's
txn.waf_app and txn.ignorerules do. Clients of Envoy cannot set them.
"""

from __future__ import annotations

from typing import Iterable

from envoy.type.v3 import http_status_pb2

from wafapi import waf_pb2
from wafsvc.errors import EvaluationFailed, invalid_field

APP_METADATA = "x-waf-app"
IGNORE_RULES_METADATA = "x-waf-ignore-rules"
RULES_HEADER = "x-waf-rules"          # on a denial: the matched rule ids, space-separated
REQUEST_ID_HEADER = "x-request-id"    # Envoy's request id: the transaction id, as HAProxy's unique-id
DEFAULT_DENY_STATUS = 403
DENIED_BODY = b"Request blocked by the web application firewall.\n"

# Envoy's HttpStatus takes a code from its enum only.
_KNOWN_STATUS = frozenset(http_status_pb2.StatusCode.values())


def header_bytes(header) -> tuple[bytes, bytes]:
    """(name, value) of an envoy.config.core.v3.HeaderValue, as bytes."""
    value = header.raw_value if header.raw_value else header.value.encode()
    return header.key.encode(), value


class RequestLine:
    """The request line and headers Envoy gave, split into what the engine
    takes: pseudo-headers out, `:authority` in as Host."""
    __slots__ = ("method", "path", "host", "headers", "request_id")

    def __init__(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        self.method = ""
        self.path = b""
        self.host = b""
        self.request_id = ""
        self.headers: list[tuple[bytes, bytes]] = []
        for name, value in pairs:
            if name.startswith(b":"):
                if name == b":method":
                    self.method = value.decode("latin-1")
                elif name == b":path":
                    self.path = value
                elif name == b":authority":
                    self.host = value
                continue
            if name == b"host":
                self.host = value
                continue
            if name == b"x-request-id":
                self.request_id = value.decode("latin-1")
            self.headers.append((name, value))
        if self.host:
            self.headers.insert(0, (b"host", self.host))
        if self.method == "CONNECT" and not self.path:
            self.path = self.host   # authority form: CONNECT host:port
        if not self.method or not self.path:
            raise invalid_field("Envoy sent request headers without :method or :path")


def transaction_id(request_id: str) -> str:
    """x-request-id as the engine's transaction id, if it is a sane one: a
    client may send its own when Envoy is told to keep it, and a long or
    odd one must not turn into a refusal (wafsvc.limits); the engine then
    makes one up."""
    if 0 < len(request_id) <= 128 and request_id.isascii() and request_id.isprintable():
        return request_id
    return ""


def response_status(pairs: Iterable[tuple[bytes, bytes]]) -> tuple[int, list[tuple[bytes, bytes]]]:
    """(status, headers) of a response's header map."""
    status, headers = 0, []
    for name, value in pairs:
        if name == b":status":
            try:
                status = int(value)
            except ValueError:
                raise invalid_field(f"Envoy sent a response status {value[:16]!r}") from None
        elif not name.startswith(b":"):
            headers.append((name, value))
    if not status:
        raise invalid_field("Envoy sent response headers without :status")
    return status, headers


def http_version(protocol: str) -> str:
    """"HTTP/1.1" -> "1.1", as the engine and the SPOP path take it."""
    return protocol.removeprefix("HTTP/") if protocol else "1.1"


def selection(metadata) -> tuple[str, tuple[int, ...]]:
    """(application, ignored rule ids) from the call's gRPC metadata."""
    app, ignore = "", ()
    for key, value in metadata or ():
        if key == APP_METADATA:
            app = value if isinstance(value, str) else value.decode()
        elif key == IGNORE_RULES_METADATA:
            text = value if isinstance(value, str) else value.decode()
            try:
                ignore = tuple(int(part) for part in text.replace(",", " ").split())
            except ValueError:
                raise EvaluationFailed("INVALID_ARGUMENT", f"{IGNORE_RULES_METADATA} must list rule ids, got "
                                       f"{text[:64]!r}", waf_pb2.IGNORE_LIST_REFUSED) from None
    return app, ignore


def deny_status(verdict: waf_pb2.Verdict) -> int:
    """The engine's status for a denial, if Envoy can send it; else 403."""
    status = verdict.status
    return status if status >= 400 and status in _KNOWN_STATUS else DEFAULT_DENY_STATUS


def rule_ids(verdict: waf_pb2.Verdict) -> bytes:
    return " ".join(str(match.id) for match in verdict.matches).encode()


def blocked(verdict: waf_pb2.Verdict) -> bool:
    """A denial Envoy must carry out. A redirect is a denial too: the
    engine stopped the request; Envoy answers with the status only."""
    return verdict.intervention and verdict.action != waf_pb2.ACTION_PASS
