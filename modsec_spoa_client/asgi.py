"""ASGI middleware (Starlette, FastAPI, any ASGI app): every HTTP request is
evaluated before the app sees it.

    app = WafMiddleware(app, AsyncClient(target="dns:///wafsvc:50051"))
    # Starlette / FastAPI: app.add_middleware(WafMiddleware, client=AsyncClient(...))

A blocked request gets the verdict's status (403) from the middleware; a
passed one reaches the app with its body intact (read here, then replayed).
With no verdict the failure policy applies: "closed" (default) answers 503,
"open" lets the request through. The verdict (None when the policy let it
through) is in scope["state"]["waf_verdict"], i.e. request.state.waf_verdict.
"""

from __future__ import annotations

from modsec_spoa_client.aio import AsyncClient
from modsec_spoa_client.errors import WafError
from modsec_spoa_client.models import HttpRequest
from modsec_spoa_client.policy import Decision, Middleware, Outcome, decide


class WafMiddleware(Middleware):
    client: AsyncClient

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        inspect_limit = self.client.config.max_body_bytes
        chunks, complete = [], False
        size = 0
        while not complete and not (inspect_limit and size > inspect_limit):
            message = await receive()
            if message["type"] != "http.request":  # disconnected before the body ended
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            complete = not message.get("more_body", False)
        body = b"".join(chunks)
        try:
            verdict, error = await self.client.evaluate(self._request(scope, body, complete)), None
        except WafError as exc:
            verdict, error = None, exc
        decision = decide(verdict, error, self.failure_policy)
        if decision.outcome is Outcome.BLOCK:
            await _answer(send, decision)
            return
        scope.setdefault("state", {})["waf_verdict"] = decision.verdict
        await self.app(scope, _replay(body, complete, receive), send)

    def _request(self, scope, body: bytes, complete: bool) -> HttpRequest:
        path = scope.get("raw_path") or scope["path"].encode("utf-8")
        query = scope.get("query_string", b"")
        headers = scope.get("headers", ())
        declared = next((v for k, v in headers if k == b"content-length"), None)
        client = scope.get("client") or ("", 0)
        server = scope.get("server") or ("", 0)
        return HttpRequest(
            method=scope["method"], uri=path + b"?" + query if query else path, headers=headers, body=body,
            http_version=scope.get("http_version", "1.1"), client_ip=client[0] or "", client_port=client[1] or 0,
            server_ip=server[0] or "", server_port=server[1] or 0, application=self.application,
            body_truncated=not complete,
            content_length=int(declared) if declared is not None and declared.isdigit() else None)


def _replay(body: bytes, complete: bool, receive):
    """The app's receive: the body read for inspection first, then the rest."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": not complete}
        return await receive()
    return replayed


async def _answer(send, decision: Decision) -> None:
    body = decision.body
    await send({"type": "http.response.start", "status": decision.status,
                "headers": decision.headers + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
