"""Envoy's external processing (ext_proc v3,
envoy.service.ext_proc.v3.ExternalProcessor/Process), served by every wafsvc
worker on the same port as waf.v1.Waf.

Envoy opens one bidirectional stream per HTTP request and sends what its
`processing_mode` asks for: request headers, request body, response headers,
response body (trailers are acknowledged, not inspected). Everything on one
stream runs on ONE engine transaction, phases 1 to 4 then logging (the
stream carries the state, so no handle and no affinity are needed):

    request_headers   -> phase 1 (request line, headers)
    request_body      -> body chunks, fed as they arrive (STREAMED) or whole
                         (BUFFERED); the last one ends phase 2
    response_headers  -> phase 3
    response_body     -> chunks; the last one ends phase 4, then logging

Envoy waits for an answer to every message it sends (outside observability
mode, which this service refuses: Envoy would ignore its blocks). Each
message therefore gets exactly one answer, in order: CONTINUE without any
mutation, or, once the engine denies, an immediate_response with the
engine's status, the matched rule ids in x-waf-rules and a short body;
Envoy then ends the stream. The decision is made as soon as the engine has
one: a block in the headers does not wait for the body, and an attack in
chunk 3 of 80 is answered at chunk 3.

Body modes: STREAMED (each chunk has end_of_stream on the last) and
BUFFERED (one message, the whole body) are supported. With BUFFERED_PARTIAL
a body cut at Envoy's buffer limit arrives without end_of_stream: it is
inspected and treated as truncated (WAF_TRUNCATED_BODY, rules 99010/99011).
FULL_DUPLEX_STREAMED and GRPC expect body mutations: refused with
FAILED_PRECONDITION, so a misconfiguration fails (Envoy's failure mode
decides) instead of leaving the WAF silently off.

Debug headers (for tests and the CRS conformance run, like HAProxy's
WAF_DEBUG_HEADERS): with the gRPC metadata `x-waf-debug-headers: 1` on the
filter's grpc_service, the answer that ends the response adds x-waf-rules
(every rule id matched in phases 1-5 of the transaction, "-" for none) and
x-waf-transaction-id (the engine's transaction id, as in the audit log) to
the response; with a BUFFERED response body that is the body's answer.

Failures (unknown application, engine error, a message out of order) end
the stream with the gRPC code and x-waf-error-reason; Envoy then applies
its `failure_mode_allow` (false: the request fails with `status_on_error`,
500 unless set; the shipped config says 503).
"""

from __future__ import annotations

import logging

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb, external_processor_pb2_grpc
from envoy.type.v3 import http_status_pb2

from wafapi import waf_pb2
from wafsvc import envoy_map, rpc
from wafsvc.errors import EvaluationFailed
from wafsvc.limits import check_request, check_response
from wafsvc.service import refusal
from wafsvc.transaction import TransactionStateError

log = logging.getLogger("wafsvc.envoy")

API = "ext_proc"
DEBUG_METADATA = "x-waf-debug-headers"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"   # where Envoy puts `request_attributes`
Mode = processing_mode_pb2.ProcessingMode
BUFFERED_MODES = (Mode.BUFFERED, Mode.BUFFERED_PARTIAL)
REFUSED_MODES = {Mode.FULL_DUPLEX_STREAMED: "FULL_DUPLEX_STREAMED", Mode.GRPC: "GRPC"}

# One CONTINUE answer per kind of message, built once.
CONTINUE = {
    "request_headers": pb.ProcessingResponse(request_headers=pb.HeadersResponse()),
    "response_headers": pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
    "request_body": pb.ProcessingResponse(request_body=pb.BodyResponse()),
    "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()),
    "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
    "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
}


def _refused(message: str) -> EvaluationFailed:
    return EvaluationFailed("FAILED_PRECONDITION", message, waf_pb2.FIELD_INVALID)


def immediate(verdict: waf_pb2.Verdict, debug_ids: list[int] | None = None) -> pb.ProcessingResponse:
    """The denial Envoy sends instead of the request or response. With
    debug headers, x-waf-rules lists the whole transaction's matches."""
    ids = envoy_map.rule_ids(verdict) if debug_ids is None else " ".join(map(str, debug_ids)).encode()
    headers = [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=envoy_map.RULES_HEADER, raw_value=ids))]
    if debug_ids is not None:
        headers.append(base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(
            key="x-waf-transaction-id", raw_value=verdict.transaction_id.encode())))
    if verdict.redirect_url:
        headers.append(base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(
            key="location", raw_value=verdict.redirect_url.encode())))
        status = verdict.status
    else:
        status = envoy_map.deny_status(verdict)
    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=status), headers=pb.HeaderMutation(set_headers=headers),
        body=envoy_map.DENIED_BODY, details="waf_blocked"))


class Exchange:
    """One HTTP request and its response: the engine transaction and where
    it stands. handle() answers one message; close() ends it."""

    def __init__(self, engine, app: str, ignore_rule_ids: tuple[int, ...], debug: bool = False) -> None:
        self.engine = engine
        self.debug = debug
        self.matched: list[int] = []   # every rule id matched so far (debug headers)
        self.app = app
        self.ignore = ignore_rule_ids
        self.tx = None
        self.request_id = ""
        self.request_mode = self.response_mode = Mode.NONE   # unknown until Envoy says
        self.request_ended = False
        self.response_started = False
        self.result = "abandoned"     # allowed once the request passed, denied once blocked

    # -- one message ---------------------------------------------------------
    def handle(self, msg: pb.ProcessingRequest) -> pb.ProcessingResponse:
        if msg.observability_mode:
            raise _refused("ext_proc observability_mode ignores every answer, so the WAF could block nothing; "
                           "turn it off")
        if msg.HasField("protocol_config"):
            self._modes(msg.protocol_config)
        kind = msg.WhichOneof("request")
        if kind == "request_headers":
            return self._request_headers(msg)
        if self.tx is None and kind in ("response_headers", "response_body", "response_trailers"):
            # Envoy's own answer to a request it refused before the filters
            # (a malformed request line, a fragment): no request reached the
            # backend, nothing to inspect. Failing here would turn Envoy's
            # 400 into a 500.
            return CONTINUE[kind]
        if self.tx is None:
            raise EvaluationFailed("FAILED_PRECONDITION", f"ext_proc sent {kind} before the request headers: "
                                   "request_header_mode must be SEND", waf_pb2.FIELD_INVALID)
        if kind == "request_body":
            return self._request_body(msg.request_body)
        if kind == "response_headers":
            return self._response_headers(msg.response_headers)
        if kind == "response_body":
            return self._response_body(msg.response_body)
        if kind == "request_trailers":
            return self._end_request(kind) if not self.request_ended else CONTINUE[kind]
        if kind == "response_trailers":
            return self._end_response(kind) if self.response_started and self.tx.open else CONTINUE[kind]
        raise EvaluationFailed("INVALID_ARGUMENT", "ext_proc message without a request or response part",
                               waf_pb2.FIELD_INVALID)

    def _modes(self, config: pb.ProtocolConfiguration) -> None:
        for mode in (config.request_body_mode, config.response_body_mode):
            if mode in REFUSED_MODES:
                raise _refused(f"body mode {REFUSED_MODES[mode]} expects the processor to send the body back; "
                               "use STREAMED or BUFFERED")
        self.request_mode, self.response_mode = config.request_body_mode, config.response_body_mode

    def _request_headers(self, msg: pb.ProcessingRequest) -> pb.ProcessingResponse:
        if self.tx is not None:
            raise TransactionStateError("ext_proc sent request headers twice on one stream")
        headers = msg.request_headers
        line = envoy_map.RequestLine(envoy_map.header_bytes(h) for h in headers.headers.headers)
        self.request_id = envoy_map.transaction_id(line.request_id)
        attributes = _attributes(msg)
        version = envoy_map.http_version(attributes.get("request.protocol", ""))
        client = (_ip(attributes.get("source.address")), int(attributes.get("source.port") or 0),
                  _ip(attributes.get("destination.address")), int(attributes.get("destination.port") or 0))
        limits = getattr(self.engine, "limits", None)
        if limits is not None:
            # The same checks as every other caller's (wafsvc/limits.py); the
            # body is streamed, so only SecRequestBodyLimit bounds it.
            check_request(waf_pb2.EvaluateRequest(
                transaction_id=self.request_id, method=line.method, uri=line.path, http_version=version,
                headers=[waf_pb2.Header(name=n, value=v) for n, v in line.headers], application=self.app,
                ignore_rule_ids=self.ignore, client_ip=client[0] if client[0] else "",
                server_ip=client[2] if client[0] else ""), limits)
        self.tx = self.engine.begin(self.app, self.ignore, self.request_id)
        if client[0]:
            self.tx.connection(*client)
        decided = self.tx.request_headers(line.method, line.path, version, line.headers)
        if decided or headers.end_of_stream:
            return self._end_request("request_headers")
        return CONTINUE["request_headers"]

    def _request_body(self, body: pb.HttpBody) -> pb.ProcessingResponse:
        if self.request_ended:
            return CONTINUE["request_body"]
        decided = self.tx.request_body(body.body) if body.body else False
        buffered = self.request_mode in BUFFERED_MODES
        if decided or body.end_of_stream or buffered:
            truncated = self.request_mode == Mode.BUFFERED_PARTIAL and not body.end_of_stream and not decided
            return self._end_request("request_body", truncated)
        return CONTINUE["request_body"]

    def _end_request(self, kind: str, truncated: bool = False) -> pb.ProcessingResponse:
        verdict = self.tx.end_request(body_truncated=truncated, keep=True)
        self.request_ended = True
        self.engine.request_verdict(self.app, self.request_id, verdict, truncated)
        self.matched += [m.id for m in verdict.matches]
        if envoy_map.blocked(verdict):
            self.result = "denied"
            return immediate(verdict, self.matched if self.debug else None)
        self.result = "allowed"
        return CONTINUE[kind]

    def _response_headers(self, headers: pb.HttpHeaders) -> pb.ProcessingResponse:
        if not self.request_ended:
            # The request's end never came as such (trailers Envoy did not
            # send, a partial buffer): the response proves it is over.
            answer = self._end_request("response_headers")
            if self.result == "denied":
                return answer
        if not self.tx.open:
            return CONTINUE["response_headers"]
        status, pairs = envoy_map.response_status(envoy_map.header_bytes(h) for h in headers.headers.headers)
        limits = getattr(self.engine, "limits", None)
        if limits is not None:
            check_response(waf_pb2.ResponseRequest(
                status=status, headers=[waf_pb2.Header(name=n, value=v) for n, v in pairs]), limits)
        self.response_started = True
        decided = self.tx.response_headers(status, pairs)
        if decided or headers.end_of_stream:
            return self._end_response("response_headers")
        return CONTINUE["response_headers"]

    def _response_body(self, body: pb.HttpBody) -> pb.ProcessingResponse:
        if not (self.response_started and self.tx.open):
            return CONTINUE["response_body"]
        decided = self.tx.response_body(body.body) if body.body else False
        if decided or body.end_of_stream or self.response_mode in BUFFERED_MODES:
            truncated = self.response_mode == Mode.BUFFERED_PARTIAL and not body.end_of_stream and not decided
            return self._end_response("response_body", truncated)
        return CONTINUE["response_body"]

    def _end_response(self, kind: str, truncated: bool = False) -> pb.ProcessingResponse:
        verdict = self.tx.end_response(body_truncated=truncated)
        self.engine.response_verdict(self.request_id, verdict)
        self.matched += [m.id for m in verdict.matches]
        if envoy_map.blocked(verdict):
            self.result = "denied"
            return immediate(verdict, self.matched if self.debug else None)
        if self.debug:
            return self._with_debug_headers(kind, verdict.transaction_id)
        return CONTINUE[kind]

    def _with_debug_headers(self, kind: str, transaction_id: str) -> pb.ProcessingResponse:
        answer = pb.ProcessingResponse()
        answer.CopyFrom(CONTINUE[kind])
        common = getattr(answer, kind).response
        ids = " ".join(map(str, self.matched)) or "-"
        for key, value in (("x-waf-rules", ids), ("x-waf-transaction-id", transaction_id)):
            common.header_mutation.set_headers.add(header=base_pb2.HeaderValue(key=key, raw_value=value.encode()))
        return answer

    def close(self) -> None:
        """Logging runs now if it has not (a response Envoy never sent)."""
        if self.tx is not None:
            self.tx.close()


def _attributes(msg: pb.ProcessingRequest) -> dict:
    """Envoy's `request_attributes` (request.protocol, source.address...),
    sent with the request headers when the config asks for them."""
    struct = msg.attributes.get(ATTRIBUTES_KEY)
    if struct is None:
        return {}
    out = {}
    for key, value in struct.fields.items():
        kind = value.WhichOneof("kind")
        out[key] = value.string_value if kind == "string_value" else value.number_value if kind == "number_value" \
            else ""
    return out


def _ip(address) -> str:
    """source.address is "ip:port" ("[v6]:port"); the engine wants the ip."""
    text = str(address or "")
    if text.startswith("["):
        return text[1:text.find("]")]
    host, sep, port = text.rpartition(":")
    return host if sep and port.isdigit() and host.count(":") == 0 else text


class ExternalProcessorServicer(external_processor_pb2_grpc.ExternalProcessorServicer):
    def __init__(self, engine) -> None:
        self.engine = engine   # wafsvc.metrics.ObservedEngine: counts and logs every verdict
        self.streams = 0       # open now

    def Process(self, call: rpc.Call) -> "ProcessStream":
        stream = ProcessStream(self)
        try:
            metadata = call.invocation_metadata()
            app, ignore = envoy_map.selection(metadata)
            debug = any(key == DEBUG_METADATA and value in ("1", b"1") for key, value in metadata or ())
            stream.exchange = Exchange(self.engine, app, ignore, debug)
        except Exception as exc:
            raise stream.fail(exc) from None
        self.streams += 1
        return stream


class ProcessStream(rpc.Session):
    """One ext_proc stream: one HTTP request and its response. It is not
    ended early when the worker drains (Envoy's request would fail): it runs
    until Envoy ends it or the grace period does."""
    drains = False

    def __init__(self, servicer: ExternalProcessorServicer) -> None:
        self.engine = servicer.engine
        self.servicer = servicer
        self.exchange: Exchange | None = None
        self.failure: EvaluationFailed | None = None

    def receive(self, msg: pb.ProcessingRequest):
        try:
            answer = self.exchange.handle(msg)
        except Exception as exc:
            raise self.fail(exc) from None
        if answer.HasField("immediate_response"):
            self.ended = True   # Envoy ends the stream; nothing more will come
        return (answer,)

    def fail(self, exc: Exception) -> rpc.Abort:
        """The stream's end with the failure's code and reason, counted and
        logged (Envoy's failure mode then decides)."""
        if isinstance(exc, EvaluationFailed):
            failure = exc
        elif isinstance(exc, TransactionStateError):
            failure = EvaluationFailed("FAILED_PRECONDITION", str(exc), waf_pb2.FIELD_INVALID)
        else:  # a bug: fail the stream, never pass it
            log.error("ext_proc stream failed unexpectedly", exc_info=exc)
            failure = EvaluationFailed("INTERNAL", f"unexpected {type(exc).__name__}", waf_pb2.ENGINE_ERROR)
        self.failure = failure
        exchange = self.exchange
        self.engine.envoy_call(API, "error")
        self.engine.failed(exchange.app if exchange else "", exchange.request_id if exchange else "", failure)
        return refusal(failure)

    def close(self) -> None:
        self.servicer.streams -= 1
        exchange = self.exchange
        if exchange is not None:
            try:
                exchange.close()
            except Exception:
                log.exception("ext_proc: closing the transaction failed")
        if self.failure is None:
            self.engine.envoy_call(API, exchange.result if exchange is not None else "abandoned")


def add_to_server(server: rpc.Server, engine) -> str:
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessorServicer(engine), server)
    return SERVICE_NAME
