"""SPOP disconnect status codes and the one exception type the codec raises.

The codes are the wire values of the "status-code" item of a DISCONNECT frame
(SPOE.txt section 3.5). Every decode failure maps onto one of them, so a
connection can always answer a bad peer with an AGENT-DISCONNECT that says why.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["Status", "SpopError"]


class Status(IntEnum):
    NORMAL = 0
    IO = 1
    TIMEOUT = 2
    TOO_BIG = 3
    INVALID = 4
    NO_VERSION = 5
    NO_FRAME_SIZE = 6
    NO_CAPABILITIES = 7
    BAD_VERSION = 8
    BAD_FRAME_SIZE = 9
    FRAGMENTATION_UNSUPPORTED = 10
    INTERLACED = 11
    FRAME_ID_NOT_FOUND = 12
    RESOURCE_ALLOCATION = 13
    UNKNOWN = 99


class SpopError(Exception):
    """A protocol (or value) error, carrying the status to report to the peer.

    Any other exception type escaping gateway.spop, whatever the input, is a bug.
    """

    __slots__ = ("status", "message")

    def __init__(self, status: Status, message: str = "") -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        name = self.status.name if isinstance(self.status, Status) else str(self.status)
        return f"{name}: {self.message}" if self.message else name
