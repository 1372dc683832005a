"""SPOP frames (SPOE.txt section 3.2): dataclasses, encoders and decoders.

A frame on the wire is <LENGTH:4 BE><TYPE:1><FLAGS:4 BE><STREAM-ID:varint>
<FRAME-ID:varint><PAYLOAD>. Encoders return the whole frame, length prefix
included; ``decode_frame`` takes what follows the length prefix. Both sides
are here (agent frames for the gateway, HAProxy frames for tests and fuzzers).

Fragmentation is never accepted: a frame without FIN, a continuation (UNSET)
frame, and a frame carrying ABORT (which only means something for fragmented
payloads) all raise FRAGMENTATION_UNSUPPORTED. An unknown frame type is INVALID.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Union

from .errors import SpopError, Status
from .types import (
    Buffer, UInt32, decode_kv_list, decode_name, decode_text, decode_typed, decode_varint,
    encode_kv_list, encode_name, encode_typed, encode_varint,
)

__all__ = [
    "FrameType", "FrameFlags", "Scope", "ActionType", "Message", "SetVar", "UnsetVar",
    "Action", "HaproxyHello", "HaproxyDisconnect", "Notify", "AgentHello",
    "AgentDisconnect", "Ack", "Frame", "decode_frame_header", "decode_payload",
    "decode_frame", "encode_frame", "encode_haproxy_hello", "encode_haproxy_disconnect",
    "encode_notify", "encode_agent_hello", "encode_agent_disconnect", "encode_ack",
    "encode_ack_frame", "encode_actions",
]

_INVALID = Status.INVALID


class FrameType(IntEnum):
    UNSET = 0  # continuation of a fragmented payload
    HAPROXY_HELLO = 1
    HAPROXY_DISCONNECT = 2
    NOTIFY = 3
    AGENT_HELLO = 101
    AGENT_DISCONNECT = 102
    ACK = 103


class FrameFlags(IntFlag):
    FIN = 1
    ABORT = 2


class Scope(IntEnum):
    PROCESS = 0
    SESSION = 1
    TRANSACTION = 2
    REQUEST = 3
    RESPONSE = 4


class ActionType(IntEnum):
    SET_VAR = 1
    UNSET_VAR = 2


@dataclass(frozen=True, slots=True)
class Message:
    """One spoe-message: its name and its arguments, in order, duplicates kept."""

    name: str
    args: tuple[tuple[str, object], ...] = ()

    def arg(self, name: str, default: object = None) -> object:
        """The value of the first argument called ``name``."""
        for key, value in self.args:
            if key == name:
                return value
        return default


@dataclass(frozen=True, slots=True)
class SetVar:
    scope: Scope
    name: str
    value: object


@dataclass(frozen=True, slots=True)
class UnsetVar:
    scope: Scope
    name: str


Action = Union[SetVar, UnsetVar]


@dataclass(frozen=True, slots=True)
class HaproxyHello:
    supported_versions: tuple[str, ...]
    max_frame_size: int
    capabilities: frozenset[str]
    healthcheck: bool = False
    engine_id: str | None = None


@dataclass(frozen=True, slots=True)
class HaproxyDisconnect:
    status: int
    message: str


@dataclass(frozen=True, slots=True)
class Notify:
    stream_id: int
    frame_id: int
    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class AgentHello:
    version: str
    max_frame_size: int
    capabilities: frozenset[str]
    engine_id: str | None = None  # not in the spec; HAProxy skips unknown items


@dataclass(frozen=True, slots=True)
class AgentDisconnect:
    status: int
    message: str


@dataclass(frozen=True, slots=True)
class Ack:
    stream_id: int
    frame_id: int
    actions: tuple[Action, ...] = ()


Frame = Union[HaproxyHello, HaproxyDisconnect, Notify, AgentHello, AgentDisconnect, Ack]

# ------------------------------------------------------------- encoding

_HEAD = struct.Struct(">IBI")  # length, type, flags
_ZERO_IDS = b"\x00\x00"  # HELLO and DISCONNECT frames carry stream 0, frame 0
# Plain ints: struct packs them faster than IntEnum members.
_T_HAPROXY_HELLO, _T_HAPROXY_DISCONNECT, _T_NOTIFY = 1, 2, 3
_T_AGENT_HELLO, _T_AGENT_DISCONNECT, _T_ACK = 101, 102, 103


def _frame(ftype: int, ids: bytes, payload: bytes) -> bytes:
    return _HEAD.pack(5 + len(ids) + len(payload), ftype, 1) + ids + payload  # flags: FIN


def _join(items: Iterable[str]) -> str:
    # Sets have no order: sort them so that the same frame gives the same bytes.
    return ",".join(sorted(items) if isinstance(items, (set, frozenset)) else items)


def encode_haproxy_hello(
    supported_versions: Iterable[str] = ("2.0",), max_frame_size: int = 16380,
    capabilities: Iterable[str] = ("pipelining",), healthcheck: bool = False,
    engine_id: str | None = None,
) -> bytes:
    kv: list[tuple[str, object]] = [
        ("supported-versions", _join(supported_versions)),
        ("max-frame-size", UInt32(max_frame_size)),
        ("capabilities", _join(capabilities)),
    ]
    if engine_id is not None:
        kv.append(("engine-id", engine_id))
    if healthcheck:
        kv.append(("healthcheck", True))
    return _frame(_T_HAPROXY_HELLO, _ZERO_IDS, encode_kv_list(kv))


def encode_agent_hello(
    max_frame_size: int, capabilities: Iterable[str] = ("pipelining",),
    version: str = "2.0", engine_id: str | None = None,
) -> bytes:
    kv: list[tuple[str, object]] = [
        ("version", version),
        ("max-frame-size", UInt32(max_frame_size)),
        ("capabilities", _join(capabilities)),
    ]
    if engine_id is not None:
        kv.append(("engine-id", engine_id))
    return _frame(_T_AGENT_HELLO, _ZERO_IDS, encode_kv_list(kv))


def _encode_disconnect(ftype: int, status: int, message: str) -> bytes:
    kv = (("status-code", UInt32(status)), ("message", message))
    return _frame(ftype, _ZERO_IDS, encode_kv_list(kv))


def encode_haproxy_disconnect(status: int, message: str) -> bytes:
    return _encode_disconnect(_T_HAPROXY_DISCONNECT, status, message)


def encode_agent_disconnect(status: int, message: str) -> bytes:
    return _encode_disconnect(_T_AGENT_DISCONNECT, status, message)


def _ids(stream_id: int, frame_id: int) -> bytes:
    return encode_varint(stream_id) + encode_varint(frame_id)


def encode_notify(stream_id: int, frame_id: int, messages: Iterable[Message]) -> bytes:
    out = bytearray()
    for msg in messages:
        if len(msg.args) > 255:
            raise SpopError(_INVALID, "more than 255 arguments in a message")
        out += encode_name(msg.name)
        out.append(len(msg.args))
        out += encode_kv_list(msg.args)
    return _frame(_T_NOTIFY, _ids(stream_id, frame_id), bytes(out))


# <ACTION-TYPE><NB-ARGS><VAR-SCOPE> for each action and scope (SPOE.txt 3.4).
_SET_VAR = {s: bytes((ActionType.SET_VAR, 3, s)) for s in range(5)}
_UNSET_VAR = {s: bytes((ActionType.UNSET_VAR, 2, s)) for s in range(5)}


def encode_ack(stream_id: int, frame_id: int, actions: Iterable[Action] = ()) -> bytes:
    return encode_ack_frame(stream_id, frame_id, encode_actions(actions))


def encode_ack_frame(stream_id: int, frame_id: int, actions: bytes) -> bytes:
    """An ACK around actions encoded already (encode_actions), e.g. cached ones."""
    ids = (_SMALL_IDS[stream_id] if 0 <= stream_id < 240 else encode_varint(stream_id)) + (
        _SMALL_IDS[frame_id] if 0 <= frame_id < 240 else encode_varint(frame_id))
    return _HEAD.pack(5 + len(ids) + len(actions), _T_ACK, 1) + ids + actions


_SMALL_IDS = tuple(bytes((i,)) for i in range(240))


def encode_actions(actions: Iterable[Action]) -> bytes:
    """The ACK payload: the actions, encoded."""
    out = bytearray()
    for act in actions:
        t = type(act)
        if t is not SetVar and t is not UnsetVar:
            raise SpopError(_INVALID, f"not an action: {act!r}")
        try:
            out += (_SET_VAR if t is SetVar else _UNSET_VAR)[act.scope]
        except (KeyError, TypeError):
            raise SpopError(_INVALID, f"bad variable scope {act.scope!r}") from None
        out += encode_name(act.name)
        if t is SetVar:
            out += encode_typed(act.value)  # type: ignore[union-attr]
    return bytes(out)


_ENCODERS: dict[type, Callable[..., bytes]] = {
    Notify: lambda f: encode_notify(f.stream_id, f.frame_id, f.messages),
    Ack: lambda f: encode_ack(f.stream_id, f.frame_id, f.actions),
    HaproxyHello: lambda f: encode_haproxy_hello(
        f.supported_versions, f.max_frame_size, f.capabilities, f.healthcheck, f.engine_id),
    AgentHello: lambda f: encode_agent_hello(f.max_frame_size, f.capabilities, f.version, f.engine_id),
    HaproxyDisconnect: lambda f: encode_haproxy_disconnect(f.status, f.message),
    AgentDisconnect: lambda f: encode_agent_disconnect(f.status, f.message),
}


def encode_frame(frame: Frame) -> bytes:
    """Encode any frame dataclass (round trips and fuzzers)."""
    encoder = _ENCODERS.get(type(frame))
    if encoder is None:
        raise SpopError(_INVALID, f"not a frame: {frame!r}")
    return encoder(frame)


# ------------------------------------------------------------- decoding

_KNOWN_TYPES = frozenset(int(t) for t in FrameType)
_FIN = int(FrameFlags.FIN)
_ABORT = int(FrameFlags.ABORT)


def decode_frame_header(frame: Buffer) -> tuple[int, int, int, int, int]:
    """Parse and check the metadata; return (type, flags, stream_id, frame_id, payload_pos).

    INVALID for a short frame or an unknown type; FRAGMENTATION_UNSUPPORTED for
    anything that belongs to a fragmented payload.
    """
    if len(frame) < 7:
        raise SpopError(_INVALID, "frame shorter than its metadata")
    ftype = frame[0]
    flags = int.from_bytes(frame[1:5], "big")
    stream_id, pos = decode_varint(frame, 5)
    frame_id, pos = decode_varint(frame, pos)
    if ftype not in _KNOWN_TYPES:
        raise SpopError(_INVALID, f"unknown frame type {ftype}")
    if ftype == 0 or not flags & _FIN:
        raise SpopError(Status.FRAGMENTATION_UNSUPPORTED, "fragmented frame")
    if flags & _ABORT:
        raise SpopError(Status.FRAGMENTATION_UNSUPPORTED, "ABORT of a fragmented frame")
    return ftype, flags, stream_id, frame_id, pos


def decode_frame(frame: Buffer) -> Frame:
    """Decode one frame (the bytes after its 4-byte length prefix)."""
    if type(frame) is not bytes:
        # One copy: slices of bytes are bytes, which decode faster than views.
        if not isinstance(frame, (bytearray, memoryview)):
            raise SpopError(_INVALID, f"frame must be bytes, not {type(frame).__name__}")
        frame = bytes(frame)
    ftype, _flags, stream_id, frame_id, pos = decode_frame_header(frame)
    return decode_payload(ftype, stream_id, frame_id, frame, pos)


def decode_payload(ftype: int, stream_id: int, frame_id: int, frame: Buffer, pos: int) -> Frame:
    """Decode the payload of a frame whose header decode_frame_header accepted."""
    decoder = _DECODERS.get(ftype)
    if decoder is None:
        raise SpopError(_INVALID, f"no payload decoder for frame type {ftype}")
    return decoder(stream_id, frame_id, frame, pos)


def _decode_notify(stream_id: int, frame_id: int, buf: Buffer, pos: int) -> Notify:
    # The hot path (one NOTIFY per request, ~10 arguments each): the common
    # cases of decode_name/decode_typed are inlined, as calls cost more than
    # the work. Bounds are checked explicitly; IndexError means truncation.
    messages = []
    end = len(buf)
    try:
        while pos < end:
            n = buf[pos]
            if n < 240:
                pos += 1
            else:
                n, pos = decode_varint(buf, pos)
            q = pos + n
            if q >= end:
                raise SpopError(_INVALID, "truncated message")
            name = decode_text(buf[pos:q])
            nargs = buf[q]
            pos = q + 1
            args = []
            for _ in range(nargs):
                n = buf[pos]
                if n < 240:
                    pos += 1
                else:
                    n, pos = decode_varint(buf, pos)
                q = pos + n
                if q >= end:
                    raise SpopError(_INVALID, "truncated argument")
                try:
                    key = str(buf[pos:q], "utf-8")
                except UnicodeDecodeError:
                    key = decode_text(buf[pos:q])
                tag = buf[q] & 0x0F
                if tag == 8 or tag == 9:  # STRING, BINARY
                    pos = q + 1
                    n = buf[pos]
                    if n < 240:
                        pos += 1
                    else:
                        n, pos = decode_varint(buf, pos)
                    q = pos + n
                    if q > end:
                        raise SpopError(_INVALID, "truncated string")
                    if tag == 9:
                        value: object = bytes(buf[pos:q])
                    else:
                        try:
                            value = str(buf[pos:q], "utf-8")
                        except UnicodeDecodeError:
                            value = decode_text(buf[pos:q])
                    pos = q
                elif tag == 0:
                    value = None
                    pos = q + 1
                else:
                    value, pos = decode_typed(buf, q)
                args.append((key, value))
            messages.append(Message(name, tuple(args)))
    except IndexError:
        raise SpopError(_INVALID, "truncated NOTIFY") from None
    return Notify(stream_id, frame_id, tuple(messages))


def _decode_ack(stream_id: int, frame_id: int, buf: Buffer, pos: int) -> Ack:
    actions: list[Action] = []
    end = len(buf)
    while pos < end:
        if pos + 3 > end:
            raise SpopError(_INVALID, "truncated action")
        kind, nargs, scope = buf[pos], buf[pos + 1], buf[pos + 2]
        if scope > 4:
            raise SpopError(_INVALID, f"bad variable scope {scope}")
        name, pos = decode_name(buf, pos + 3)
        if kind == ActionType.SET_VAR and nargs == 3:
            value, pos = decode_typed(buf, pos)
            actions.append(SetVar(Scope(scope), name, value))
        elif kind == ActionType.UNSET_VAR and nargs == 2:
            actions.append(UnsetVar(Scope(scope), name))
        else:
            raise SpopError(_INVALID, f"bad action {kind} with {nargs} arguments")
    return Ack(stream_id, frame_id, tuple(actions))


_MISSING = object()


def _kv(stream_id: int, frame_id: int, buf: Buffer, pos: int) -> dict[str, object]:
    if stream_id or frame_id:
        raise SpopError(_INVALID, "HELLO/DISCONNECT frame with a stream-id or frame-id")
    return dict(decode_kv_list(buf, pos))  # the last of duplicate items wins


def _get(kv: dict[str, object], key: str, kind: type | tuple[type, ...], missing: Status) -> object:
    value = kv.get(key, _MISSING)
    if value is _MISSING:
        raise SpopError(missing, f'no "{key}" item')
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SpopError(_INVALID, f'"{key}" has the wrong type')
    return value


def _opt(kv: dict[str, object], key: str, kind: type, default: object) -> object:
    return _get(kv, key, kind, _INVALID) if key in kv else default


def _frame_size(kv: dict[str, object]) -> int:
    # Any integer type will do, as HAProxy accepts any.
    return int(_get(kv, "max-frame-size", int, Status.NO_FRAME_SIZE))  # type: ignore[call-overload]


def _split(value: object) -> tuple[str, ...]:
    # Comma-separated lists; spaces around items are ignored.
    return tuple(s for s in (p.strip() for p in str(value).split(",")) if s)


def _decode_haproxy_hello(stream_id: int, frame_id: int, buf: Buffer, pos: int) -> HaproxyHello:
    kv = _kv(stream_id, frame_id, buf, pos)
    return HaproxyHello(
        supported_versions=_split(_get(kv, "supported-versions", str, Status.NO_VERSION)),
        max_frame_size=_frame_size(kv),
        capabilities=frozenset(_split(_get(kv, "capabilities", str, Status.NO_CAPABILITIES))),
        healthcheck=bool(_opt(kv, "healthcheck", bool, False)),
        engine_id=_opt(kv, "engine-id", str, None),  # type: ignore[arg-type]
    )


def _decode_agent_hello(stream_id: int, frame_id: int, buf: Buffer, pos: int) -> AgentHello:
    kv = _kv(stream_id, frame_id, buf, pos)
    return AgentHello(
        version=_get(kv, "version", str, Status.NO_VERSION),  # type: ignore[arg-type]
        max_frame_size=_frame_size(kv),
        capabilities=frozenset(_split(_get(kv, "capabilities", str, Status.NO_CAPABILITIES))),
        engine_id=_opt(kv, "engine-id", str, None),  # type: ignore[arg-type]
    )


def _disconnect_fields(stream_id: int, frame_id: int, buf: Buffer, pos: int) -> tuple[int, str]:
    kv = _kv(stream_id, frame_id, buf, pos)
    status = int(_get(kv, "status-code", int, _INVALID))  # type: ignore[call-overload]
    # HAProxy itself ignores "message"; a missing one is tolerated.
    return status, _opt(kv, "message", str, "")  # type: ignore[return-value]


def _decode_haproxy_disconnect(stream_id: int, frame_id: int, buf: Buffer, pos: int) -> HaproxyDisconnect:
    return HaproxyDisconnect(*_disconnect_fields(stream_id, frame_id, buf, pos))


def _decode_agent_disconnect(stream_id: int, frame_id: int, buf: Buffer, pos: int) -> AgentDisconnect:
    return AgentDisconnect(*_disconnect_fields(stream_id, frame_id, buf, pos))


_DECODERS: dict[int, Callable[[int, int, Buffer, int], Frame]] = {
    FrameType.HAPROXY_HELLO: _decode_haproxy_hello,
    FrameType.HAPROXY_DISCONNECT: _decode_haproxy_disconnect,
    FrameType.NOTIFY: _decode_notify,
    FrameType.AGENT_HELLO: _decode_agent_hello,
    FrameType.AGENT_DISCONNECT: _decode_agent_disconnect,
    FrameType.ACK: _decode_ack,
}
