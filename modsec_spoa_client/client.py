"""The blocking client.

    with Client(target="dns:///wafsvc:50051") as waf:
        verdict = waf.evaluate(HttpRequest("GET", "/?q=1", headers={"Host": "shop"}))
        if verdict.blocked: ...

Unary calls go round robin over every replica; a retryable failure is tried
again on the next one within the deadline. For high rates, `stream()` opens
a batched EvaluateStream (see stream.py).
"""

from __future__ import annotations

import grpc

from modsec_spoa_client._shared import Attempts, ClientBase, RequestInput, request_message
from modsec_spoa_client.config import ClientConfig
from modsec_spoa_client.models import Application, HttpResponse, Verdict
from modsec_spoa_client.stream import EvaluationStream
from wafapi import waf_pb2, waf_pb2_grpc


class Client(ClientBase):
    def __init__(self, config: ClientConfig | None = None, **settings) -> None:
        """`Client(ClientConfig(...))`, or the config's fields as keywords."""
        super().__init__(config, **settings)
        self._channel = self._open_channel(balanced=True)
        self._stub = waf_pb2_grpc.WafStub(self._channel)

    # -- calls -------------------------------------------------------------
    def evaluate(self, request: RequestInput, *, inspect_response: bool = False) -> Verdict:
        """Phases 1 and 2 of one request (an HttpRequest or raw HTTP bytes).

        With inspect_response=True the transaction is kept on the worker
        when the application inspects responses and the request passed; pass
        the verdict (or its transaction_handle) to evaluate_response()."""
        message = request_message(request, self.config, inspect_response)
        stub, index = self._request_route(inspect_response)
        return self._learnt(Verdict.from_proto(self._call(stub.Evaluate, message)), index)

    def evaluate_response(self, handle: str | Verdict, response: HttpResponse) -> Verdict:
        """Phases 3 and 4 of a kept transaction, on the connection that reaches
        the worker holding it. Not retried: a transaction is used once.
        Raises TransactionLost when the transaction is gone."""
        stub, message = self._response_call(handle, response)
        return Verdict.from_proto(self._call(stub.EvaluateResponse, message, retries=0))

    def list_applications(self) -> tuple[list[Application], str]:
        """The configured applications and what wafsvc does with unknown names."""
        reply = self._call(self._stub.ListApplications, waf_pb2.ListApplicationsRequest())
        return [Application.from_proto(app) for app in reply.applications], reply.unknown_application

    def stream(self) -> EvaluationStream:
        """A batched EvaluateStream; close it (or use `with`) when done."""
        return EvaluationStream(self._stub, self.config, self._metadata)

    def _call(self, method, message, retries: int | None = None):
        attempts = Attempts(self.config, retries)
        while True:
            try:
                return method(message, timeout=attempts.remaining(), metadata=self._metadata)
            except grpc.RpcError as exc:
                self._retry_or_raise(attempts, exc)

    # -- lifecycle ---------------------------------------------------------
    def close(self) -> None:
        self._channel.close()
        for channel, _ in self._pinned:
            channel.close()
        self._pinned.clear()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Client"]
