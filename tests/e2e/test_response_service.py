"""Response inspection over real gRPC sockets, against real wafsvc
processes: EvaluateResponse, `response` items on EvaluateStream, every miss
answered at once with its reason, a response on the wrong worker, and
200,000 kept transactions whose responses never come."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from stack import free_port
from stack.processes import ROOT, wait_for_health
from tests.e2e.test_observability import Scrape
from tests.unit.test_response_inspection import crs_dir
from wafapi import waf_pb2, waf_pb2_grpc
from wafsvc.metrics import FLUSH_S

H = waf_pb2.Header
BROWSER = [H(name=b"host", value=b"shop.example.com"), H(name=b"user-agent", value=b"Mozilla/5.0"),
           H(name=b"accept", value=b"text/html")]
HTML = [H(name=b"content-type", value=b"text/html")]
SQL_LEAK = b"<html>SQL Error: ORA-00933: SQL command not properly ended</html>"
REASON = "x-waf-error-reason"


class Wafsvc:
    def __init__(self, tmp_path, **env) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.log_path = tmp_path / "wafsvc.log"
        self.log = open(self.log_path, "wb")
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "WAF_LISTEN": f"127.0.0.1:{self.port}",
                    "WAF_UNKNOWN_APPLICATION": "refuse",
                    "WAF_METRICS": f"127.0.0.1:{self.metrics_port}", "LOG_LEVEL": "warning", **env}
        self.proc = subprocess.Popen([sys.executable, "-m", "wafsvc"], env=full_env, cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_health(self.port, self.proc, "wafsvc")
        except Exception:
            self.stop()
            raise

    def channel(self) -> grpc.Channel:
        # Its own subchannel pool: a new TCP connection, which SO_REUSEPORT
        # hands to any worker.
        return grpc.insecure_channel(f"127.0.0.1:{self.port}", options=[("grpc.use_local_subchannel_pool", 1)])

    def settled(self, timeout: float = 10.0) -> Scrape:
        deadline = time.monotonic() + timeout
        last = Scrape(self.metrics_port)
        while time.monotonic() < deadline:
            time.sleep(FLUSH_S * 2 + 1.0)   # tallies are written every FLUSH_S, gauges every second
            now = Scrape(self.metrics_port)
            if now.samples == last.samples:
                return now
            last = now
        raise AssertionError("wafsvc metrics never settled")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def crs_waf(tmp_path_factory):
    """CRS, two workers, a short TTL and a small cap, so misses are quick to provoke."""
    waf = Wafsvc(tmp_path_factory.mktemp("crs"), CRS_DIR=crs_dir(), WAF_WORKERS="2",
                 WAF_TRANSACTION_TTL_MS="3000", WAF_MAX_HELD_TRANSACTIONS="5")
    yield waf
    waf.stop()


@pytest.fixture(scope="module")
def light_waf(tmp_path_factory):
    """One worker with a one-rule set: fast enough for 200,000 transactions."""
    waf = Wafsvc(tmp_path_factory.mktemp("light"), RULES=str(ROOT / "rules" / "block-localhost.conf"),
                 WAF_WORKERS="1", WAF_MAX_HELD_TRANSACTIONS="2000")
    yield waf
    waf.stop()


def request(**kw) -> waf_pb2.EvaluateRequest:
    return waf_pb2.EvaluateRequest(transaction_id=kw.pop("transaction_id", "t"), client_ip="10.1.2.3",
                                   method="GET", uri=kw.pop("uri", b"/"), headers=BROWSER,
                                   inspect_response=kw.pop("inspect_response", True), **kw)


def response(handle: str, body: bytes = b"<html>fine</html>", status: int = 200, **kw) -> waf_pb2.ResponseRequest:
    return waf_pb2.ResponseRequest(transaction_handle=handle, status=status, headers=HTML, body=body, **kw)


def unary_error(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), dict(info.value.trailing_metadata() or ()).get(REASON, "")


def worker_of(handle: str) -> str:
    return handle.rpartition("#")[0]


# -- the unary calls -------------------------------------------------------------

def test_evaluate_response_on_the_same_connection_blocks_a_leak(crs_waf):
    with crs_waf.channel() as channel:
        stub = waf_pb2_grpc.WafStub(channel)
        kept = stub.Evaluate(request(transaction_id="leak-1"), timeout=10)
        assert kept.action == waf_pb2.ACTION_PASS and kept.transaction_ttl_ms == 3000
        verdict = stub.EvaluateResponse(response(kept.transaction_handle, SQL_LEAK, transaction_id="leak-1"),
                                        timeout=10)
    assert verdict.intervention and verdict.status == 403 and verdict.transaction_id == "leak-1"
    assert {951120, 959100} <= {m.id for m in verdict.matches}


def test_misses_are_answered_at_once_with_their_reason(crs_waf):
    with crs_waf.channel() as channel:
        stub = waf_pb2_grpc.WafStub(channel)
        used = stub.Evaluate(request(), timeout=10).transaction_handle
        stub.EvaluateResponse(response(used), timeout=10)
        assert unary_error(lambda: stub.EvaluateResponse(response(used), timeout=10)) == \
            (grpc.StatusCode.NOT_FOUND, "TRANSACTION_UNKNOWN")
        handles = [stub.Evaluate(request(), timeout=10).transaction_handle for _ in range(6)]   # cap: 5
        assert unary_error(lambda: stub.EvaluateResponse(response(handles[0]), timeout=10)) == \
            (grpc.StatusCode.NOT_FOUND, "TRANSACTION_EVICTED")
        expiring = stub.Evaluate(request(), timeout=10).transaction_handle
        time.sleep(3.2)                     # past the TTL (3 s), not a timing assertion
        assert unary_error(lambda: stub.EvaluateResponse(response(expiring), timeout=10)) == \
            (grpc.StatusCode.NOT_FOUND, "TRANSACTION_EXPIRED")
        foreign = "elsewhere/1/2#00.1"
        assert unary_error(lambda: stub.EvaluateResponse(response(foreign), timeout=10)) == \
            (grpc.StatusCode.NOT_FOUND, "TRANSACTION_OTHER_WORKER")
        assert unary_error(lambda: stub.EvaluateResponse(response("no-handle"), timeout=10)) == \
            (grpc.StatusCode.INVALID_ARGUMENT, "FIELD_INVALID")
        assert unary_error(lambda: stub.Evaluate(request(application="nope"), timeout=10)) == \
            (grpc.StatusCode.NOT_FOUND, "UNKNOWN_APPLICATION")


def test_a_response_on_the_wrong_worker_is_told_so(crs_waf):
    channels = [crs_waf.channel() for _ in range(12)]
    try:
        by_worker = {}
        for channel in channels:
            stub = waf_pb2_grpc.WafStub(channel)
            handle = stub.Evaluate(request(), timeout=10).transaction_handle
            by_worker.setdefault(worker_of(handle), (stub, handle))
            if len(by_worker) == 2:
                break
        assert len(by_worker) == 2, "12 connections all reached one worker"
        (stub_a, handle_a), (stub_b, handle_b) = by_worker.values()
        assert unary_error(lambda: stub_b.EvaluateResponse(response(handle_a), timeout=10)) == \
            (grpc.StatusCode.NOT_FOUND, "TRANSACTION_OTHER_WORKER")
        # The miss did not consume it: the right worker still has it.
        assert stub_a.EvaluateResponse(response(handle_a), timeout=10).action == waf_pb2.ACTION_PASS
        assert stub_b.EvaluateResponse(response(handle_b), timeout=10).action == waf_pb2.ACTION_PASS
    finally:
        for channel in channels:
            channel.close()


# -- the stream --------------------------------------------------------------------

def test_stream_carries_responses_and_answers_misses_per_item(light_waf):
    def batch(*items):
        out = waf_pb2.EvaluateBatch()
        for ref, item in items:
            if isinstance(item, waf_pb2.EvaluateRequest):
                out.requests.add(ref=ref, request=item)
            elif isinstance(item, waf_pb2.ResponseRequest):
                out.requests.add(ref=ref, response=item)
            else:
                out.requests.add(ref=ref)
        return out

    import queue
    outbox: queue.Queue = queue.Queue()
    with light_waf.channel() as channel:
        call = waf_pb2_grpc.WafStub(channel).EvaluateStream(iter(outbox.get, None), timeout=30)
        outbox.put(batch((1, request()), (2, request()), (3, request(inspect_response=False))))
        first = {v.ref: v for b in [next(call)] for v in b.verdicts}
        worker = dict(call.initial_metadata())["x-waf-worker"]
        assert [worker_of(first[r].verdict.transaction_handle) for r in (1, 2)] == [worker, worker]
        assert not first[3].verdict.transaction_handle
        bodiless = waf_pb2.ResponseRequest(transaction_handle=first[1].verdict.transaction_handle, status=200)
        outbox.put(batch((4, bodiless), (5, response(first[1].verdict.transaction_handle)),
                         (6, response(first[2].verdict.transaction_handle, status=0)),
                         (7, response("elsewhere/9/9#00.1")), (8, None), (9, request(application="nope"))))
        answers = {}
        while len(answers) < 6:
            answers.update({v.ref: v for v in next(call).verdicts})
        outbox.put(None)
    assert answers[4].WhichOneof("result") == "verdict" and answers[4].verdict.action == waf_pb2.ACTION_PASS
    assert (answers[5].error.code, answers[5].error.reason) == ("NOT_FOUND", waf_pb2.TRANSACTION_UNKNOWN)
    assert (answers[6].error.code, answers[6].error.reason) == ("INVALID_ARGUMENT", waf_pb2.FIELD_INVALID)
    assert (answers[7].error.code, answers[7].error.reason) == ("NOT_FOUND", waf_pb2.TRANSACTION_OTHER_WORKER)
    assert (answers[8].error.code, answers[8].error.reason) == ("INVALID_ARGUMENT", waf_pb2.FIELD_INVALID)
    assert (answers[9].error.code, answers[9].error.reason) == ("NOT_FOUND", waf_pb2.UNKNOWN_APPLICATION)


def test_two_reloads_end_what_the_first_left_running(light_waf):
    with light_waf.channel() as channel:
        stub = waf_pb2_grpc.WafStub(channel)
        survivor_of_one = None
        held = stub.Evaluate(request(), timeout=10).transaction_handle
        before = light_waf.settled().total("modsec_waf_held_transaction_evictions_total", reason="reloaded")
        for n in range(2):
            loaded = light_waf.settled().total("modsec_waf_reloads_total", result="success")
            light_waf.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while light_waf.settled().total("modsec_waf_reloads_total", result="success") < loaded + 1:
                assert time.monotonic() < deadline, "the reload was never counted"
            if n == 0:
                time.sleep(1)   # the worker reloads after the supervisor
                survivor_of_one = stub.Evaluate(request(), timeout=10).transaction_handle
        deadline = time.monotonic() + 30
        while light_waf.settled().total("modsec_waf_held_transaction_evictions_total", reason="reloaded") <= before:
            assert time.monotonic() < deadline, "the second reload never ended the oldest held transaction"
        assert unary_error(lambda: stub.EvaluateResponse(response(held), timeout=10)) == \
            (grpc.StatusCode.NOT_FOUND, "TRANSACTION_RELOADED")
        assert stub.EvaluateResponse(response(survivor_of_one), timeout=10).action == waf_pb2.ACTION_PASS


# -- bounded state -------------------------------------------------------------------

def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def test_200k_unanswered_transactions_keep_the_worker_bounded(light_waf):
    total, per_batch, cap = 200_000, 500, 2000
    rss = {}
    before = light_waf.settled()
    evicted0 = before.total("modsec_waf_held_transaction_evictions_total", reason="evicted")

    def batches():
        for n in range(total // per_batch):
            out = waf_pb2.EvaluateBatch()
            for i in range(per_batch):
                out.requests.add(ref=n * per_batch + i, request=request(transaction_id=f"never-{n}-{i}"))
            yield out

    answered = 0
    with light_waf.channel() as channel:
        call = waf_pb2_grpc.WafStub(channel).EvaluateStream(batches(), timeout=600)
        pid = int(dict(call.initial_metadata())["x-waf-worker"].rsplit("/", 1)[1])
        for out in call:
            for item in out.verdicts:
                assert item.verdict.transaction_handle, item
            answered += len(out.verdicts)
            if "warm" not in rss and answered >= 10 * cap:
                rss["warm"] = rss_kib(pid)
        rss["end"] = rss_kib(pid)
    assert answered == total
    after = light_waf.settled()
    assert after.total("modsec_waf_held_transactions") == cap
    assert after.total("modsec_waf_held_transaction_evictions_total", reason="evicted") - evicted0 == total - cap
    growth_mib = (rss["end"] - rss["warm"]) / 1024
    print(f"worker RSS {rss['warm'] / 1024:.1f} MiB after {10 * cap} kept, {rss['end'] / 1024:.1f} MiB "
          f"after {total}")
    # A leak of even 100 bytes per transaction would add 17 MiB here.
    assert growth_mib < 8, rss


def test_a_draining_worker_keeps_nothing_new_but_answers_what_it_holds():
    """A worker about to exit refuses to keep new transactions (DRAINING,
    retryable: a live worker takes them) and still answers the responses of
    those it holds. A real server on a socket, served by a thread of this
    process."""
    import threading

    from wafsvc.engine import Engine
    from wafsvc.responses import Responses
    from wafsvc.rules import RuleSetSpec
    from wafsvc.service import build_server, worker_name

    engine = Engine({"": RuleSetSpec(base_conf=str(ROOT / "rules" / "modsecurity.conf"),
                                     rules_file=str(ROOT / "rules" / "block-localhost.conf"))})
    port = free_port()
    server, servicer = build_server(Responses(engine, worker_name("drain-test"), 35000, 10),
                                    f"127.0.0.1:{port}", 1 << 20, "drain-test")
    server.start()
    loop = threading.Thread(target=server.run)
    loop.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = waf_pb2_grpc.WafStub(channel)
            held = stub.Evaluate(request(), timeout=10).transaction_handle
            servicer.draining = True
            with pytest.raises(grpc.RpcError) as refused:
                stub.Evaluate(request(), timeout=10)
            plain = stub.Evaluate(request(inspect_response=False), timeout=10)
            answered = stub.EvaluateResponse(response(held), timeout=10)
    finally:
        server.soon(server.stop)
        loop.join(10)
    assert not loop.is_alive()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(refused.value.trailing_metadata())[REASON] == "DRAINING"
    assert plain.action == waf_pb2.ACTION_PASS and answered.action == waf_pb2.ACTION_PASS
