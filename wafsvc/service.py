"""The gRPC face of one worker: Evaluate, EvaluateResponse, EvaluateStream,
ListApplications, health, reflection.

Evaluation runs inline on the event loop. The engine holds the GIL for the
whole call, so a thread pool would add switching cost and no parallelism.

Every stream starts with initial metadata naming this worker, its replica and
how many workers the replica has: the gateway balances per worker and opens
more connections until it has reached every worker (SO_REUSEPORT hashes each
connection to one worker, so coverage is luck unless someone checks).
A response (EvaluateResponse, or a `response` item on a stream) must reach
the worker that holds its transaction: the handle starts with that name.

Every failure carries its ErrorReason: unary calls abort with the status
code and the trailing metadata "x-waf-error-reason"; stream items come back
as EvaluationError with code and reason.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.secrets import read_pem
from wafapi import waf_pb2, waf_pb2_grpc
from wafsvc.engine import Engine
from wafsvc.errors import EvaluationFailed

log = logging.getLogger("wafsvc.service")

SERVICE_NAME = waf_pb2.DESCRIPTOR.services_by_name["Waf"].full_name

# Stream metadata: the contract with gateway/pool.py.
WORKER_METADATA = "x-waf-worker"      # unique per worker process
REPLICA_METADATA = "x-waf-replica"    # unique per replica (supervisor)
WORKERS_METADATA = "x-waf-workers"    # worker processes in that replica
ERROR_REASON_METADATA = "x-waf-error-reason"   # trailing metadata of a failed unary call
PARTIAL_FLUSH_S = 0.05  # well under the gateway's GATEWAY_HEDGE_MS
HOUSEKEEPING_S = 1.0    # expired held transactions end within this of their TTL


def worker_name(replica_id: str = "") -> str:
    """This worker process's "x-waf-worker" name: "<replica>/<pid>"."""
    return f"{replica_id or default_replica()}/{os.getpid()}"


def default_replica() -> str:
    return f"{socket.gethostname()}/{os.getppid()}"


class WafServicer(waf_pb2_grpc.WafServicer):
    def __init__(self, engine: Engine, replica_id: str = "", workers: int = 1) -> None:
        self.engine = engine
        self.draining = False
        self.replica_id = replica_id or default_replica()
        self.worker_id = worker_name(self.replica_id)
        self.workers = workers
        self.evaluations = 0   # requests evaluated by this worker (tests, metrics)
        self.streams = 0       # EvaluateStream calls open now
        self._metadata = ((WORKER_METADATA, self.worker_id), (REPLICA_METADATA, self.replica_id),
                          (WORKERS_METADATA, str(workers)))
        self._idle: set[asyncio.Task] = set()  # stream handlers waiting for a batch

    async def Evaluate(self, request: waf_pb2.EvaluateRequest, context: grpc.aio.ServicerContext) -> waf_pb2.Verdict:
        try:
            if request.inspect_response and self.draining:
                raise _draining()
            verdict = self.engine.evaluate(request)
        except EvaluationFailed as exc:
            await _abort(context, exc)
        except Exception as exc:  # a bug: fail this call with a reason, as the stream does
            log.exception("evaluation failed unexpectedly")
            await _abort(context, _unexpected(exc))
        self.evaluations += 1
        return verdict

    async def EvaluateResponse(self, request: waf_pb2.ResponseRequest,
                               context: grpc.aio.ServicerContext) -> waf_pb2.Verdict:
        try:
            # Answered while draining too: the held transactions are still
            # here until the worker exits.
            verdict = self.engine.evaluate_response(request)
        except EvaluationFailed as exc:
            await _abort(context, exc)
        except Exception as exc:
            log.exception("response evaluation failed unexpectedly")
            await _abort(context, _unexpected(exc))
        self.evaluations += 1
        return verdict

    async def ListApplications(self, request: waf_pb2.ListApplicationsRequest,
                               context: grpc.aio.ServicerContext) -> waf_pb2.ListApplicationsResponse:
        # This worker's applications: after a reload, the ones now serving.
        return self.engine.applications()

    async def housekeeping(self) -> None:
        """Runs until cancelled: held transactions past their TTL end even
        when no request comes, and metrics reach the shared files."""
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            try:
                self.engine.housekeeping()
            except Exception:  # never let the sweeper die: held memory would grow unbounded
                log.exception("housekeeping failed")

    async def EvaluateStream(self, request_iterator, context: grpc.aio.ServicerContext):
        await context.send_initial_metadata(self._metadata)
        if self.draining:
            return
        evaluate = self.engine.evaluate
        evaluate_response = self.engine.evaluate_response
        requests = request_iterator.__aiter__()
        handler = asyncio.current_task()
        self.streams += 1
        try:
            while True:
                # While it waits for a batch, drain() may cancel this stream:
                # an idle stream must not hold shutdown for the grace period.
                # Ending it is lossless: the gateway re-sends anything it had
                # sent and not yet got an answer for to another worker.
                # (Registering here costs a set operation per message; a
                # task and asyncio.wait per message, the other way to race a
                # read against drain, cost more than the evaluation itself
                # with light rules.)
                self._idle.add(handler)
                try:
                    batch = await requests.__anext__()
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if self.draining:
                        return
                    raise
                finally:
                    self._idle.discard(handler)
                out = waf_pb2.VerdictBatch()
                flush_at = time.monotonic() + PARTIAL_FLUSH_S
                for item in batch.requests:
                    if out.verdicts and time.monotonic() >= flush_at:
                        # A long batch (big bodies, CRS): send what is done, so
                        # the gateway sees this worker is alive, not hung.
                        yield out
                        out = waf_pb2.VerdictBatch()
                        flush_at = time.monotonic() + PARTIAL_FLUSH_S
                    result = out.verdicts.add(ref=item.ref)
                    try:
                        kind = item.WhichOneof("item")
                        if kind == "request":
                            request = item.request
                            if request.inspect_response and self.draining:
                                raise _draining()
                            evaluate(request, result.verdict)
                        elif kind == "response":
                            evaluate_response(item.response, result.verdict)
                        else:
                            raise EvaluationFailed("INVALID_ARGUMENT", "batch item holds neither a request "
                                                   "nor a response", waf_pb2.FIELD_INVALID)
                        self.evaluations += 1
                    except EvaluationFailed as exc:
                        _set_error(result, exc)
                    except Exception as exc:  # a bug: fail this request, not the whole stream
                        log.exception("evaluation failed unexpectedly")
                        _set_error(result, _unexpected(exc))
                yield out
                if self.draining:
                    return  # what was read is answered; the gateway reopens elsewhere
        finally:
            self.streams -= 1

    def drain(self) -> None:
        """Ends every stream as soon as it has answered what it read: idle
        ones at once, busy ones after their current batch."""
        self.draining = True
        for handler in list(self._idle):
            handler.cancel()


def _draining() -> EvaluationFailed:
    """A request to keep, on a worker about to exit: its response would miss,
    so it is refused (UNAVAILABLE, retryable) for a live worker to take."""
    return EvaluationFailed("UNAVAILABLE", "this worker is draining and keeps no new transactions; retry "
                            "elsewhere", waf_pb2.DRAINING)


def _unexpected(exc: Exception) -> EvaluationFailed:
    return EvaluationFailed("INTERNAL", f"unexpected {type(exc).__name__}", waf_pb2.ENGINE_ERROR)


def _set_error(result: waf_pb2.BatchVerdict, exc: EvaluationFailed) -> None:
    result.ClearField("verdict")  # a partly filled verdict must not travel
    result.error.code = exc.code
    result.error.message = exc.message
    result.error.reason = exc.reason


async def _abort(context: grpc.aio.ServicerContext, exc: EvaluationFailed) -> None:
    await context.abort(getattr(grpc.StatusCode, exc.code), exc.message,
                        trailing_metadata=((ERROR_REASON_METADATA, exc.reason_name),))


HEALTH_PREFIX = "/grpc.health.v1.Health/"
# Served beside waf.v1.Waf, with the same health (Envoy's gRPC health checks name them).
ENVOY_SERVICES = ("envoy.service.auth.v3.Authorization", "envoy.service.ext_proc.v3.ExternalProcessor")


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` (UNAUTHENTICATED).

    Health checks stay open so that orchestrators can probe without the
    secret; they reveal nothing but SERVING. TLS protects the token on the wire.
    """

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                if hmac.compare_digest(given, self._expected):
                    return handler
                break
        return _refusal(handler, "missing or wrong bearer token")


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    # Same streaming shape as the real method, so the framework reads the call
    # the way the client sends it, then aborts before the servicer runs.
    async def refuse(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(refuse_stream if handler.response_streaming else refuse,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """TLS from PEM files; with client_ca, clients must present a certificate it signed."""
    return grpc.ssl_server_credentials(
        [(read_pem(key), read_pem(cert))], root_certificates=read_pem(client_ca),
        require_client_auth=bool(client_ca))


def build_server(engine: Engine, listen: str, max_message_bytes: int, replica_id: str = "",
                 workers: int = 1, credentials: grpc.ServerCredentials | None = None,
                 token: str = "") -> tuple[grpc.aio.Server, WafServicer, health.aio.HealthServicer]:
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
    interceptors = [TokenInterceptor(token)] if token else []
    server = grpc.aio.server(options=options, interceptors=interceptors)
    servicer = WafServicer(engine, replica_id, workers)
    waf_pb2_grpc.add_WafServicer_to_server(servicer, server)
    # Envoy's ext_authz and ext_proc, on the same port and engine (wafsvc/envoy_*.py).
    from wafsvc import envoy_authz, envoy_extproc
    envoy_services = (envoy_authz.add_to_server(server, engine), envoy_extproc.add_to_server(server, engine))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, *envoy_services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server,
    )
    # With credentials the port speaks TLS only: a plaintext client fails its handshake.
    bound = (server.add_secure_port(listen, credentials) if credentials is not None
             else server.add_insecure_port(listen))
    if bound == 0:
        raise OSError(f"cannot listen on {listen}")
    return server, servicer, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME, *ENVOY_SERVICES):
        await health_servicer.set(name, status)
