"""Small apps protected by the middleware, served by real servers in the
middleware tests (uvicorn for ASGI, waitress for WSGI). Settings come from
the environment: MODSEC_SPOA_* for the client, FAILURE_POLICY for the
middleware."""

from __future__ import annotations

import hashlib
import os

from modsec_spoa_client import AsyncClient, Client, ClientConfig
from modsec_spoa_client.asgi import WafMiddleware
from modsec_spoa_client.wsgi import WafWSGIMiddleware


def _summary(method: str, body: bytes, verdict) -> dict:
    return {"method": method, "length": len(body), "sha256": hashlib.sha256(body).hexdigest(),
            "verdict": None if verdict is None else verdict.to_dict()}


def asgi_app():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def echo(request):
        body = await request.body()
        return JSONResponse(_summary(request.method, body, getattr(request.state, "waf_verdict", None)))

    app = Starlette(routes=[Route("/{path:path}", echo, methods=["GET", "POST", "PUT"])])
    app.add_middleware(WafMiddleware, client=AsyncClient(ClientConfig.from_env()),
                       failure_policy=os.environ.get("FAILURE_POLICY", "closed"))
    return app


def wsgi_app():
    from flask import Flask, jsonify, request

    app = Flask(__name__)

    @app.route("/", defaults={"path": ""}, methods=["GET", "POST", "PUT"])
    @app.route("/<path:path>", methods=["GET", "POST", "PUT"])
    def echo(path):
        body = request.get_data()
        return jsonify(_summary(request.method, body, request.environ.get("modsec_spoa.verdict")))

    app.wsgi_app = WafWSGIMiddleware(app.wsgi_app, Client(ClientConfig.from_env()),
                                     failure_policy=os.environ.get("FAILURE_POLICY", "closed"))
    return app
