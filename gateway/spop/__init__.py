"""A sans-IO codec for SPOP v2, the protocol between HAProxy's SPOE and agents.

Nothing here does I/O or imports asyncio: ``AgentConnection`` turns bytes into
events and queues the bytes to answer with. See SPOE.txt section 3.
"""

from .connection import (
    AgentConnection, ConnectionClosed, ConnectionState, DisconnectReceived, Event,
    HelloReceived, NotifyReceived,
)
from .errors import SpopError, Status
from .frames import (
    Ack, Action, ActionType, AgentDisconnect, AgentHello, Frame, FrameFlags, FrameType,
    HaproxyDisconnect, HaproxyHello, Message, Notify, Scope, SetVar, UnsetVar,
    decode_frame, decode_frame_header, decode_payload, encode_ack, encode_ack_frame, encode_actions,
    encode_agent_disconnect,
    encode_agent_hello, encode_frame, encode_haproxy_disconnect, encode_haproxy_hello,
    encode_notify,
)
from .types import (
    DataType, Int32, Int64, UInt32, UInt64, decode_kv_list, decode_name, decode_typed,
    decode_varint, encode_hdrs_bin, encode_kv_list, encode_name, encode_typed,
    encode_varint, parse_hdrs_bin,
)

__all__ = [
    # errors
    "Status", "SpopError",
    # typed data
    "DataType", "Int32", "UInt32", "Int64", "UInt64", "encode_varint", "decode_varint",
    "encode_typed", "decode_typed", "encode_name", "decode_name", "encode_kv_list",
    "decode_kv_list", "parse_hdrs_bin", "encode_hdrs_bin",
    # frames
    "FrameType", "FrameFlags", "Scope", "ActionType", "Message", "SetVar", "UnsetVar",
    "Action", "HaproxyHello", "HaproxyDisconnect", "Notify", "AgentHello",
    "AgentDisconnect", "Ack", "Frame", "decode_frame", "decode_frame_header",
    "decode_payload", "encode_frame", "encode_haproxy_hello", "encode_haproxy_disconnect",
    "encode_notify", "encode_agent_hello", "encode_agent_disconnect", "encode_ack",
    "encode_ack_frame", "encode_actions",
    # connection
    "AgentConnection", "ConnectionState", "Event", "HelloReceived", "NotifyReceived",
    "DisconnectReceived", "ConnectionClosed",
]
