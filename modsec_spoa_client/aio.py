"""The asyncio client: the same config, models, errors and retry rule as
Client, on grpc.aio.

    async with AsyncClient(target="dns:///wafsvc:50051") as waf:
        verdict = await waf.evaluate(request)
"""

from __future__ import annotations

import grpc

from modsec_spoa_client._shared import (Attempts, RequestInput, WorkerRoutes, request_message,
                                        response_message)
from modsec_spoa_client.aio_stream import AsyncEvaluationStream
from modsec_spoa_client.config import ClientConfig
from modsec_spoa_client.errors import from_rpc_error
from modsec_spoa_client.models import Application, HttpResponse, Verdict
from wafapi import waf_pb2, waf_pb2_grpc


def _channel(config: ClientConfig, balanced: bool, index: int = 0) -> grpc.aio.Channel:
    options = config.options(balanced) + [("modsec_spoa.channel", index)]
    credentials = config.credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(config.target, options=options)
    return grpc.aio.secure_channel(config.target, credentials, options=options)


class AsyncClient:
    def __init__(self, config: ClientConfig | None = None, **settings) -> None:
        self.config = config.replace(**settings) if config is not None else ClientConfig(**settings)
        self._metadata = self.config.metadata()
        # grpc.aio channels belong to the loop they are first used on, so
        # they are made on first use, not here.
        self._channel: grpc.aio.Channel | None = None
        self._main_stub: waf_pb2_grpc.WafStub | None = None
        self._routes = WorkerRoutes(self.config.response_channels)
        self._pinned: list[tuple[grpc.aio.Channel, waf_pb2_grpc.WafStub]] = []
        self.retries = 0

    @property
    def _stub(self) -> waf_pb2_grpc.WafStub:
        if self._main_stub is None:
            self._channel = _channel(self.config, balanced=True)
            self._main_stub = waf_pb2_grpc.WafStub(self._channel)
        return self._main_stub

    async def evaluate(self, request: RequestInput, *, inspect_response: bool = False) -> Verdict:
        """See Client.evaluate."""
        message = request_message(request, self.config, inspect_response)
        if not inspect_response:
            return Verdict.from_proto(await self._call(self._stub.Evaluate, message))
        index = self._routes.next_index()
        verdict = Verdict.from_proto(await self._call(self._pinned_stub(index).Evaluate, message))
        if verdict.transaction_handle:
            self._routes.learn(verdict.transaction_handle, index)
        return verdict

    async def evaluate_response(self, handle: str | Verdict, response: HttpResponse) -> Verdict:
        """See Client.evaluate_response."""
        if isinstance(handle, Verdict):
            handle = handle.transaction_handle
        stub = self._pinned_stub(self._routes.index_for(handle))
        return Verdict.from_proto(await self._call(stub.EvaluateResponse, response_message(handle, response),
                                                   retries=0))

    async def list_applications(self) -> tuple[list[Application], str]:
        reply = await self._call(self._stub.ListApplications, waf_pb2.ListApplicationsRequest())
        return [Application.from_proto(app) for app in reply.applications], reply.unknown_application

    def stream(self) -> AsyncEvaluationStream:
        return AsyncEvaluationStream(self._stub, self.config, self._metadata)

    async def _call(self, method, message, retries: int | None = None):
        attempts = Attempts(self.config, retries)
        while True:
            try:
                return await method(message, timeout=attempts.remaining(), metadata=self._metadata)
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

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        for channel, _ in self._pinned:
            await channel.close()
        self._pinned.clear()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
