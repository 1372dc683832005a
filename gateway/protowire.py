"""Protobuf wire format, by hand, for the messages on the gateway's hot
path: waf.v1.EvaluateRequest, waf.v1.ResponseRequest and the BatchRequest
that carries either.

Why by hand: building an EvaluateRequest through upb and serializing it cost
more than decoding the NOTIFY it came from; the bytes HAProxy sent are mostly
copied as they are. tests/unit/test_notify.py checks, value for value, that
these bytes parse to what gateway.mapping.build_request builds.

Field numbers: proto/waf/v1/waf.proto. Proto3 omits default values, so do we.
"""

from __future__ import annotations

_ONE_BYTE = tuple(bytes((i,)) for i in range(128))


def varint(value: int) -> bytes:
    """A protobuf varint; negative int64 values as their 10-byte two's complement."""
    if 0 <= value < 128:
        return _ONE_BYTE[value]
    if value < 0:
        value &= (1 << 64) - 1
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes, message), tag byte given."""
    n = len(payload)
    return tag + (_ONE_BYTE[n] if n < 128 else varint(n)) + payload


# EvaluateRequest tags: (field number << 3) | wire type (2 = length-delimited, 0 = varint).
T_TRANSACTION_ID = b"\x0a"
T_CLIENT_IP = b"\x12"
T_CLIENT_PORT = b"\x18"
T_SERVER_IP = b"\x22"
T_SERVER_PORT = b"\x28"
T_METHOD = b"\x32"
T_URI = b"\x3a"
T_HTTP_VERSION = b"\x42"
T_HEADER = b"\x4a"
T_BODY = b"\x52"
T_BODY_TRUNCATED = b"\x58\x01"
T_CONTENT_LENGTH = b"\x60"
T_APPLICATION = b"\x6a"
T_IGNORE_RULE_IDS = b"\x72"   # packed repeated uint64
T_INSPECT_RESPONSE = b"\x78\x01"
# ResponseRequest tags.
R_HANDLE = b"\x0a"
R_STATUS = b"\x10"
R_HTTP_VERSION = b"\x1a"
R_HEADER = b"\x22"
R_BODY = b"\x2a"
R_BODY_TRUNCATED = b"\x30\x01"
R_CONTENT_LENGTH = b"\x38"
R_TRANSACTION_ID = b"\x42"
# Header: name = 1, value = 2 (bytes).
T_HEADER_NAME = b"\x0a"
T_HEADER_VALUE = b"\x12"


def header(name: bytes, value: bytes, tag: bytes = T_HEADER) -> bytes:
    """One EvaluateRequest.headers entry (ResponseRequest's with tag=R_HEADER)."""
    n, v = len(name), len(value)
    inner = b"\x0a" + (_ONE_BYTE[n] if n < 128 else varint(n)) + name
    if v:  # proto3 leaves empty values out
        inner += b"\x12" + (_ONE_BYTE[v] if v < 128 else varint(v)) + value
    m = len(inner)
    return tag + (_ONE_BYTE[m] if m < 128 else varint(m)) + inner


def packed(tag: bytes, values) -> bytes:
    return field(tag, b"".join(varint(v) for v in values))


def batch_entry(ref: int, request: bytes) -> bytes:
    """EvaluateBatch.requests entry: BatchRequest{ref = 1, request = 2},
    as field 1 of the batch; a batch is these entries joined."""
    inner = b"\x08" + varint(ref) + field(b"\x12", request)
    return field(b"\x0a", inner)


def response_entry(ref: int, response: bytes) -> bytes:
    """EvaluateBatch.requests entry: BatchRequest{ref = 1, response = 3}."""
    inner = b"\x08" + varint(ref) + field(b"\x1a", response)
    return field(b"\x0a", inner)
