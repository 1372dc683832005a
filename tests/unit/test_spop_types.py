"""gateway.spop.types: varints, typed data, KV-lists and req.hdrs_bin."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.spop import (
    DataType, Int32, Int64, SpopError, Status, UInt32, UInt64, decode_kv_list, decode_typed,
    decode_varint, encode_hdrs_bin, encode_kv_list, encode_typed, encode_varint, parse_hdrs_bin,
)

# Per test, not a global profile: other suites share this pytest session.
fuzz = settings(max_examples=200, deadline=None)

U64 = 2**64 - 1

typed_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**31), 2**31 - 1).map(Int32),
    st.integers(0, 2**32 - 1).map(UInt32),
    st.integers(-(2**63), 2**63 - 1).map(Int64),
    st.integers(0, U64).map(UInt64),
    st.ip_addresses(v=4),
    st.ip_addresses(v=6),
    st.text(),
    st.binary(),
)


def invalid(fn, *args):
    with pytest.raises(SpopError) as info:
        fn(*args)
    assert info.value.status == Status.INVALID
    return info.value


# ------------------------------------------------------------------ varints

# Boundaries of the encoded lengths, from the table in SPOE.txt 3.1.
VARINT_VECTORS = [
    (0, "00"),
    (1, "01"),
    (239, "ef"),
    (240, "f000"),
    (2287, "ff7f"),
    (2288, "f08000"),
    (16380, "fcf006"),
    (264431, "ffff7f"),
    (264432, "f0808000"),
    (33818863, "ffffff7f"),
    (33818864, "f0808080" "00"),
    (4328786159, "ffffffff7f"),
    (4328786160, "f080808080" "00"),
    (U64, "fff0fefefefefefefe0e"),
]


@pytest.mark.parametrize(("value", "hexa"), VARINT_VECTORS)
def test_varint_known_answers(value, hexa):
    raw = bytes.fromhex(hexa)
    assert encode_varint(value) == raw
    assert decode_varint(raw, 0) == (value, len(raw))
    assert decode_varint(b"\xaa" + raw + b"\xbb", 1) == (value, len(raw) + 1)


@fuzz
@given(st.integers(0, U64))
def test_varint_round_trip(n):
    raw = encode_varint(n)
    assert decode_varint(raw, 0) == (n, len(raw))
    assert decode_varint(memoryview(raw + b"tail"), 0) == (n, len(raw))
    assert (len(raw) == 1) == (n < 240)


@fuzz
@given(st.integers(240, 255), st.lists(st.integers(128, 255), max_size=8), st.integers(0, 127))
def test_every_well_formed_varint_is_canonical(first, middle, last):
    # The code is a bijection: a well-formed sequence re-encodes to itself.
    raw = bytes([first, *middle, last])
    try:
        value, pos = decode_varint(raw, 0)
    except SpopError as exc:  # only possible above 2**64-1
        assert exc.status == Status.INVALID and len(raw) == 10
        return
    assert pos == len(raw)
    assert encode_varint(value) == raw


@pytest.mark.parametrize("raw", [b"", b"\xf0", b"\xff\x80", b"\xf0\xff\xff"])
def test_varint_truncated(raw):
    invalid(decode_varint, raw, 0)


def test_varint_too_long_or_too_big():
    invalid(decode_varint, b"\xff" * 10 + b"\x00", 0)  # 11 bytes
    invalid(decode_varint, b"\xff" * 9 + b"\x7f", 0)  # 10 bytes, above 2**64-1
    invalid(decode_varint, b"\xff" * 1000, 0)


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, "1", None])
def test_varint_encode_out_of_range(bad):
    invalid(encode_varint, bad)


# --------------------------------------------------------------- typed data

@fuzz
@given(typed_values)
def test_typed_round_trip(value):
    raw = encode_typed(value)
    decoded, pos = decode_typed(raw + b"\x00trailing", 0)
    assert pos == len(raw)
    assert decoded == value
    assert type(decoded) is type(value)
    assert raw[0] & 0x0F == _expected_tag(value)


def _expected_tag(value):
    if value is None:
        return DataType.NULL
    if isinstance(value, bool):
        return DataType.BOOL
    if isinstance(value, (IPv4Address, IPv6Address)):
        return DataType.IPV4 if value.version == 4 else DataType.IPV6
    if isinstance(value, str):
        return DataType.STRING
    if isinstance(value, bytes):
        return DataType.BINARY
    return {Int32: DataType.INT32, UInt32: DataType.UINT32, Int64: DataType.INT64,
            UInt64: DataType.UINT64}[type(value)]


TYPED_VECTORS = [
    (None, "00"),
    (False, "01"),
    (True, "11"),
    (Int32(-1), "02" + "fff0fefefefefefefe0e"),  # sign-extended to 64 bits
    (Int32(5), "0205"),
    (UInt32(2**32 - 1), "03" + encode_varint(2**32 - 1).hex()),
    (Int64(-2), "04" + encode_varint(U64 - 1).hex()),
    (UInt64(300), "05" + encode_varint(300).hex()),
    (ip_address("10.0.0.1"), "060a000001"),
    (ip_address("::1"), "07" + "00" * 15 + "01"),
    ("abc", "0803616263"),
    ("é", "0802c3a9"),
    (b"\x00\xff", "090200ff"),
    (b"", "0900"),
    ("", "0800"),
]


@pytest.mark.parametrize(("value", "hexa"), TYPED_VECTORS)
def test_typed_known_answers(value, hexa):
    raw = bytes.fromhex(hexa)
    assert encode_typed(value) == raw
    decoded, pos = decode_typed(raw, 0)
    assert (decoded, type(decoded), pos) == (value, type(value), len(raw))


def test_plain_values_pick_a_type():
    assert encode_typed(7) == b"\x04\x07"  # plain int -> INT64
    assert decode_typed(b"\x04\x07", 0) == (7, 2)
    assert encode_typed(bytearray(b"ab")) == encode_typed(memoryview(b"ab")) == b"\x09\x02ab"
    assert encode_typed(Status.TOO_BIG) == b"\x04\x03"  # other int subclasses: INT64


def test_str_subclasses_are_strings():
    class Name(str):
        pass

    assert encode_typed(Name("ab")) == b"\x08\x02ab"


def test_spop_error_carries_its_status():
    exc = SpopError(Status.TOO_BIG, "frame of 9999 bytes")
    assert exc.status is Status.TOO_BIG and exc.message == "frame of 9999 bytes"
    assert str(exc) == "TOO_BIG: frame of 9999 bytes"
    assert str(SpopError(Status.INVALID)) == "INVALID"
    assert str(SpopError(250, "agent-defined")) == "250: agent-defined"  # type: ignore[arg-type]


def test_bool_ignores_other_flag_bits():
    # HAProxy reads only FLAGS bit 0 of a boolean, and ignores flags elsewhere.
    assert decode_typed(b"\x21", 0) == (False, 1)
    assert decode_typed(b"\xf1", 0) == (True, 1)
    assert decode_typed(b"\xf8\x01a", 0) == ("a", 3)


@fuzz
@given(st.binary())
def test_invalid_utf8_strings_round_trip(raw):
    wire = b"\x08" + encode_varint(len(raw)) + raw
    text, _ = decode_typed(wire, 0)
    assert isinstance(text, str)
    assert encode_typed(text) == wire


@pytest.mark.parametrize("value", [Int32(2**31), Int32(-(2**31) - 1), UInt32(-1), UInt32(2**32),
                                   2**63, -(2**63) - 1, Int64(2**63), UInt64(-1), UInt64(2**64)])
def test_integer_ranges_checked_on_encode(value):
    invalid(encode_typed, value)


@pytest.mark.parametrize("value", [1.5, object(), [1], {"a": 1}, "\ud800"])
def test_unencodable_values(value):
    invalid(encode_typed, value)


@pytest.mark.parametrize("hexa", [
    "", "02", "08", "0805ab", "09f0", "06000000", "07" + "00" * 15,
    "0a", "0b", "0c", "0d", "0e", "0f",  # reserved types
    "03" + "f080808080" "00",  # UINT32 above 2**32-1
    "02" + encode_varint(2**31).hex(),  # INT32 above 2**31-1
    "02" + encode_varint(2**64 - 2**31 - 1).hex(),  # INT32 below -2**31
])
def test_typed_malformed(hexa):
    invalid(decode_typed, bytes.fromhex(hexa), 0)


@fuzz
@given(st.binary(max_size=64))
def test_typed_random_bytes_never_crash(raw):
    try:
        value, pos = decode_typed(raw, 0)
    except SpopError as exc:
        assert exc.status == Status.INVALID
    else:
        assert 0 < pos <= len(raw)
        assert decode_typed(encode_typed(value), 0)[0] == value


# ----------------------------------------------------------------- KV-lists

kv_lists = st.lists(st.tuples(st.text(max_size=20), typed_values), max_size=10)


@fuzz
@given(kv_lists)
def test_kv_list_round_trip(items):
    raw = encode_kv_list(items)
    assert decode_kv_list(raw) == items
    assert decode_kv_list(memoryview(b"xx" + raw), 2) == items


def test_kv_list_keeps_order_and_duplicates():
    items = [("b", Int64(1)), ("a", None), ("b", "again")]
    raw = encode_kv_list(items)
    assert raw == b"\x01b\x04\x01" b"\x01a\x00" b"\x01b\x08\x05again"
    assert decode_kv_list(raw) == items


@pytest.mark.parametrize("raw", [b"\x01", b"\x01a", b"\x05ab\x00", b"\x01a\x08\x02x"])
def test_kv_list_truncated(raw):
    invalid(decode_kv_list, raw)


# ---------------------------------------------------------------- hdrs_bin

headers_lists = st.lists(st.tuples(st.binary(min_size=1, max_size=300), st.binary(max_size=300)), max_size=8)


@fuzz
@given(headers_lists)
def test_hdrs_bin_round_trip(headers):
    raw = encode_hdrs_bin(headers)
    assert parse_hdrs_bin(raw) == headers
    assert parse_hdrs_bin(bytearray(raw)) == headers
    assert parse_hdrs_bin(memoryview(raw)) == headers


def test_hdrs_bin_known_answer():
    raw = b"\x04host\x0bexample.com" b"\x06cookie\x03a=b" b"\x06cookie\x03c=d" b"\x00\x00"
    expected = [(b"host", b"example.com"), (b"cookie", b"a=b"), (b"cookie", b"c=d")]
    assert parse_hdrs_bin(raw) == expected
    assert encode_hdrs_bin(expected) == raw
    assert parse_hdrs_bin(b"\x00\x00") == []


def test_hdrs_bin_long_values_use_multibyte_lengths():
    headers = [(b"x-big", b"v" * 70000), (b"n" * 240, b"")]
    raw = encode_hdrs_bin(headers)
    assert raw[6:9] == encode_varint(70000)
    assert parse_hdrs_bin(raw) == headers


def test_hdrs_bin_from_a_string_value():
    # The same bytes, if a config sends them as a STRING instead of BINARY.
    raw = encode_hdrs_bin([(b"h", b"\xff\xfe")])
    text, _ = decode_typed(b"\x08" + encode_varint(len(raw)) + raw, 0)
    assert parse_hdrs_bin(text) == [(b"h", b"\xff\xfe")]


@pytest.mark.parametrize("headers", [[(b"", b"v")], [("host", b"v")], [(b"host", "v")], [(b"h", None)]])
def test_hdrs_bin_encode_errors(headers):
    invalid(encode_hdrs_bin, headers)


@pytest.mark.parametrize("raw", [
    b"",  # no terminator at all
    b"\x00",  # half a terminator
    b"\x04host\x01a",  # no terminator
    b"\x04host",  # no value
    b"\x04ho",  # truncated name
    b"\x04host\x05ab\x00\x00",  # truncated value
    b"\x00\x01a\x00\x00",  # empty name with a value
    b"\x00\x00\x00",  # bytes after the terminator
    b"\x01a\x01b\x00\x00junk",
    b"\xf0",  # truncated varint
])
def test_hdrs_bin_malformed(raw):
    invalid(parse_hdrs_bin, raw)


@pytest.mark.parametrize("value", [None, 5, Int64(1), ip_address("1.2.3.4")])
def test_hdrs_bin_wrong_type(value):
    invalid(parse_hdrs_bin, value)


@fuzz
@given(st.binary(max_size=100))
def test_hdrs_bin_random_bytes_never_crash(raw):
    try:
        headers = parse_hdrs_bin(raw)
    except SpopError as exc:
        assert exc.status == Status.INVALID
    else:
        assert encode_hdrs_bin(headers) == raw
