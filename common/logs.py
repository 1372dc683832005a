"""Structured logs: one JSON object per line on stderr.

Extra fields passed as `log.info("...", extra={"unique_id": ...})` become
keys of the event, so a request can be followed by HAProxy's unique-id.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service
        self._second = -1
        self._stamp = ""
        # One encoder, built once: json.dumps(**kwargs) builds one per call.
        self._encode = json.JSONEncoder(default=str, ensure_ascii=False).encode

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:   # strftime once per second, not per line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event = {
            "ts": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "pid": record.process,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key[0] != "_":
                # The base fields stay trustworthy: an extra called "pid"
                # (say, of a dead worker) lands beside them, not over them.
                event["extra_" + key if key in event else key] = value
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return self._encode(event)


def setup(level: str, service: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
