"""SPOP varints, typed data, KV-lists and HAProxy's ``req.hdrs_bin`` blocks.

Pure functions over ``bytes``/``memoryview`` (SPOE.txt section 3.1). Decoders
take ``(buf, pos)`` and return ``(value, new_pos)``; the end of ``buf`` is the
end of the data, so callers pass a slice bounded to the frame. Every decode
failure raises SpopError(INVALID); encoders raise SpopError(INVALID) on values
they cannot represent.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address
from typing import Union

from .errors import SpopError, Status

__all__ = [
    "Buffer", "DataType", "Int32", "UInt32", "Int64", "UInt64",
    "encode_varint", "decode_varint", "encode_typed", "decode_typed",
    "encode_name", "decode_name", "decode_text", "encode_kv_list", "decode_kv_list",
    "parse_hdrs_bin", "encode_hdrs_bin",
]

Buffer = Union[bytes, bytearray, memoryview]

_U64_MAX = (1 << 64) - 1
_INVALID = Status.INVALID


class DataType(IntEnum):
    """TYPED-DATA type ids: the low nibble of the tag byte."""

    NULL = 0
    BOOL = 1
    INT32 = 2
    UINT32 = 3
    INT64 = 4
    UINT64 = 5
    IPV4 = 6
    IPV6 = 7
    STRING = 8
    BINARY = 9


_BOOL_TRUE = 0x10  # FLAGS bit 0 (the tag's high nibble) carries a boolean's value


class _SizedInt(int):
    # Subclasses remember which SPOP integer type a value travels as, so that
    # decode -> encode reproduces the same tag. Ranges are checked on encode.
    __slots__ = ()
    TAG = b"\x04"  # the tag byte; plain ints travel as INT64 too
    MIN = -(1 << 63)
    MAX = (1 << 63) - 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}({int(self)})"


class Int32(_SizedInt):
    __slots__ = ()
    TAG, MIN, MAX = b"\x02", -(1 << 31), (1 << 31) - 1


class UInt32(_SizedInt):
    __slots__ = ()
    TAG, MIN, MAX = b"\x03", 0, (1 << 32) - 1


class Int64(_SizedInt):
    __slots__ = ()


class UInt64(_SizedInt):
    __slots__ = ()
    TAG, MIN, MAX = b"\x05", 0, _U64_MAX


def _truncated(what: str) -> SpopError:
    return SpopError(_INVALID, f"truncated {what}")


# ---------------------------------------------------------------- varints

_SMALL = tuple(bytes((i,)) for i in range(240))  # the one-byte fast path
# Shift of the last byte of the longest legal encoding (10 bytes, for 2**64-1):
# encodings grow with the value, so anything longer overflows 64 bits.
_MAX_VARINT_SHIFT = 4 + 7 * 8


def encode_varint(n: int) -> bytes:
    """Encode 0 <= n < 2**64 as a SPOP ("peers") varint."""
    if type(n) is int and 0 <= n < 240:
        return _SMALL[n]
    if not isinstance(n, int) or n < 0 or n > _U64_MAX:
        raise SpopError(_INVALID, f"varint out of range: {n!r}")
    if n < 2288:  # two bytes: stream and frame ids, most lengths
        return bytes(((n & 0xFF) | 0xF0, (n - 240) >> 4))
    out = [(n & 0xFF) | 0xF0]
    n = (n - 240) >> 4
    while n >= 128:
        out.append((n & 0xFF) | 0x80)
        n = (n - 128) >> 7
    out.append(n)
    return bytes(out)


def decode_varint(buf: Buffer, pos: int) -> tuple[int, int]:
    """Decode a varint at ``buf[pos]``; return (value, position after it)."""
    try:
        value = buf[pos]
        if value < 240:
            return value, pos + 1
        shift = 4
        while True:
            pos += 1
            b = buf[pos]
            # As in HAProxy: the whole byte, continuation bit included, is
            # added; the encoder subtracted it, which keeps the code bijective.
            value += b << shift
            if b < 128:
                break
            shift += 7
            if shift > _MAX_VARINT_SHIFT:
                raise SpopError(_INVALID, "varint too long")
    except IndexError:
        raise _truncated("varint") from None
    if value > _U64_MAX:
        raise SpopError(_INVALID, "varint overflows 64 bits")
    return value, pos + 1


# ------------------------------------------------------- names and blobs

def _encode_bytes(data: Buffer) -> bytes:
    n = len(data)
    return (_SMALL[n] if n < 240 else encode_varint(n)) + data  # type: ignore[operator]


def encode_name(name: str) -> bytes:
    """A bare <LENGTH:varint><BYTES> string: KV names, message and var names."""
    return _encode_bytes(_utf8(name))


def _utf8(s: str) -> bytes:
    try:
        return s.encode("utf-8", "surrogateescape")
    except (UnicodeEncodeError, AttributeError) as exc:
        raise SpopError(_INVALID, f"cannot encode string {s!r}") from exc


def _decode_blob(buf: Buffer, pos: int) -> tuple[Buffer, int]:
    try:
        n = buf[pos]
    except IndexError:
        raise _truncated("length") from None
    if n < 240:
        pos += 1
    else:
        n, pos = decode_varint(buf, pos)
    end = pos + n
    if end > len(buf):
        raise _truncated("string")
    return buf[pos:end], end


def decode_text(raw: Buffer) -> str:
    """UTF-8 with surrogateescape, so that invalid bytes survive a round trip."""
    try:
        return str(raw, "utf-8")  # the strict codec has a faster path
    except UnicodeDecodeError:
        return str(raw, "utf-8", "surrogateescape")


def decode_name(buf: Buffer, pos: int) -> tuple[str, int]:
    """Decode a bare <LENGTH:varint><BYTES> string."""
    raw, pos = _decode_blob(buf, pos)
    return decode_text(raw), pos


# ------------------------------------------------------------ typed data

def encode_typed(value: object) -> bytes:
    """Encode a Python value as TYPED-DATA.

    None, bool, Int32/UInt32/Int64/UInt64 (a plain int is INT64), IPv4Address,
    IPv6Address, str (UTF-8, surrogateescape) and bytes-likes (BINARY).
    """
    t = type(value)
    if t is str:
        return b"\x08" + _encode_bytes(_utf8(value))  # type: ignore[arg-type]
    if value is None:
        return b"\x00"
    if t is bool:
        return b"\x11" if value else b"\x01"
    if isinstance(value, int):
        cls = t if isinstance(value, _SizedInt) else _SizedInt
        if not cls.MIN <= value <= cls.MAX:
            raise SpopError(_INVALID, f"{value!r} out of range for {DataType(cls.TAG[0]).name}")
        # Signed values travel as their 64-bit two's complement, as HAProxy
        # reads every integer type straight into an int64.
        n = int(value) & _U64_MAX
        return cls.TAG + (_SMALL[n] if n < 240 else encode_varint(n))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return b"\x09" + _encode_bytes(bytes(value))
    if isinstance(value, str):
        return b"\x08" + _encode_bytes(_utf8(value))
    if isinstance(value, IPv4Address):
        return b"\x06" + value.packed
    if isinstance(value, IPv6Address):
        return b"\x07" + value.packed
    raise SpopError(_INVALID, f"no SPOP type for {t.__name__}")


def decode_typed(buf: Buffer, pos: int) -> tuple[object, int]:
    """Decode TYPED-DATA at ``buf[pos]``; return (value, position after it)."""
    try:
        tag = buf[pos]
    except IndexError:
        raise _truncated("typed data") from None
    t = tag & 0x0F
    pos += 1
    # Ordered by how often HAProxy sends each type. Flag bits other than a
    # boolean's are ignored, as HAProxy does.
    if t == 8:
        raw, pos = _decode_blob(buf, pos)
        return decode_text(raw), pos
    if t == 9:
        raw, pos = _decode_blob(buf, pos)
        return bytes(raw), pos
    if t == 0:
        return None, pos
    if 2 <= t <= 5:
        v, pos = decode_varint(buf, pos)
        if t == 4:
            return Int64(v - (1 << 64) if v >> 63 else v), pos
        if t == 5:
            return UInt64(v), pos
        if t == 3:
            if v >> 32:
                raise SpopError(_INVALID, "UINT32 out of range")
            return UInt32(v), pos
        if v >> 63:
            v -= 1 << 64
        if not -(1 << 31) <= v < (1 << 31):
            raise SpopError(_INVALID, "INT32 out of range")
        return Int32(v), pos
    if t == 1:
        return bool(tag & _BOOL_TRUE), pos
    if t == 6 or t == 7:
        end = pos + (4 if t == 6 else 16)
        if end > len(buf):
            raise _truncated("address")
        ip = int.from_bytes(buf[pos:end], "big")
        return (IPv4Address(ip) if t == 6 else IPv6Address(ip)), end
    raise SpopError(_INVALID, f"unknown data type {t}")


# -------------------------------------------------------------- KV-lists

def encode_kv_list(items: Iterable[tuple[str, object]]) -> bytes:
    """KV-LIST: repeated <name><TYPED-DATA>, order and duplicates kept."""
    out = bytearray()
    for name, value in items:
        out += encode_name(name)
        out += encode_typed(value)
    return bytes(out)


def decode_kv_list(buf: Buffer, pos: int = 0) -> list[tuple[str, object]]:
    """Decode KV items from ``pos`` to the end of ``buf``."""
    items = []
    end = len(buf)
    while pos < end:
        name, pos = decode_name(buf, pos)
        value, pos = decode_typed(buf, pos)
        items.append((name, value))
    return items


# ------------------------------------------------------- req.hdrs_bin

def parse_hdrs_bin(data: Buffer | str) -> list[tuple[bytes, bytes]]:
    """Split HAProxy's ``req.hdrs_bin`` block into (name, value) pairs.

    The block is repeated <len:varint><name><len:varint><value>, closed by an
    empty name and an empty value. Order and duplicates are kept; anything
    malformed, unterminated or followed by extra bytes is INVALID.
    """
    if isinstance(data, str):  # the same bytes, if it came as a STRING
        data = _utf8(data)
    elif not isinstance(data, bytes):
        if not isinstance(data, (bytearray, memoryview)):
            raise SpopError(_INVALID, f"hdrs_bin must be bytes, not {type(data).__name__}")
        data = bytes(data)  # one copy, so slices below are bytes already
    out = []
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
                raise _truncated("header value")
            if not ln:
                if lv:
                    raise SpopError(_INVALID, "header with an empty name")
                if end != n:
                    raise SpopError(_INVALID, "bytes after the hdrs_bin terminator")
                return out
            out.append((data[pos:name_end], data[vpos:end]))
            pos = end
    except IndexError:
        raise _truncated("hdrs_bin (no terminator)") from None


def encode_hdrs_bin(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The inverse of parse_hdrs_bin, for tests and fuzzers that play HAProxy."""
    out = bytearray()
    for name, value in headers:
        if not isinstance(name, bytes) or not isinstance(value, bytes):
            raise SpopError(_INVALID, f"header {name!r} is not a pair of bytes")
        if not name:
            raise SpopError(_INVALID, "header with an empty name")
        out += _encode_bytes(name)
        out += _encode_bytes(value)
    out += b"\x00\x00"
    return bytes(out)
