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

from modsec_spoa_client._shared import (Attempts, RequestInput, WorkerRoutes, request_message,
                                        response_message)
from modsec_spoa_client.config import ClientConfig
from modsec_spoa_client.errors import from_rpc_error
from modsec_spoa_client.models import Application, HttpResponse, Verdict
from modsec_spoa_client.stream import EvaluationStream
from wafapi import waf_pb2, waf_pb2_grpc


def _channel(config: ClientConfig, balanced: bool, index: int = 0) -> grpc.Channel:
    options = config.options(balanced) + [("modsec_spoa.channel", index)]
    credentials = config.credentials()
    if credentials is None:
        return grpc.insecure_channel(config.target, options=options)
    return grpc.secure_channel(config.target, credentials, options=options)


class Client:
    def __init__(self, config: ClientConfig | None = None, **settings) -> None:
        """`Client(ClientConfig(...))`, or the config's fields as keywords."""
        self.config = config.replace(**settings) if config is not None else ClientConfig(**settings)
        self._metadata = self.config.metadata()
        self._channel = _channel(self.config, balanced=True)
        self._stub = waf_pb2_grpc.WafStub(self._channel)
        # Response inspection: the request and its response must reach the
        # same worker, so they travel on pinned connections (pick_first).
        self._routes = WorkerRoutes(self.config.response_channels)
        self._pinned: list[tuple[grpc.Channel, waf_pb2_grpc.WafStub]] = []
        self.retries = 0  # attempts beyond the first, over this client's life

    # -- calls -------------------------------------------------------------
    def evaluate(self, request: RequestInput, *, inspect_response: bool = False) -> Verdict:
        """Phases 1 and 2 of one request (an HttpRequest or raw HTTP bytes).

        With inspect_response=True the transaction is kept on the worker
        when the application inspects responses and the request passed; pass
        the verdict (or its transaction_handle) to evaluate_response()."""
        message = request_message(request, self.config, inspect_response)
        if not inspect_response:
            return Verdict.from_proto(self._call(self._stub.Evaluate, message))
        index = self._routes.next_index()
        verdict = Verdict.from_proto(self._call(self._pinned_stub(index).Evaluate, message))
        if verdict.transaction_handle:
            self._routes.learn(verdict.transaction_handle, index)
        return verdict

    def evaluate_response(self, handle: str | Verdict, response: HttpResponse) -> Verdict:
        """Phases 3 and 4 of a kept transaction, on the connection that reaches
        the worker holding it. Not retried: a transaction is used once.
        Raises TransactionLost when the transaction is gone."""
        if isinstance(handle, Verdict):
            handle = handle.transaction_handle
        stub = self._pinned_stub(self._routes.index_for(handle))
        return Verdict.from_proto(self._call(stub.EvaluateResponse, response_message(handle, response),
                                             retries=0))

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
                error = from_rpc_error(exc)
            if not attempts.again(error):
                raise error
            self.retries += 1

    def _pinned_stub(self, index: int) -> waf_pb2_grpc.WafStub:
        while len(self._pinned) <= index:
            channel = _channel(self.config, balanced=False, index=len(self._pinned) + 1)
            self._pinned.append((channel, waf_pb2_grpc.WafStub(channel)))
        return self._pinned[index][1]

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
