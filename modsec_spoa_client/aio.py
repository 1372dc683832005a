"""The asyncio client: the same config, models, errors and retry rule as
Client, on grpc.aio.

    async with AsyncClient(target="dns:///wafsvc:50051") as waf:
        verdict = await waf.evaluate(request)
"""

from __future__ import annotations

import grpc

from modsec_spoa_client._shared import Attempts, ClientBase, RequestInput, request_message
from modsec_spoa_client.aio_stream import AsyncEvaluationStream
from modsec_spoa_client.config import ClientConfig
from modsec_spoa_client.models import Application, HttpResponse, Verdict
from wafapi import waf_pb2, waf_pb2_grpc


class AsyncClient(ClientBase):
    _grpc = grpc.aio

    def __init__(self, config: ClientConfig | None = None, **settings) -> None:
        super().__init__(config, **settings)
        # grpc.aio channels belong to the loop they are first used on, so
        # they are made on first use, not here.
        self._channel: grpc.aio.Channel | None = None
        self._main_stub: waf_pb2_grpc.WafStub | None = None

    @property
    def _stub(self) -> waf_pb2_grpc.WafStub:
        if self._main_stub is None:
            self._channel = self._open_channel(balanced=True)
            self._main_stub = waf_pb2_grpc.WafStub(self._channel)
        return self._main_stub

    async def evaluate(self, request: RequestInput, *, inspect_response: bool = False) -> Verdict:
        """See Client.evaluate."""
        message = request_message(request, self.config, inspect_response)
        stub, index = self._request_route(inspect_response)
        return self._learnt(Verdict.from_proto(await self._call(stub.Evaluate, message)), index)

    async def evaluate_response(self, handle: str | Verdict, response: HttpResponse) -> Verdict:
        """See Client.evaluate_response."""
        stub, message = self._response_call(handle, response)
        return Verdict.from_proto(await self._call(stub.EvaluateResponse, message, retries=0))

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
                self._retry_or_raise(attempts, exc)

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
