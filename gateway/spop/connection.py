"""The agent side of one SPOP connection, as a state machine with no I/O.

Feed it what the socket read with ``receive_data`` (``b""`` at EOF), act on
the events it returns, and write out ``data_to_send()``. Protocol errors never
raise: the connection queues an AGENT-DISCONNECT carrying the status, reports
a ConnectionClosed event and ignores everything after. Once ``state`` is
CLOSED, the caller writes what is queued and closes the socket.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Union

from .errors import SpopError, Status
from .frames import (
    Action, FrameType, HaproxyHello, Notify, decode_frame_header, decode_payload,
    encode_ack_frame, encode_actions, encode_agent_disconnect, encode_agent_hello,
)
from .types import Buffer

__all__ = [
    "ConnectionState", "AgentConnection", "Event", "HelloReceived", "NotifyReceived",
    "DisconnectReceived", "ConnectionClosed",
]

SPOP_VERSION = "2.0"
MIN_FRAME_SIZE = 256  # SPOE.txt 3.2: peers must accept at least 256 bytes
_MAX_U32 = (1 << 32) - 1
_MAX_MESSAGE = 255  # HAProxy rejects a DISCONNECT message longer than this


class ConnectionState(Enum):
    AWAIT_HELLO = "AWAIT_HELLO"
    ESTABLISHED = "ESTABLISHED"
    CLOSED = "CLOSED"


@dataclass(frozen=True, slots=True)
class HelloReceived:
    hello: HaproxyHello


@dataclass(frozen=True, slots=True)
class NotifyReceived:
    """notify: a Notify, or what the connection's notify_decoder made of it."""
    notify: Notify


@dataclass(frozen=True, slots=True)
class DisconnectReceived:
    status: int
    message: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    status: Status
    message: str


Event = Union[HelloReceived, NotifyReceived, DisconnectReceived, ConnectionClosed]

_NOTIFY = int(FrameType.NOTIFY)
_AWAIT, _UP, _CLOSED = ConnectionState.AWAIT_HELLO, ConnectionState.ESTABLISHED, ConnectionState.CLOSED

# Every frame HAProxy may send, by state: the frame type -> the state after it.
# Anything missing from this table is INVALID. A health-check HELLO ends in
# CLOSED instead (see _on_hello). HAProxy may say DISCONNECT at any time.
_TRANSITIONS: dict[tuple[ConnectionState, int], ConnectionState] = {
    (_AWAIT, FrameType.HAPROXY_HELLO): _UP,
    (_AWAIT, FrameType.HAPROXY_DISCONNECT): _CLOSED,
    (_UP, FrameType.NOTIFY): _UP,
    (_UP, FrameType.HAPROXY_DISCONNECT): _CLOSED,
}

_VERSION_RE = re.compile(r"(\d+)\.(\d+)")


def _supports_v2(versions: Iterable[str]) -> bool:
    # "2.x" announces 2.0 .. 2.x, so any well-formed 2.x will do for us.
    for v in versions:
        m = _VERSION_RE.fullmatch(v)
        if m and int(m.group(1)) == 2:
            return True
    return False


def _short(message: str) -> str:
    raw = message.encode("utf-8", "surrogateescape")
    if len(raw) <= _MAX_MESSAGE:
        return message
    return raw[:_MAX_MESSAGE].decode("utf-8", "ignore")


class AgentConnection:
    """One agent-side SPOP connection. Not thread-safe; no I/O."""

    def __init__(
        self, max_frame_size: int = 16380, capabilities: Iterable[str] = ("pipelining",),
        engine_id: str | None = None,
        notify_decoder: Callable[[int, int, bytes, int], object] | None = None,
    ) -> None:
        """notify_decoder(stream_id, frame_id, frame, payload_pos) replaces
        the Notify a NOTIFY event carries: a caller that maps NOTIFYs
        straight into its own objects saves building Messages. It raises
        SpopError for a malformed payload, as decode_payload does."""
        if not MIN_FRAME_SIZE <= max_frame_size <= _MAX_U32:
            raise ValueError(f"max_frame_size must be within {MIN_FRAME_SIZE}..{_MAX_U32}")
        if isinstance(capabilities, str):  # "pipelining,async" as HAProxy writes it
            capabilities = capabilities.split(",")
        caps = tuple(dict.fromkeys(c.strip() for c in capabilities if c.strip()))
        if "fragmentation" in caps:  # we would have to reassemble fragments
            raise ValueError("receiving fragmented frames is not supported")
        self._our_max = max_frame_size
        self._caps = caps
        self._engine_id = engine_id
        self._decode_notify = notify_decoder
        self._state = _AWAIT
        self._max = max_frame_size  # what we accept now; the negotiated value later
        self._healthcheck = False
        self._buf = bytearray()  # at most one partial frame, length prefix included
        self._out: list[bytes] = []

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def max_frame_size(self) -> int:
        """The negotiated size (ours until the HELLO): a frame, without its length prefix."""
        return self._max

    @property
    def receiving_frame(self) -> bool:
        """True while part of a frame is buffered: callers time how long it takes."""
        return bool(self._buf)

    @property
    def healthcheck(self) -> bool:
        return self._healthcheck

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def send_ack(self, stream_id: int, frame_id: int, actions: Iterable[Action] = ()) -> None:
        """Queue the ACK of a NOTIFY; TOO_BIG if it exceeds the negotiated size."""
        if self._state is not _UP:
            if self._state is _CLOSED:
                return  # the peer is gone or going: nobody waits for this ACK
            raise SpopError(Status.INVALID, "ACK before the HELLO handshake")
        self.send_encoded_ack(stream_id, frame_id, encode_actions(actions))

    def send_encoded_ack(self, stream_id: int, frame_id: int, actions: bytes) -> None:
        """send_ack with the actions encoded already (encode_actions)."""
        if self._state is not _UP:
            if self._state is _CLOSED:
                return
            raise SpopError(Status.INVALID, "ACK before the HELLO handshake")
        frame = encode_ack_frame(stream_id, frame_id, actions)
        if len(frame) - 4 > self._max:
            raise SpopError(Status.TOO_BIG, f"ACK of {len(frame) - 4} bytes > {self._max}")
        self._out.append(frame)

    def disconnect(self, status: int = Status.NORMAL, message: str = "") -> None:
        """Queue an AGENT-DISCONNECT and close (agent-initiated shutdown)."""
        if self._state is not _CLOSED:
            self._close(status, message)

    def receive_data(self, data: Buffer) -> list[Event]:
        """Consume bytes from HAProxy; ``b""`` means EOF. Returns the events."""
        if self._state is _CLOSED:
            return []
        if not data:
            return self._eof()
        if type(data) is not bytes:
            data = bytes(data)
        events: list[Event] = []
        try:
            self._receive(data, events)
        except SpopError as exc:
            self._buf = bytearray()
            self._close(exc.status, exc.message)
            events.append(ConnectionClosed(exc.status, exc.message))
        return events

    # ------------------------------------------------------------ internals

    def _receive(self, data: bytes, events: list[Event]) -> None:
        # Each frame is copied once, out of ``data`` or the partial-frame
        # buffer, into its own bytes: slices of bytes decode faster than views.
        off, n = 0, len(data)
        buf = self._buf
        if buf:  # finish the partial frame first, taking only what it lacks
            if len(buf) < 4:
                off = min(4 - len(buf), n)
                buf += data[:off]
                if len(buf) < 4:
                    return
                self._check_length(int.from_bytes(buf[:4], "big"))
            need = 4 + int.from_bytes(buf[:4], "big") - len(buf)
            take = min(need, n - off)
            buf += data[off:off + take]
            off += take
            if take < need:
                return
            self._buf = bytearray()
            self._frame(bytes(buf[4:]), events)
        while self._state is not _CLOSED and n - off >= 4:
            length = int.from_bytes(data[off:off + 4], "big")
            self._check_length(length)
            if off + 4 + length > n:
                break
            self._frame(data[off + 4:off + 4 + length], events)
            off += 4 + length
        if off < n and self._state is not _CLOSED:
            self._buf = bytearray(data[off:])  # < 4 bytes, or a checked header and part of its body

    def _check_length(self, length: int) -> None:
        # Checked before buffering a byte of the body, so the buffer stays bounded.
        if length > self._max:
            raise SpopError(Status.TOO_BIG, f"frame of {length} bytes > {self._max}")
        if length < 7:
            raise SpopError(Status.INVALID, f"frame of {length} bytes is too short")

    def _frame(self, frame: bytes, events: list[Event]) -> None:
        ftype, _flags, stream_id, frame_id, pos = decode_frame_header(frame)
        new_state = _TRANSITIONS.get((self._state, ftype))
        if new_state is None:
            name = FrameType(ftype).name
            raise SpopError(Status.INVALID, f"unexpected {name} frame in state {self._state.name}")
        if ftype == _NOTIFY:
            decode = self._decode_notify
            events.append(NotifyReceived(decode(stream_id, frame_id, frame, pos) if decode is not None
                                         else decode_payload(ftype, stream_id, frame_id, frame, pos)))
            self._state = new_state
            return
        decoded = decode_payload(ftype, stream_id, frame_id, frame, pos)
        if ftype == FrameType.HAPROXY_HELLO:
            self._on_hello(decoded)  # type: ignore[arg-type]
            events.append(HelloReceived(decoded))  # type: ignore[arg-type]
            if self._healthcheck:
                new_state = _CLOSED  # HAProxy closes after the reply
        else:  # HAPROXY-DISCONNECT: say goodbye back
            events.append(DisconnectReceived(decoded.status, decoded.message))  # type: ignore[union-attr]
            self._out.append(encode_agent_disconnect(Status.NORMAL, "normal"))
        self._state = new_state

    def _on_hello(self, hello: HaproxyHello) -> None:
        if not _supports_v2(hello.supported_versions):
            raise SpopError(Status.BAD_VERSION, "no SPOP 2.x in supported-versions")
        if hello.max_frame_size < MIN_FRAME_SIZE:
            raise SpopError(Status.BAD_FRAME_SIZE,
                            f"max-frame-size {hello.max_frame_size} < {MIN_FRAME_SIZE}")
        self._max = min(self._our_max, hello.max_frame_size)
        self._healthcheck = hello.healthcheck
        caps = [c for c in self._caps if c in hello.capabilities]
        self._out.append(encode_agent_hello(self._max, caps, SPOP_VERSION, self._engine_id))

    def _eof(self) -> list[Event]:
        # Nothing is queued: the peer has gone and cannot read a DISCONNECT.
        if self._buf:
            status, message = Status.IO, "connection closed in the middle of a frame"
        else:
            status, message = Status.NORMAL, "connection closed by peer"
        self._buf = bytearray()
        self._state = _CLOSED
        return [ConnectionClosed(status, message)]

    def _close(self, status: int, message: str) -> None:
        self._out.append(encode_agent_disconnect(status, _short(message)))
        self._state = _CLOSED
