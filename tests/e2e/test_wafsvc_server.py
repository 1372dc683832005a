"""wafsvc's own gRPC server loop (wafsvc/rpc.py) against real clients:
streams answered in order and in parts, health Watch and List, what it
refuses, and drain. The methods themselves are tested through their users
(the gateway, the client, Envoy, grpcurl's reflection)."""

from __future__ import annotations

import json
import queue
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.wafsvc_only import start_wafsvc
from wafapi import waf_pb2

STREAM = "/waf.v1.Waf/EvaluateStream"
Serving = health_pb2.HealthCheckResponse


def batch(first_ref: int, count: int) -> bytes:
    out = waf_pb2.EvaluateBatch()
    for ref in range(first_ref, first_ref + count):
        out.requests.add(ref=ref, request=waf_pb2.EvaluateRequest(
            transaction_id=f"t{ref}", method="GET", uri=f"/page?n={ref}".encode(), http_version="1.1",
            headers=[waf_pb2.Header(name=b"host", value=b"example.com")], client_ip="10.0.0.1"))
    return out.SerializeToString()


@pytest.fixture(scope="module")
def waf(tmp_path_factory):
    stack = start_wafsvc(tmp_path_factory.mktemp("wafsvc-server"))
    yield stack
    stack.stop()


@pytest.fixture()
def doomed(tmp_path):
    stack = start_wafsvc(tmp_path)
    yield stack
    stack.stop()


def channel(stack) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{stack.spec.wafsvc_ports[0]}")


class Stream:
    """One EvaluateStream call, fed from a queue; answers collected."""

    def __init__(self, ch: grpc.Channel) -> None:
        self.outbox: queue.Queue = queue.Queue()
        self.call = ch.stream_stream(STREAM, request_serializer=lambda b: b,
                                     response_deserializer=waf_pb2.VerdictBatch.FromString)(
            iter(self.outbox.get, None))
        self.answers: list[waf_pb2.VerdictBatch] = []
        self.error: grpc.RpcError | None = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        try:
            for answer in self.call:
                self.answers.append(answer)
        except grpc.RpcError as exc:
            self.error = exc

    def refs(self) -> list[int]:
        return [v.ref for answer in self.answers for v in answer.verdicts]

    def wait_for(self, refs: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.refs()) < refs and time.monotonic() < deadline and self.reader.is_alive():
            time.sleep(0.01)


def test_pipelined_messages_are_answered_in_order_with_worker_metadata(waf):
    with channel(waf) as ch:
        stream = Stream(ch)
        for k in range(50):
            stream.outbox.put(batch(1 + 3 * k, 3))
        stream.wait_for(150)
        stream.outbox.put(None)
        stream.reader.join(10)
        assert stream.refs() == list(range(1, 151))
        assert all(v.HasField("verdict") for a in stream.answers for v in a.verdicts)
        assert stream.error is None and stream.call.code() == grpc.StatusCode.OK
        metadata = dict(stream.call.initial_metadata())
        assert metadata["x-waf-workers"] == "1" and metadata["x-waf-worker"].startswith(metadata["x-waf-replica"])


def test_a_long_batch_is_answered_in_parts(waf):
    """Past 50 ms of evaluation the worker sends what is done, so that the
    gateway sees it alive; every request is still answered once, in order."""
    with channel(waf) as ch:
        stream = Stream(ch)
        stream.outbox.put(batch(1, 3000))
        stream.wait_for(3000, timeout=60)
        stream.outbox.put(None)
        stream.reader.join(10)
    assert stream.refs() == list(range(1, 3001))
    assert len(stream.answers) > 1


def test_health_list_names_every_service_served(waf):
    with channel(waf) as ch:
        reply = health_pb2_grpc.HealthStub(ch).List(health_pb2.HealthListRequest(), timeout=5)
    assert {name: s.status for name, s in reply.statuses.items()} == {
        name: Serving.SERVING for name in ("", "waf.v1.Waf", "envoy.service.auth.v3.Authorization",
                                           "envoy.service.ext_proc.v3.ExternalProcessor")}


def test_unknown_methods_and_malformed_requests_are_refused(waf):
    with channel(waf) as ch:
        with pytest.raises(grpc.RpcError) as unknown:
            ch.unary_unary("/waf.v1.Waf/NoSuchMethod")(b"", timeout=5)
        with pytest.raises(grpc.RpcError) as malformed:
            ch.unary_unary("/waf.v1.Waf/Evaluate")(b"\xff\xff\xff", timeout=5)
    assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert malformed.value.code() == grpc.StatusCode.INTERNAL


def test_drain_tells_watchers_and_ends_idle_streams_at_once(doomed):
    """SIGTERM: a health watcher hears NOT_SERVING and its stream ends; an
    idle EvaluateStream ends (OK) without waiting for the grace period
    (10 s); the worker exits."""
    ch = channel(doomed)
    watched: queue.Queue = queue.Queue()

    def watch() -> None:
        try:
            for reply in health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service="waf.v1.Waf")):
                watched.put(reply.status)
            watched.put("ended")
        except grpc.RpcError as exc:
            watched.put(exc.code())

    threading.Thread(target=watch, daemon=True).start()
    assert watched.get(timeout=10) == Serving.SERVING
    stream = Stream(ch)
    stream.outbox.put(batch(1, 2))
    stream.wait_for(2)
    assert stream.refs() == [1, 2]
    started = time.monotonic()
    doomed.proc("wafsvc1").send_signal(signal.SIGTERM)
    assert watched.get(timeout=10) == Serving.NOT_SERVING
    assert watched.get(timeout=10) == "ended"
    stream.reader.join(10)
    assert not stream.reader.is_alive() and stream.error is None
    assert stream.call.code() == grpc.StatusCode.OK
    doomed.proc("wafsvc1").wait(timeout=10)
    assert time.monotonic() - started < 5   # not the 10 s grace period
    ch.close()


def kept(first_ref: int, count: int) -> bytes:
    """Requests whose transactions the worker keeps for their response."""
    out = waf_pb2.EvaluateBatch.FromString(batch(first_ref, count))
    for item in out.requests:
        item.request.inspect_response = True
    return out.SerializeToString()


def responses(first_ref: int, handles: list[str]) -> bytes:
    out = waf_pb2.EvaluateBatch()
    for ref, handle in enumerate(handles, first_ref):
        out.requests.add(ref=ref, response=waf_pb2.ResponseRequest(
            transaction_handle=handle, status=200, headers=[waf_pb2.Header(name=b"content-type", value=b"text/html")]))
    return out.SerializeToString()


def results(stream: Stream) -> dict[int, waf_pb2.BatchVerdict]:
    return {v.ref: v for answer in stream.answers for v in answer.verdicts}


def stopped(stack) -> dict:
    """The worker's last words: how many it held when the drain began and when it exited."""
    events = [json.loads(line) for line in (stack.spec.log_dir / "wafsvc1.log").read_text().splitlines()
              if line.startswith("{")]
    return next(e for e in events if e.get("msg") == "worker stopped")


def hold_two_then_drain(stack) -> tuple[grpc.Channel, Stream, Stream, list[str]]:
    """Two held transactions on one stream, a second stream idle; SIGTERM,
    and both streams hear at once that the worker drains."""
    ch = channel(stack)
    busy, idle = Stream(ch), Stream(ch)
    busy.outbox.put(kept(1, 2))
    busy.wait_for(2)
    handles = [v.verdict.transaction_handle for v in results(busy).values()]
    assert len(handles) == 2 and all(handles), results(busy)
    stack.proc("wafsvc1").send_signal(signal.SIGTERM)
    for stream in (busy, idle):
        wait_until(lambda: any(a.draining for a in stream.answers), "the drain notice")
    return ch, busy, idle, handles


def wait_until(condition, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what}"
        time.sleep(0.01)


def test_a_draining_worker_answers_the_responses_it_holds_then_ends(doomed):
    """SIGTERM while two transactions are held: every stream says so at
    once, new requests are refused (DRAINING, retryable), the responses are
    inspected, on any stream, and only after the last do the streams end
    (OK) and the worker exit with nothing left held."""
    ch, busy, idle, handles = hold_two_then_drain(doomed)
    busy.outbox.put(batch(3, 1))
    busy.outbox.put(responses(4, handles[:1]))
    busy.wait_for(3)
    refused = results(busy)[3]
    assert refused.error.code == "UNAVAILABLE" and refused.error.reason == waf_pb2.DRAINING
    # The first response answered, the worker still holds one: both streams
    # stay open (the second takes the last response).
    busy.wait_for(4)
    assert results(busy)[4].verdict.action == waf_pb2.ACTION_PASS
    idle.outbox.put(responses(5, handles[1:]))
    idle.wait_for(1)
    assert results(idle)[5].verdict.action == waf_pb2.ACTION_PASS
    for stream in (busy, idle):
        stream.reader.join(10)
        assert stream.error is None and stream.call.code() == grpc.StatusCode.OK
    doomed.proc("wafsvc1").wait(timeout=10)
    last = stopped(doomed)
    assert last["held_at_drain"] == 2 and last["held_at_exit"] == 0, last
    ch.close()


@pytest.mark.parametrize("env,left", [({"WAF_TRANSACTION_TTL_MS": "1500", "WAF_DRAIN_GRACE_MS": "60000"}, 0),
                                      ({"WAF_TRANSACTION_TTL_MS": "60000", "WAF_DRAIN_GRACE_MS": "1500"}, 2)])
def test_responses_that_never_come_hold_a_drain_only_until_the_ttl_or_the_grace(tmp_path, env, left):
    """Whichever comes first ends the drain: the TTL (the transactions
    expire, nothing is left) or the grace period (what is left is ended at
    exit, its audit entries written)."""
    stack = start_wafsvc(tmp_path, env=env)
    try:
        ch, busy, idle, _ = hold_two_then_drain(stack)
        for stream in (busy, idle):
            stream.reader.join(30)
            assert not stream.reader.is_alive()
        stack.proc("wafsvc1").wait(timeout=30)
        last = stopped(stack)
        assert last["held_at_drain"] == 2 and last["held_at_exit"] == left, last
        ch.close()
    finally:
        stack.stop()
