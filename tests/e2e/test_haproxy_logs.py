"""The shipped haproxy.cfg and SPOE file log one line per request, on every
HAProxy version, and SPOE adds a line only when an exchange failed."""

from __future__ import annotations

import urllib.error
import uuid
import urllib.request

import pytest

from tests.e2e.conftest import start_stack, wait_for

REQUESTS = 5


@pytest.fixture(scope="module")
def stack(haproxy_bin, stack_logs):
    s = start_stack(stack_logs, haproxy_bin, wafsvc_env={"RULES": "deploy/rules/site.conf"})
    s.logs = stack_logs
    yield s
    s.stop()


def log_lines(stack) -> list[str]:
    return (stack.logs / "haproxy.log").read_text(errors="replace").splitlines()


def get(stack, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{stack.spec.frontend_port}{path}", timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_one_log_line_per_request(stack):
    run = uuid.uuid4().hex  # both HAProxy versions' runs share the log file
    paths = [f"/?logged={run}-{n}" for n in range(REQUESTS)]
    assert [get(stack, path) for path in paths] == [200] * REQUESTS
    wait_for(lambda: all(any(f'"GET {p} ' in line for line in log_lines(stack)) for p in paths),
             what="every request logged")
    for path in paths:
        assert sum(f'"GET {path} ' in line for line in log_lines(stack)) == 1
    assert not [line for line in log_lines(stack) if line.startswith("SPOE:") and " st=0 " in line]


def test_a_failed_exchange_is_logged_by_spoe_too(stack):
    gateway = stack.proc("gateway")
    gateway.kill()
    gateway.wait()
    assert get(stack, "/?agent=down") == 503
    wait_for(lambda: any(line.startswith("SPOE:") and " st=1 " in line for line in log_lines(stack)),
             what="SPOE's own line for the failed exchange")
