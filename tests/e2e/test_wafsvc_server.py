"""wafsvc's own gRPC server loop (wafsvc/rpc.py) against real clients:
streams answered in order and in parts, health Watch and List, what it
refuses, and drain. The methods themselves are tested through their users
(the gateway, the client, Envoy, grpcurl's reflection)."""

from __future__ import annotations

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
