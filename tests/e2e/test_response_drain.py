"""A replica drained (SIGTERM: a rolling update, a scale-down) under load
with response inspection loses no response (issue 13): the worker stops
taking requests, the gateway sends them to the other replica, and every
response of a transaction the draining worker holds is still inspected
there, a leak included, before its streams end. Real HAProxy (2.6 and 3.2),
gateway, two wafsvc replicas and the demo backend, behind a forwarder that
delays chosen pages (the responses come while the replica drains).

The drain's length is printed, not asserted: it is about the slowest
response in flight, not the transaction TTL (35 s) nor the grace (10 s).
"""

from __future__ import annotations

import http.client
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from stack import free_port
from tests.e2e.conftest import Scrape, start_stack, wait_for
from tests.e2e.test_response_misses import Clients, _events

RULES = ('SecRule REQUEST_HEADERS:x-attack "@streq 1" "id:1001,phase:1,deny,status:403,log,msg:\'attack\'"\n'
         'SecRule RESPONSE_BODY "@contains error in your SQL syntax" '
         '"id:1102,phase:4,deny,status:403,log,msg:\'SQL error leaked\'"\n')
PAGE_MS, LEAK_MS = 400, 700   # how long the backend takes: transactions are held meanwhile


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass   # HAProxy closing an idle keep-alive connection: not news


class SlowForwarder:
    """/slow/<ms>/<path>: the backend's /<path>, <ms> later; anything else
    passes straight through."""

    def __init__(self, backend_port: int) -> None:
        backend = backend_port

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                path = self.path
                if path.startswith("/slow/"):
                    _, _, ms, rest = path.split("/", 3)
                    time.sleep(int(ms) / 1000)
                    path = "/" + rest
                conn = http.client.HTTPConnection("127.0.0.1", backend, timeout=30)
                conn.request("GET", path)
                reply = conn.getresponse()
                body = reply.read()
                conn.close()
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.headers.get("Content-Type", "text/plain"))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.port = free_port()
        self.server = _Quiet(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_replica_drained_under_load_inspects_every_response_it_holds(stacks, tmp_path, haproxy_bin):
    rules = tmp_path / "rules.conf"
    rules.write_text(RULES)
    metrics, backend_port = free_port(), free_port()
    forwarder = SlowForwarder(backend_port)
    try:
        stack = start_stack(tmp_path / "logs", haproxy_bin, wafsvc_ports=[free_port(), free_port()],
                            wafsvc_workers=1, backend_port=backend_port,
                            wafsvc_env={"RULES": str(rules)},
                            haproxy_env={"BACKEND_ADDR": f"127.0.0.1:{forwarder.port}"},
                            gateway_env={"GATEWAY_METRICS": f"127.0.0.1:{metrics}"})
        stacks.append(stack)
        wait_for(lambda: len({e["worker"] for e in _events(stack, "gateway")
                              if e.get("msg") == "wafsvc worker available"}) >= 2, 30, "both replicas reached")
        before = Scrape(metrics)
        with Clients(stack.spec.frontend_port, f"/slow/{PAGE_MS}/", clients=6) as pages, \
                Clients(stack.spec.frontend_port, f"/slow/{LEAK_MS}/leaks/sql-error", clients=8) as leaks:
            time.sleep(2.0)
            sigterm_at = time.monotonic()
            status = stack.kill_wafsvc(0, signal.SIGTERM)   # returns once the replica has exited
            drained_s = time.monotonic() - sigterm_at
            time.sleep(1.5)
        after = Scrape(metrics)
    finally:
        forwarder.close()

    # No request failed, every response was inspected: no miss, no failure.
    assert status == 0
    for load in (pages, leaks):
        assert not load.errors, load.errors[:5]
        assert len(load.rows) == load.sent
    assert len(pages.rows) > 30 and len(leaks.rows) > 30
    for load, status, res_action in ((pages, 200, "pass"), (leaks, 403, "deny")):
        wrong = [r for r in load.rows if (r["status"], r["action"], r["res_action"], r["res_miss"])
                 != (status, "pass", res_action, None)]
        assert not wrong, (len(wrong), wrong[:5])

    def moved(name: str, **labels) -> float:
        return after.total(name, **labels) - before.total(name, **labels)

    assert moved("modsec_gateway_response_misses_total") == 0
    assert moved("modsec_gateway_pool_responses_unreachable_total") == 0
    assert after.total("modsec_gateway_pool_submitted_total") == after.total("modsec_gateway_pool_answered_total")

    # The drained worker held transactions when SIGTERM came, answered every
    # one (none left at exit), and among them were leaks started before the
    # drain, blocked by it after.
    drained = _events(stack, "wafsvc1")
    stopped = [e for e in drained if e.get("msg") == "worker stopped"]
    assert len(stopped) == 1 and stopped[0]["held_at_drain"] > 0 and stopped[0]["held_at_exit"] == 0, stopped
    # A draining worker takes no new request: what it blocks after the drain
    # began had its request evaluated before (the log's clock is the host's).
    drain_began = next(e["ts"] for e in drained if e.get("msg") == "stopping: draining workers")
    late_blocks = [e for e in drained if e.get("msg") == "response blocked" and e["ts"] > drain_began]
    assert late_blocks, "no leak in flight on the drained replica"
    spanning = [r for r in leaks.rows if r["started"] < sigterm_at < r["started"] + r["seconds"]]
    # The gateway stopped sending it requests as soon as it said it drains.
    assert any(e.get("msg") == "wafsvc worker draining: responses only" for e in _events(stack, "gateway"))
    last = stopped[0]
    print(f"drained with {last['held_at_drain']} held transactions in {last['drain_seconds'] * 1000:.0f} ms "
          f"(worker), replica exited {drained_s * 1000:.0f} ms after SIGTERM; slowest response in flight "
          f"{LEAK_MS} ms; {len(pages.rows)} pages and {len(leaks.rows)} leaks, every response inspected, "
          f"{len(spanning)} leaks spanning the drain all blocked, {len(late_blocks)} of them by the drained replica")
