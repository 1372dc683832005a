"""Log text for one request through the stack, found by its own id.

go-ftw's match_regex reads the WAF's log. Through the stack, the request's
HAProxy unique-id (echoed by the backend in X-Unique-ID) is also its
transaction id in wafsvc's JSON audit log (WAF_AUDIT_LOG), so each test
reads exactly its own entry. wafsvc writes the entry before it answers, so
it is in the file by the time the response arrives; the short wait only
covers the write reaching the file. RelevantOnly writes no entry when no
logging rule matched: then the request has no log text.
"""

from __future__ import annotations

import json
import pathlib
import threading
import time


def render_messages(messages) -> str:
    """ModSecurity's error-log shape, `[id "…"] [msg "…"] [data "…"]`, one
    line per match; data goes through toHexIfNeeded as ModSecurity does."""
    return "\n".join(f'[id "{rule_id}"] [msg "{msg}"] [data "{hex_if_needed(data)}"] [severity "{sev}"]'
                     for rule_id, msg, data, sev in messages)


def hex_if_needed(text: str) -> str:
    raw = text.encode("utf-8", "surrogateescape")
    return "".join(chr(b) if 32 <= b < 127 else f"\\x{b:02x}" for b in raw)


class AuditLog:
    """Reads the audit log as it grows; thread-safe."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = pathlib.Path(path)
        self._lock = threading.Lock()
        self._offset = 0
        self._partial = b""
        self._entries: dict[str, list[tuple]] = {}

    def _read_more(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            return
        self._offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if not line.strip():
                continue
            tx = json.loads(line).get("transaction", {})
            self._entries[tx.get("unique_id", "")] = [
                (m.get("details", {}).get("ruleId", ""), m.get("message", ""), m.get("details", {}).get("data", ""),
                 m.get("details", {}).get("severity", "")) for m in tx.get("messages") or []]

    def text_for(self, unique_id: str, timeout: float = 2.0) -> str | None:
        """The entry's rendered messages; None when it never appears."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if unique_id not in self._entries:
                    self._read_more()
                if unique_id in self._entries:
                    return render_messages(self._entries[unique_id])
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)
