"""A response whose transaction is gone gets the miss policy at once
(issue 13): a replica SIGKILLed between requests and their responses under
load, and a transaction past its TTL. Real HAProxy (2.6 and 3.2), gateway,
wafsvc replicas and the demo backend; light rules keep the engine cheap.

What "at once" means here without timing anything: the gateway answered
the response (its res_* variables, res_miss=1 and the reason), so HAProxy
never reached its processing timeout; the figures are printed.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import threading
import time

import pytest

from stack import free_port
from tests.e2e.conftest import Scrape, http_request, start_stack, wait_for

RULES = ('SecRule REQUEST_HEADERS:x-attack "@streq 1" "id:1001,phase:1,deny,status:403,log,msg:\'attack\'"\n'
         'SecRule RESPONSE_BODY "@contains LEAKED" "id:1101,phase:4,deny,status:403,log,msg:\'leak\'"\n')
DELAY_MS = 400   # the backend answers this long after the request's verdict: transactions are held meanwhile


def _stack(tmp_path, haproxy_bin, replicas: int, gateway_env=None, wafsvc_env=None):
    rules = tmp_path / "rules.conf"
    rules.write_text(RULES)
    metrics = free_port()
    stack = start_stack(tmp_path / "logs", haproxy_bin, wafsvc_ports=[free_port() for _ in range(replicas)],
                        wafsvc_workers=1, wafsvc_env={"RULES": str(rules), **(wafsvc_env or {})},
                        gateway_env={"GATEWAY_METRICS": f"127.0.0.1:{metrics}", **(gateway_env or {})})
    stack.metrics = lambda: Scrape(metrics)
    return stack


def _events(stack, name: str) -> list[dict]:
    return [json.loads(line) for line in (stack.spec.log_dir / f"{name}.log").read_text(errors="replace").splitlines()
            if line.startswith("{")]


class Clients:
    """Keep-alive clients asking for a slow page; every reply is kept with
    the WAF's verdict headers, every failure to get one too."""

    def __init__(self, port: int, path: str, clients: int) -> None:
        self.port, self.path = port, path
        self.rows: list[dict] = []
        self.errors: list[str] = []
        self.sent = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> "Clients":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self) -> None:
        conn = None
        while not self._stop.is_set():
            started = time.monotonic()
            with self._lock:
                self.sent += 1
            try:
                conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                conn.request("GET", self.path, headers={"User-Agent": "miss-test"})
                reply = conn.getresponse()
                reply.read()
                h = reply.headers
                row = {"status": reply.status, "started": started, "seconds": time.monotonic() - started,
                       "id": h.get("X-Unique-ID"), "action": h.get("X-Waf-Action"), "failed": h.get("X-Waf-Failed"),
                       "res_action": h.get("X-Waf-Response-Action"), "res_miss": h.get("X-Waf-Response-Miss"),
                       "res_failed": h.get("X-Waf-Response-Failed"), "res_error": h.get("X-Waf-Response-Error")}
                with self._lock:
                    self.rows.append(row)
            except (OSError, http.client.HTTPException) as exc:
                with self._lock:
                    self.errors.append(repr(exc))
                if conn is not None:
                    conn.close()
                conn = None


def _spoe_ms(stack, unique_ids: set[str]) -> list[int]:
    """HAProxy's spoe_ms (the last SPOE exchange: the response's) per id."""
    out = []
    for line in (stack.spec.log_dir / "haproxy.log").read_text(errors="replace").splitlines():
        match = re.search(r" id=(\S+) .* spoe_ms=(-?\d+)", line)
        if match and match.group(1) in unique_ids:
            out.append(int(match.group(2)))
    return out


def test_a_replica_killed_between_requests_and_responses(stacks, tmp_path, haproxy_bin):
    stack = _stack(tmp_path, haproxy_bin, replicas=3)
    stacks.append(stack)
    wait_for(lambda: len({e["worker"] for e in _events(stack, "gateway")
                          if e.get("msg") == "wafsvc worker available"}) >= 3, 30, "all three replicas reached")
    before = stack.metrics()
    with Clients(stack.spec.frontend_port, f"/delay/{DELAY_MS}", clients=9) as load:
        time.sleep(2.0)
        killed_at = time.monotonic()
        stack.kill_wafsvc(0, signal.SIGKILL)
        time.sleep(3.0)
    rows = load.rows

    # Nothing lost, nothing hung: every request sent got its reply, and a
    # verdict for its request and an answer for its response.
    assert not load.errors, load.errors[:5]
    assert len(rows) == load.sent and len(rows) > 50
    assert all(r["status"] == 200 and r["action"] == "pass" and r["failed"] != "1" for r in rows), \
        [r for r in rows if r["status"] != 200 or r["action"] != "pass" or r["failed"] == "1"][:5]
    assert all(r["res_action"] == "pass" for r in rows), [r for r in rows if r["res_action"] != "pass"][:5]

    # The responses whose transactions died with the replica: the miss
    # policy (pass, flagged) answered them, with the gateway's reason.
    misses = [r for r in rows if r["res_miss"] == "1"]
    assert misses, "the kill hit no held transaction"
    assert all(r["res_failed"] == "1" and r["res_error"] in ("transaction no_route", "transaction unknown")
               for r in misses), misses[:5]
    # Only requests evaluated before the kill, answered after it, can miss.
    assert all(r["started"] < killed_at < r["started"] + r["seconds"] for r in misses), misses[:5]
    later = [r for r in rows if r["started"] > killed_at + 1.0]
    assert later and not [r for r in later if r["res_miss"]]

    # Every request and every response counted, once.
    samples = stack.metrics()

    def moved(name: str, **labels) -> float:
        return samples.total(name, **labels) - before.total(name, **labels)

    assert moved("modsec_gateway_evaluations_total", verdict="pass") == len(rows)
    assert moved("modsec_gateway_response_misses_total") == len(misses)
    assert moved("modsec_gateway_response_evaluations_total", verdict="pass") == len(rows) - len(misses)
    assert moved("modsec_gateway_response_evaluations_total", verdict="miss") == len(misses)
    assert (samples.total("modsec_gateway_pool_submitted_total")
            == samples.total("modsec_gateway_pool_answered_total"))
    spoe = _spoe_ms(stack, {r["id"] for r in misses})
    print(f"{len(rows)} requests, {len(misses)} responses missed after the kill "
          f"({sorted({r['res_error'] for r in misses})}); HAProxy waited {min(spoe)}-{max(spoe)} ms for those; "
          f"slowest reply {max(r['seconds'] for r in rows) * 1000:.0f} ms (backend delay {DELAY_MS} ms)")


@pytest.mark.parametrize("policy,status", [("pass", 200), ("block", 503)])
def test_a_transaction_past_its_ttl_gets_the_miss_policy(stacks, tmp_path, haproxy_bin, policy, status):
    stack = _stack(tmp_path, haproxy_bin, replicas=1, gateway_env={"GATEWAY_RESPONSE_MISS_POLICY": policy},
                   wafsvc_env={"WAF_TRANSACTION_TTL_MS": "300"})
    stacks.append(stack)
    reply = http_request(stack.spec.frontend_port, path="/delay/1500")
    assert reply.status == status, dict(reply.headers)
    assert reply.headers["X-Waf-Response-Miss"] == "1" and reply.headers["X-Waf-Response-Error"] == "transaction expired"
    fresh = http_request(stack.spec.frontend_port, path="/delay/10")  # inside the TTL: inspected
    assert fresh.status == 200 and fresh.headers["X-Waf-Response-Action"] == "pass"
    assert fresh.headers.get("X-Waf-Response-Miss") is None
    samples = stack.metrics()
    assert samples.total("modsec_gateway_response_misses_total", reason="expired", policy=policy) == 1
