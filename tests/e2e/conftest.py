"""End-to-end fixtures: real HAProxy, gateway, wafsvc and backend processes.

Every test module that needs a stack runs once per HAProxy binary: the
distribution's (2.6 on Debian 12, 3.0 on Debian 13) and 3.2 with the new
SPOP mux, unpacked by scripts/fetch-haproxy32.sh. CI sets
REQUIRE_HAPROXY32=1 so that a missing 3.2 fails rather than skips.
"""

from __future__ import annotations

import http.client
import os
import pathlib
import shutil
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stack import Stack, StackSpec

ROOT = pathlib.Path(__file__).resolve().parents[2]
HAPROXY32 = ROOT / ".tools" / "haproxy32" / "haproxy"


def haproxy_version(binary: str) -> str:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=True).stdout
    return out.split()[2]


def _haproxy_binaries() -> list:
    params = []
    system = shutil.which("haproxy")
    if system:
        params.append(pytest.param(system, id=f"haproxy-{haproxy_version(system)[:3]}"))
    if HAPROXY32.exists():
        params.append(pytest.param(str(HAPROXY32), id="haproxy-3.2"))
    elif os.environ.get("REQUIRE_HAPROXY32"):
        params.append(pytest.param(str(HAPROXY32), id="haproxy-3.2",
                                   marks=pytest.mark.xfail(reason="HAProxy 3.2 missing", strict=True, run=False)))
    return params


HAPROXY_BINARIES = _haproxy_binaries()


@pytest.fixture(scope="module", params=HAPROXY_BINARIES)
def haproxy_bin(request) -> str:
    if not pathlib.Path(request.param).exists():
        pytest.fail(f"{request.param} is missing: run scripts/fetch-haproxy32.sh")
    return request.param


@pytest.fixture(scope="module")
def stack_logs(tmp_path_factory, request) -> pathlib.Path:
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


def start_stack(log_dir: pathlib.Path, haproxy_bin: str, **overrides) -> Stack:
    """A stack with debug headers on, so tests can see which rules matched."""
    haproxy_env = {"WAF_DEBUG_HEADERS": "1", **overrides.pop("haproxy_env", {})}
    spec = StackSpec(log_dir=log_dir, haproxy_bin=haproxy_bin, haproxy_env=haproxy_env, **overrides)
    try:
        return Stack(spec).start()
    except Exception:
        for log in sorted(log_dir.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        raise


def wait_for(predicate, timeout: float = 5.0, what: str = "condition", interval: float = 0.05):
    """Polls until predicate() is truthy and returns that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def rules(self) -> list[int]:
        return [int(x) for x in (self.headers.get("X-Waf-Rules") or "").split()]

    @property
    def failed(self) -> bool:
        return self.headers.get("X-Waf-Failed") == "1"


def http_request(port: int, method: str = "GET", path: str = "/", headers=(), body: bytes | None = None,
                 timeout: float = 10, chunk_size: int = 0) -> Reply:
    """Sends exactly the given headers (plus Host), raw bytes allowed; the
    body with Content-Length, or chunked in pieces of chunk_size bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        has_host = any(name.lower() == "host" for name, _ in headers)
        conn.putrequest(method, path, skip_host=has_host, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None and chunk_size:
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            for at in range(0, len(body), chunk_size):
                piece = body[at:at + chunk_size]
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.send(b"0\r\n\r\n")
        else:
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


@pytest.fixture
def stacks():
    """Stacks a test starts itself (append them): stopped when it ends."""
    started = []
    yield started
    for stack in started:
        stack.stop()


class Scrape:
    """One read of a /metrics endpoint."""

    def __init__(self, port: int) -> None:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def total(self, name: str, **labels) -> float:
        """Sum of every sample of `name` whose labels include `labels`."""
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def labels(self, name: str, label: str) -> set[str]:
        return {s.labels[label] for s in self.samples if s.name == name}
