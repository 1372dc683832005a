"""The gRPC face of one worker: Evaluate, EvaluateResponse, EvaluateStream,
ListApplications, health, reflection, on wafsvc/rpc.py's one-thread server.

Evaluation runs inline on the thread that polls gRPC. The engine holds the
GIL for the whole call, so a thread pool would add switching cost and no
parallelism.

Every stream starts with initial metadata naming this worker, its replica and
how many workers the replica has: the gateway balances per worker and opens
more connections until it has reached every worker (SO_REUSEPORT hashes each
connection to one worker, so coverage is luck unless someone checks).
A response (EvaluateResponse, or a `response` item on a stream) must reach
the worker that holds its transaction: the handle starts with that name.

Drain (SIGTERM): the worker takes no new requests (DRAINING, retryable: the
gateway re-sends them elsewhere) but answers the responses of the
transactions it holds. Each stream says so at once (VerdictBatch.draining)
and stays open until none are held (answered, or ended by their TTL), so a
rolling update loses no response inspection; WAF_DRAIN_GRACE_MS bounds it.

Pause (a reload, wafsvc/pause.py): the same on every stream, for the time
of the parse; then each stream says the worker serves again
(VerdictBatch.draining false). Every stream message carries the state.

Every failure carries its ErrorReason: unary calls abort with the status
code and the trailing metadata "x-waf-error-reason"; stream items come back
as EvaluationError with code and reason.
"""

from __future__ import annotations

import hmac
import logging
import os
import socket
import time
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from common.secrets import read_pem
from wafapi import waf_pb2, waf_pb2_grpc
from wafsvc import rpc
from wafsvc.engine import Engine
from wafsvc.errors import EvaluationFailed
from wafsvc.pause import Pause

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


def refusal(exc: EvaluationFailed) -> rpc.Abort:
    """A failed call's status: the code, and the reason as trailing metadata."""
    return rpc.Abort(exc.code, exc.message, ((ERROR_REASON_METADATA, exc.reason_name),))


class WafServicer:
    def __init__(self, engine: Engine, replica_id: str = "", workers: int = 1,
                 held: Callable[[], int] = lambda: 0, pause: Pause | None = None) -> None:
        self.engine = engine
        self.held = held   # transactions this worker holds for their response
        self.draining = False
        self.pause = pause   # a reload's (wafsvc/pause.py); None: never pauses
        self.replica_id = replica_id or default_replica()
        self.worker_id = worker_name(self.replica_id)
        self.workers = workers
        self.evaluations = 0   # requests evaluated by this worker (tests, metrics)
        self.streams = 0       # EvaluateStream calls open now
        self._metadata = ((WORKER_METADATA, self.worker_id), (REPLICA_METADATA, self.replica_id),
                          (WORKERS_METADATA, str(workers)))

    def Evaluate(self, request: waf_pb2.EvaluateRequest, call: rpc.Call) -> waf_pb2.Verdict:
        try:
            if request.inspect_response and self.draining:
                raise _draining()
            verdict = self.engine.evaluate(request)
        except EvaluationFailed as exc:
            raise refusal(exc) from None
        except Exception as exc:  # a bug: fail this call with a reason, as the stream does
            log.exception("evaluation failed unexpectedly")
            raise refusal(_unexpected(exc)) from None
        self.evaluations += 1
        return verdict

    def EvaluateResponse(self, request: waf_pb2.ResponseRequest, call: rpc.Call) -> waf_pb2.Verdict:
        try:
            # Answered while draining too: the held transactions are still
            # here until the worker exits.
            verdict = self.engine.evaluate_response(request)
        except EvaluationFailed as exc:
            raise refusal(exc) from None
        except Exception as exc:
            log.exception("response evaluation failed unexpectedly")
            raise refusal(_unexpected(exc)) from None
        self.evaluations += 1
        return verdict

    def ListApplications(self, request: waf_pb2.ListApplicationsRequest,
                         call: rpc.Call) -> waf_pb2.ListApplicationsResponse:
        # This worker's applications: after a reload, the ones now serving.
        return self.engine.applications()

    def housekeeping(self) -> None:
        """Every second: held transactions past their TTL end even when no
        request comes, and metrics reach the shared files."""
        try:
            self.engine.housekeeping()
        except Exception:  # never let the sweeper die: held memory would grow unbounded
            log.exception("housekeeping failed")

    @property
    def refusing(self) -> bool:
        """The worker takes no new requests: it drains or pauses (the state streams carry)."""
        return self.draining or (self.pause is not None and self.pause.paused)

    def refuses(self, opened_during: int | None) -> bool:
        """A stream opened during the pause under way (opened_during) is served (wafsvc/pause.py)."""
        return self.draining or (self.pause is not None and self.pause.refuses(opened_during))

    def EvaluateStream(self, call: rpc.Call) -> "EvaluationStream":
        call.initial_metadata = self._metadata
        return EvaluationStream(self)


class EvaluationStream(rpc.Session):
    """One EvaluateStream call: each batch is answered in order, in one
    message, or in parts when it runs long. Once the worker drains, the
    stream says so, refuses requests (DRAINING) and stays open while the
    worker holds transactions: their responses may come on any stream to it
    (idle: it ends at once). That is lossless, the gateway re-sends anything
    refused or unanswered elsewhere. A pause refuses the same way, for a while."""
    STATE = {True: waf_pb2.VerdictBatch(draining=True), False: waf_pb2.VerdictBatch(draining=False)}

    def __init__(self, servicer: WafServicer) -> None:
        self.servicer = servicer
        self.ended = servicer.draining
        self.opened_during = servicer.pause.current() if servicer.pause is not None else None
        servicer.streams += 1

    def receive(self, batch: waf_pb2.EvaluateBatch):
        servicer = self.servicer
        engine = servicer.engine
        evaluate, evaluate_response = engine.evaluate, engine.evaluate_response
        # Each message carries the state; it cannot change between two yields.
        out = waf_pb2.VerdictBatch(draining=servicer.refusing)
        flush_at = time.monotonic() + PARTIAL_FLUSH_S
        for item in batch.requests:
            if out.verdicts and time.monotonic() >= flush_at:
                # A long batch (big bodies, CRS): send what is done, so
                # the gateway sees this worker is alive, not hung.
                yield out
                out = waf_pb2.VerdictBatch(draining=servicer.refusing)
                flush_at = time.monotonic() + PARTIAL_FLUSH_S
            result = out.verdicts.add(ref=item.ref)
            try:
                kind = item.WhichOneof("item")
                if kind == "request":
                    if out.draining and servicer.refuses(self.opened_during):
                        if not servicer.draining:   # paused: not quiet yet
                            servicer.pause.request_refused()
                        raise _draining()
                    evaluate(item.request, result.verdict)
                elif kind == "response":
                    evaluate_response(item.response, result.verdict)
                else:
                    raise EvaluationFailed("INVALID_ARGUMENT", "batch item holds neither a request "
                                           "nor a response", waf_pb2.FIELD_INVALID)
                servicer.evaluations += 1
            except EvaluationFailed as exc:
                _set_error(result, exc)
            except Exception as exc:  # a bug: fail this request, not the whole stream
                log.exception("evaluation failed unexpectedly")
                _set_error(result, _unexpected(exc))
        yield out

    def notice(self):
        """The worker's state changed (it drains, pauses, serves again): say so."""
        return (self.STATE[self.servicer.refusing],)

    def keeps_open(self) -> bool:
        return self.servicer.held() > 0

    def close(self) -> None:
        self.servicer.streams -= 1


def _draining() -> EvaluationFailed:
    """A request on a worker about to exit (on the stream, any; a unary one
    it would keep) or pausing (on the stream): refused (UNAVAILABLE,
    retryable) for a worker that takes requests."""
    return EvaluationFailed("UNAVAILABLE", "this worker is draining and keeps no new transactions; retry "
                            "elsewhere", waf_pb2.DRAINING)


def _unexpected(exc: Exception) -> EvaluationFailed:
    return EvaluationFailed("INTERNAL", f"unexpected {type(exc).__name__}", waf_pb2.ENGINE_ERROR)


def _set_error(result: waf_pb2.BatchVerdict, exc: EvaluationFailed) -> None:
    result.ClearField("verdict")  # a partly filled verdict must not travel
    result.error.code = exc.code
    result.error.message = exc.message
    result.error.reason = exc.reason


# Served beside waf.v1.Waf, with the same health (Envoy's gRPC health checks name them).
ENVOY_SERVICES = ("envoy.service.auth.v3.Authorization", "envoy.service.ext_proc.v3.ExternalProcessor")


class BearerToken:
    """Refuses calls without `authorization: Bearer <token>` (UNAUTHENTICATED).

    Health checks stay open (wafsvc/rpc.py) so that orchestrators can probe
    without the secret; they reveal nothing but SERVING. TLS protects the
    token on the wire.
    """

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def __call__(self, method: str, metadata: tuple) -> bool:
        for key, value in metadata:
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False


class Reflection(reflection.ReflectionServicer):
    """grpc.reflection.v1alpha, one answer per request, on the stream protocol."""

    def ServerReflectionInfo(self, call: rpc.Call) -> rpc.Session:
        return _ReflectionStream(super().ServerReflectionInfo)


class _ReflectionStream(rpc.Session):
    def __init__(self, answer) -> None:
        self._answer = answer

    def receive(self, request):
        return self._answer(iter((request,)), None)


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """TLS from PEM files; with client_ca, clients must present a certificate it signed."""
    return grpc.ssl_server_credentials(
        [(read_pem(key), read_pem(cert))], root_certificates=read_pem(client_ca),
        require_client_auth=bool(client_ca))


def build_server(engine: Engine, listen: str, max_message_bytes: int, replica_id: str = "",
                 workers: int = 1, credentials: grpc.ServerCredentials | None = None,
                 token: str = "", timers: rpc.Timers | None = None,
                 held: Callable[[], int] = lambda: 0) -> tuple[rpc.Server, WafServicer]:
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
    server = rpc.Server(options, authorize=BearerToken(token) if token else None, timers=timers)
    # Each stream's notice says whether the worker takes requests (EvaluationStream.notice).
    pause = Pause(server.broadcast, server.timers.call_later)
    servicer = WafServicer(engine, replica_id, workers, held, pause)
    waf_pb2_grpc.add_WafServicer_to_server(servicer, server)
    # Envoy's ext_authz and ext_proc, on the same port and engine (wafsvc/envoy_*.py).
    from wafsvc import envoy_authz, envoy_extproc
    envoy_services = (envoy_authz.add_to_server(server, engine), envoy_extproc.add_to_server(server, engine))
    names = (SERVICE_NAME, *envoy_services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(Reflection(names), server)
    # With credentials the port speaks TLS only: a plaintext client fails its handshake.
    if server.add_port(listen, credentials) == 0:
        raise OSError(f"cannot listen on {listen}")
    return server, servicer


def set_serving(server: rpc.Server, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME, *ENVOY_SERVICES):
        server.health.set(name, status)
