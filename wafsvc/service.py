"""The gRPC face of one worker: Evaluate, EvaluateStream, health, reflection.

Evaluation runs inline on the event loop. The engine holds the GIL for the
whole call, so a thread pool would add switching cost and no parallelism.
"""

from __future__ import annotations

import logging
import os
import socket

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from wafapi import waf_pb2, waf_pb2_grpc
from wafsvc.engine import Engine, EvaluationFailed

log = logging.getLogger("wafsvc.service")

SERVICE_NAME = waf_pb2.DESCRIPTOR.services_by_name["Waf"].full_name


class WafServicer(waf_pb2_grpc.WafServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.draining = False
        self.worker_id = f"{socket.gethostname()}/{os.getpid()}"

    async def Evaluate(self, request: waf_pb2.EvaluateRequest, context: grpc.aio.ServicerContext) -> waf_pb2.Verdict:
        try:
            return self.engine.evaluate(request)
        except EvaluationFailed as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), exc.message)

    async def EvaluateStream(self, request_iterator, context: grpc.aio.ServicerContext):
        # Tells the gateway which worker process serves this stream, so that it
        # balances load per worker rather than per stream.
        await context.send_initial_metadata((("x-waf-worker", self.worker_id),))
        evaluate = self.engine.evaluate
        async for batch in request_iterator:
            out = waf_pb2.VerdictBatch()
            for item in batch.requests:
                result = out.verdicts.add(ref=item.ref)
                try:
                    evaluate(item.request, result.verdict)
                except EvaluationFailed as exc:
                    result.error.code = exc.code
                    result.error.message = exc.message
            yield out
            if self.draining:
                # Finish what was sent, then end the stream: the gateway
                # reopens it on another worker.
                return


def build_server(engine: Engine, listen: str, max_message_bytes: int) -> tuple[grpc.aio.Server, WafServicer, health.aio.HealthServicer]:
    options = [
        ("grpc.so_reuseport", 1),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Make clients reconnect now and then, so that they re-resolve DNS and
        # spread over replicas that joined since (the streams are long-lived).
        ("grpc.max_connection_age_ms", 10 * 60 * 1000),
        ("grpc.max_connection_age_grace_ms", 30 * 1000),
        ("grpc.keepalive_time_ms", 20 * 1000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5 * 1000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    server = grpc.aio.server(options=options)
    servicer = WafServicer(engine)
    waf_pb2_grpc.add_WafServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen}")
    return server, servicer, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
