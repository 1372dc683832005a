"""Typed SPOP argument values, as the NOTIFY decoder finds them in a frame
((type tag, value) pairs), checked and turned into protobuf pieces: the
same checks and errors as gateway.mapping's reference helpers (a wrong type
is an InvalidMessage naming the argument; bytes that are not UTF-8 where
protobuf wants a string are shown as \\xNN). Used by gateway/notify.py for
both check-request and check-response.
"""

from __future__ import annotations

from gateway import protowire as pw
from gateway.mapping import InvalidMessage, Problem
from gateway.spop import SpopError, Status
from gateway.spop.types import decode_text, decode_typed, decode_varint

_INVALID = Status.INVALID
_TYPE_NAMES = {1: "bool", 2: "Int32", 3: "UInt32", 4: "Int64", 5: "UInt64", 6: "IPv4Address",
               7: "IPv6Address", 8: "str", 9: "bytes"}
_STRING, _BINARY, _IPV4, _IPV6 = 8, 9, 6, 7


def _wrong(field: str, tag: int, wanted: str) -> InvalidMessage:
    return InvalidMessage(Problem.WRONG_TYPE, f"should be {wanted}, got {_TYPE_NAMES.get(tag, '?')}",
                          argument=field)


def _utf8(raw: bytes) -> bytes:
    """Protobuf strings must be valid UTF-8: keep valid bytes as they are,
    show others as \\xNN (what mapping._text does)."""
    if raw.isascii():
        return raw
    try:
        raw.decode("utf-8")
        return raw
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace").encode("utf-8")


def _text(tv, field: str) -> bytes:
    if tv is None or tv[0] == 0:
        return b""
    tag, value = tv
    if tag == _STRING or tag == _BINARY:
        return _utf8(value)
    raise _wrong(field, tag, "a string")


def _raw(tv, field: str) -> bytes:
    if tv is None or tv[0] == 0:
        return b""
    tag, value = tv
    if tag == _STRING or tag == _BINARY:
        return value
    raise _wrong(field, tag, "a string or binary")


def _address(tv, field: str) -> bytes:
    if tv is None or tv[0] == 0:
        return b""
    tag, value = tv
    if tag == _IPV4:
        return value
    if tag == _IPV6:
        return str(value).encode()
    if tag == _STRING:
        return _utf8(value)
    raise _wrong(field, tag, "an address")


def _int(tv, field: str, default: int) -> int:
    if tv is None or tv[0] == 0:
        return default
    tag, value = tv
    if 2 <= tag <= 5:
        return int(value)
    raise _wrong(field, tag, "an integer")


def _port(tv, field: str) -> int:
    if tv is not None and tv[0] == 1:
        raise _wrong(field, 1, "a port number")
    try:
        port = _int(tv, field, 0)
    except InvalidMessage as exc:
        exc.detail = exc.detail.replace("an integer", "a port number")
        raise
    if not 0 <= port <= 65535:
        raise InvalidMessage(Problem.BAD_VALUE, f"should be a port number, got {tv[1]!r}", argument=field)
    return port


def _flag(tv, field: str) -> bool:
    if tv is None or tv[0] == 0:
        return False
    tag, value = tv
    if 1 <= tag <= 5:
        return bool(value)
    raise _wrong(field, tag, "a boolean (bool(true)) or an integer")


_ONE = tuple(bytes((i,)) for i in range(128))


def _headers(data: bytes, tag: bytes = pw.T_HEADER) -> tuple[list, int, bytes]:
    """req.hdrs_bin -> (EvaluateRequest.headers entries, Content-Length or
    -1, Host) in one walk; the checks of spop.types.parse_hdrs_bin.
    res.hdrs_bin with tag=pw.R_HEADER: ResponseRequest.headers entries."""
    out: list[bytes] = []   # pieces of the entries, joined with the rest of the request
    extend = out.extend
    one = _ONE
    content_length = -1
    host = b""
    n = len(data)
    pos = 0
    try:
        while True:
            ln = data[pos]
            if ln < 240:
                pos += 1
            else:
                ln, pos = decode_varint(data, pos)
            name_end = pos + ln
            lv = data[name_end]  # IndexError also covers a name past the end
            vpos = name_end + 1
            if lv >= 240:
                lv, vpos = decode_varint(data, name_end)
            end = vpos + lv
            if end > n:
                raise SpopError(_INVALID, "truncated header value")
            if not ln:
                if lv:
                    raise SpopError(_INVALID, "header with an empty name")
                if end != n:
                    raise SpopError(_INVALID, "bytes after the hdrs_bin terminator")
                return out, content_length, host
            name = data[pos:name_end]
            value = data[vpos:end]
            size = ln + lv + 4
            if not lv:   # proto3 leaves an empty value out
                out.append(pw.header(name, value, tag))
            elif size < 128:
                extend((tag, one[size], b"\x0a", one[ln], name, b"\x12", one[lv], value))
            else:
                out.append(pw.header(name, value, tag))
            if ln == 14 and name == b"content-length":
                try:
                    content_length = int(value)
                except ValueError:
                    raise InvalidMessage(Problem.BAD_VALUE, "holds a content-length that is not a number",
                                         argument="headers") from None
            elif ln == 4 and name == b"host":
                host = value
            pos = end
    except IndexError:
        raise SpopError(_INVALID, "truncated hdrs_bin (no terminator)") from None


def _skip_args(buf: bytes, pos: int, nargs: int, end: int) -> tuple[int, list[str]]:
    """Walks (and checks) the arguments of a message we do not evaluate."""
    names = []
    for _ in range(nargs):
        n = buf[pos]
        if n < 240:
            pos += 1
        else:
            n, pos = decode_varint(buf, pos)
        q = pos + n
        if q >= end:
            raise SpopError(_INVALID, "truncated argument")
        names.append(decode_text(buf[pos:q]))
        _, pos = decode_typed(buf, q)
    return pos, names
