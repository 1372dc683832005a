"""A small HTTP load for fault tests and the failover measurement: clients
on keep-alive connections through HAProxy, recording every reply (status, the
WAF's action and failure flag from the debug headers, latency, start time)."""

from __future__ import annotations

import http.client
import threading
import time


class Load:
    """Clients sending benign GETs through HAProxy on keep-alive
    connections, each recording every reply: status, WAF action and flag."""

    def __init__(self, port: int, clients: int = 6, total: int | None = None, pause_s: float = 0.0) -> None:
        self.port = port
        self.total = total
        self.pause_s = pause_s  # between one client's requests: a steady load that leaves CPU to spare
        # (status, X-Waf-Action, X-Waf-Failed, X-Waf-Error, seconds, started at)
        self.results: list[tuple[int, str, str, str, float, float]] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sent = 0
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def wait(self, timeout: float = 120) -> None:
        for thread in self._threads:
            thread.join(timeout)

    def _take(self) -> bool:
        with self._lock:
            if self._stop.is_set() or (self.total is not None and self._sent >= self.total):
                return False
            self._sent += 1
            return True

    def _client(self) -> None:
        conn = None
        while self._take():
            started = time.perf_counter()
            started_at = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", "/load", headers={"User-Agent": "pool-test"})
                resp = conn.getresponse()
                resp.read()
                row = (resp.status, resp.headers.get("X-Waf-Action", ""), resp.headers.get("X-Waf-Failed", ""),
                       resp.headers.get("X-Waf-Error", ""), time.perf_counter() - started, started_at)
                with self._lock:
                    self.results.append(row)
                if resp.headers.get("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                with self._lock:
                    self.errors.append(repr(exc))
                if conn is not None:
                    conn.close()
                conn = None
            if self.pause_s:
                self._stop.wait(self.pause_s)

    def bad(self) -> list:
        """Replies without a real verdict: failed, flagged, or not a pass."""
        return [r for r in self.results if r[0] != 200 or r[1] != "pass" or r[2] == "1"]
