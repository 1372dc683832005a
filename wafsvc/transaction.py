"""One HTTP transaction through libmodsecurity, fed as it arrives: the engine
API that the gRPC service, the held-transaction store and other front ends
(Envoy's ext_proc) build on. No gRPC here; verdicts are waf.v1.Verdict
messages.

Get one from the engine (wafsvc/engine.py), which picks the rule set:

    tx = engine.begin(app="", ignore_rule_ids=(), transaction_id="req-1")
    tx.connection("203.0.113.7", 51234, "10.0.0.5", 443)       # optional
    if not tx.request_headers("POST", b"/upload?x=1", "1.1", headers):
        for chunk in body_chunks:          # as they arrive (Envoy STREAMED mode)
            if tx.request_body(chunk):     # True: the engine decided; stop feeding
                break
    verdict = tx.end_request(keep=True)    # phases 1-2 -> Verdict
    if tx.open:                            # it passed and was kept for its response
        if not tx.response_headers(200, headers):
            for chunk in response_chunks:
                if tx.response_body(chunk):
                    break
        verdict = tx.end_response()        # phases 3-4, then logging -> Verdict
    tx.close()                             # always safe: logging runs exactly once

Methods, in the order they may be called:

- ``connection(client_ip="", client_port=0, server_ip="", server_port=0)``
- ``request_headers(method, uri: bytes, http_version, headers) -> bool``:
  the request line and headers, phase 1. ``headers`` is an iterable of
  ``(name, value)`` bytes or str pairs, order and duplicates kept.
- ``request_body(chunk: bytes) -> bool``: any number of times, phase 2 input.
- ``end_request(verdict=None, *, body_truncated=False, content_length=-1,
  keep=False) -> Verdict``: runs phase 2 and gives the request's verdict.
  A body cut short (body_truncated) is flagged and judged by the
  application's policy; run_request also closes a cut multipart, JSON or
  XML body so that it parses (wafsvc/bodies.py): feed a cut body through
  ``bodies.close_cut_body`` before request_body() to get the same here.
  ``keep=False`` ends the transaction (logging runs first, so phase-5
  matches are in the verdict). ``keep=True`` leaves a request that passed
  open for its response; a blocked request is never kept (no response phase).
- ``response_headers(status, headers, http_version="") -> bool``: phase 3.
- ``response_body(chunk: bytes) -> bool``: any number of times.
- ``end_response(verdict=None, *, body_truncated=False, content_length=-1)
  -> Verdict``: phase 4, then logging; the verdict lists the matches of
  phases 3 to 5 only (the request's were in its own verdict).
- ``close()``: logging, once, if it has not run; then the engine's memory
  for the transaction is freed. Call it for a transaction you abandon.
- ``run_request(req: EvaluateRequest, verdict=None, keep=False)`` and
  ``run_response(resp: ResponseRequest, verdict=None)``: one whole message
  each, for the gRPC service (the hot path is run_request with keep=False).

A step returning True means a disruptive intervention: the engine has
decided, further chunks are ignored, and end_request / end_response give
the verdict. Out-of-order calls raise TransactionStateError (a caller bug).
Engine failures raise EvaluationFailed (ENGINE_ERROR). One transaction is
used by one caller at a time; libmodsecurity holds the GIL throughout.

The RulesSet: libmodsecurity's transaction points at the rule set it
started with. This object holds a reference to it (as does the binding's
Transaction, through pybind11's keep_alive), so a rule reload can never
free a rule set under a live transaction: it finishes on the rules it
started with, and the old set is freed when its last transaction ends.
"""

from __future__ import annotations

import time

import libmodsecurity

from wafapi import waf_pb2
from wafsvc.bodies import close_cut_body, content_type_of
from wafsvc.errors import engine_error
from wafsvc.phases import Policy, fill, flag_truncated

ENGINE_ERRORS = (RuntimeError, ValueError, TypeError)

# States, in order.
NEW, REQUEST, KEPT, RESPONSE, CLOSED = range(5)
_STATE_NAMES = ("new", "reading the request", "kept for its response", "reading the response", "closed")


class TransactionStateError(RuntimeError):
    """A step was called out of order (a bug in the caller)."""


class Transaction:
    __slots__ = ("_tx", "rules", "policy", "app", "generation", "id", "http_version", "_state", "_decision",
                 "_request_bytes", "_response_bytes", "_request_matches", "_ns")

    def __init__(self, modsec: libmodsecurity.ModSecurity, rules: libmodsecurity.RulesSet, policy: Policy,
                 transaction_id: str = "", app: str = "", generation: int = 0) -> None:
        self._tx = libmodsecurity.Transaction(modsec, rules, transaction_id or None)
        self.rules = rules             # see the module docstring: outlives every step
        self.policy = policy
        self.app = app
        self.generation = generation   # which rule load it started on (Engine.generation)
        self.id: str = self._tx.id
        self.http_version = "1.1"
        self._state = NEW
        self._decision = None          # the disruptive intervention, once there is one
        self._request_bytes = 0
        self._response_bytes = 0
        self._request_matches = 0      # rule messages reported with the request's verdict
        self._ns = 0                   # engine time of the current side

    # -- state -------------------------------------------------------------
    @property
    def open(self) -> bool:
        """Kept after a request that passed, its response not yet ended."""
        return self._state in (KEPT, RESPONSE)

    @property
    def closed(self) -> bool:
        return self._state == CLOSED

    def _expect(self, *states: int) -> None:
        if self._state not in states:
            raise TransactionStateError(f"transaction {self.id}: not allowed while {_STATE_NAMES[self._state]}")

    def _intervened(self) -> bool:
        intervention = self._tx.intervention()
        if intervention is not None and intervention.disruptive:
            self._decision = intervention
            return True
        return False

    def _step(self, call, *args) -> bool:
        """One engine call, timed, then whether it intervened (the body steps)."""
        started = time.perf_counter_ns()
        try:
            call(*args)
            return self._intervened()
        except ENGINE_ERRORS as exc:
            raise engine_error(exc) from None
        finally:
            self._ns += time.perf_counter_ns() - started

    def _verdict(self, verdict, started: int, messages, body_truncated: bool, response: bool,
                 body_bytes: int, content_length: int) -> waf_pb2.Verdict:
        """The verdict of one side: what the engine decided, its matches, the
        engine time, and the truncation flag when the body was cut."""
        elapsed = self._ns + time.perf_counter_ns() - started
        if verdict is None:
            verdict = waf_pb2.Verdict()
        fill(verdict, self.id, self._decision, messages, elapsed // 1000)
        if body_truncated:
            flag_truncated(verdict, self.policy, response, body_bytes, content_length)
        verdict.application = self.app
        return verdict

    # -- the request -------------------------------------------------------
    def connection(self, client_ip: str = "", client_port: int = 0, server_ip: str = "",
                   server_port: int = 0) -> None:
        self._expect(NEW)
        started = time.perf_counter_ns()
        try:
            self._tx.process_connection(client_ip or "0.0.0.0", client_port, server_ip or "0.0.0.0", server_port)
        except ENGINE_ERRORS as exc:
            raise engine_error(exc) from None
        self._state = REQUEST
        self._ns += time.perf_counter_ns() - started

    def request_headers(self, method: str, uri: bytes | str, http_version: str, headers) -> bool:
        if self._state == NEW:
            self.connection()
        self._expect(REQUEST)
        started = time.perf_counter_ns()
        try:
            tx = self._tx
            self.http_version = http_version or "1.1"
            tx.process_uri(uri, method, self.http_version)
            if not self._intervened():
                for name, value in headers:
                    tx.add_request_header(name, value)
                tx.process_request_headers()
                self._intervened()
        except ENGINE_ERRORS as exc:
            raise engine_error(exc) from None
        finally:
            self._ns += time.perf_counter_ns() - started
        return self._decision is not None

    def request_body(self, chunk: bytes) -> bool:
        self._expect(REQUEST)
        if self._decision is not None:
            return True
        self._request_bytes += len(chunk)
        # The body limit (SecRequestBodyLimitAction Reject) intervenes here.
        return self._step(self._tx.append_request_body, chunk)

    def end_request(self, verdict: waf_pb2.Verdict | None = None, *, body_truncated: bool = False,
                    content_length: int = -1, keep: bool = False) -> waf_pb2.Verdict:
        self._expect(REQUEST)
        started = time.perf_counter_ns()
        try:
            if self._decision is None:
                # Phase 2 always runs, even without a body: CRS decides there (949110).
                self._tx.process_request_body()
                self._intervened()
        except ENGINE_ERRORS as exc:
            raise engine_error(exc) from None
        return self._request_verdict(verdict, started, body_truncated, content_length, keep)

    def run_request(self, req: waf_pb2.EvaluateRequest, verdict: waf_pb2.Verdict | None = None,
                    keep: bool = False) -> waf_pb2.Verdict:
        """The whole request from one message: phases 1 and 2, stopping at
        the first disruptive intervention as the nginx connector does.
        The hot path: as few Python calls between engine calls as possible."""
        if self._state != NEW:
            self._expect(NEW)
        started = time.perf_counter_ns()
        tx = self._tx
        try:
            tx.process_connection(req.client_ip or "0.0.0.0", req.client_port,
                                  req.server_ip or "0.0.0.0", req.server_port)
            self.http_version = req.http_version or "1.1"
            tx.process_uri(req.uri, req.method, self.http_version)
            decision = tx.intervention()
            if decision is None or not decision.disruptive:
                add_header = tx.add_request_header
                for header in req.headers:
                    add_header(header.name, header.value)
                tx.process_request_headers()
                decision = tx.intervention()
                if decision is None or not decision.disruptive:
                    body = req.body
                    if body:
                        self._request_bytes = len(body)
                        if req.body_truncated:
                            # Closed where it was cut, so that multipart, JSON
                            # and XML parse (wafsvc/bodies.py).
                            body = close_cut_body(content_type_of((h.name, h.value) for h in req.headers), body)
                        tx.append_request_body(body)
                    tx.process_request_body()
                    decision = tx.intervention()
        except ENGINE_ERRORS as exc:
            raise engine_error(exc) from None
        if decision is not None and decision.disruptive:
            self._decision = decision
        self._state = REQUEST
        return self._request_verdict(verdict, started, req.body_truncated, req.content_length, keep)

    def _request_verdict(self, verdict, started: int, body_truncated: bool, content_length: int,
                         keep: bool) -> waf_pb2.Verdict:
        """Logging unless the transaction stays open, then the verdict. A
        request that is denied (by a rule or by the truncation policy) is
        never kept: it has no response phase."""
        kept = keep and self._decision is None and not (
            body_truncated and self.policy.denies_truncated(self._request_bytes))
        tx = self._tx
        try:
            if not kept:
                tx.process_logging()
            messages = tx.get_rule_messages()
        except ENGINE_ERRORS as exc:
            raise engine_error(exc) from None
        verdict = self._verdict(verdict, started, messages, body_truncated, False, self._request_bytes,
                                content_length)
        if kept:
            self._state, self._request_matches, self._ns = KEPT, len(messages), 0
        else:
            self._finish()
        return verdict

    # -- the response ------------------------------------------------------
    def response_headers(self, status: int, headers, http_version: str = "") -> bool:
        self._expect(KEPT)
        self._state = RESPONSE
        started = time.perf_counter_ns()
        try:
            tx = self._tx
            for name, value in headers:
                tx.add_response_header(name, value)
            tx.process_response_headers(status, "HTTP/" + (http_version or self.http_version))
            return self._intervened()
        except ENGINE_ERRORS as exc:
            raise engine_error(exc) from None
        finally:
            self._ns += time.perf_counter_ns() - started

    def response_body(self, chunk: bytes) -> bool:
        self._expect(RESPONSE)
        if self._decision is not None:
            return True
        self._response_bytes += len(chunk)
        # Past SecResponseBodyLimit the engine keeps what fits (ProcessPartial)
        # and inspects that.
        return self._step(self._tx.append_response_body, chunk)

    def end_response(self, verdict: waf_pb2.Verdict | None = None, *, body_truncated: bool = False,
                     content_length: int = -1) -> waf_pb2.Verdict:
        self._expect(RESPONSE)
        started = time.perf_counter_ns()
        try:
            if self._decision is None:
                self._tx.process_response_body()
                self._intervened()
            self._tx.process_logging()
            messages = self._tx.get_rule_messages()[self._request_matches:]
        except ENGINE_ERRORS as exc:
            self.close()
            raise engine_error(exc) from None
        verdict = self._verdict(verdict, started, messages, body_truncated, True, self._response_bytes,
                                content_length)
        self._finish()
        return verdict

    def run_response(self, resp: waf_pb2.ResponseRequest,
                     verdict: waf_pb2.Verdict | None = None) -> waf_pb2.Verdict:
        """The whole response from one message: phases 3 and 4, then logging.
        A failure ends the transaction (logged) before it is raised."""
        try:
            if not self.response_headers(resp.status, ((h.name, h.value) for h in resp.headers),
                                         resp.http_version):
                if resp.body:
                    self.response_body(resp.body)
        except Exception:
            self.close()
            raise
        return self.end_response(verdict, body_truncated=resp.body_truncated, content_length=resp.content_length)

    # -- the end -----------------------------------------------------------
    def close(self) -> None:
        """Ends the transaction: logging (the audit log entry) if it has not
        run yet, then the engine's memory is released. Idempotent."""
        if self._state == CLOSED:
            return
        try:
            self._tx.process_logging()
        except ENGINE_ERRORS:
            pass  # nothing left to decide; the transaction is gone either way
        self._finish()

    def _finish(self) -> None:
        self._state = CLOSED
        # Frees the C++ transaction now, even while this object is still
        # referenced (logs, a caller); then the rule set may go too. In this
        # order: the transaction never outlives its rules.
        self._tx = None
        self.rules = None
