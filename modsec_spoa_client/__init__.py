"""Python client for modsec-spoa's wafsvc (waf.v1.Waf over gRPC).

    from modsec_spoa_client import Client, HttpRequest
    with Client(target="127.0.0.1:50051") as waf:
        verdict = waf.evaluate(HttpRequest("GET", "/?q=1", headers={"Host": "example"}))
        print(verdict.blocked, verdict.rule_ids)

Client (blocking) and AsyncClient (asyncio) share ClientConfig, the models
and the exception tree (errors.py). Middleware: modsec_spoa_client.asgi and
modsec_spoa_client.wsgi. Command line: `modsec-spoa` (cli.py).
"""

from modsec_spoa_client.aio import AsyncClient
from modsec_spoa_client.aio_stream import AsyncEvaluationStream
from modsec_spoa_client.client import Client
from modsec_spoa_client.config import TLS, ClientConfig
from modsec_spoa_client.errors import (AuthError, EngineError, ErrorReason, IgnoreListRefused, InvalidRequest,
                                       TransactionLost, UnknownApplication, WafError, WafTimeout,
                                       WafUnavailable)
from modsec_spoa_client.models import Action, Application, HttpRequest, HttpResponse, RuleMatch, Verdict
from modsec_spoa_client.rawhttp import RawRequestError, parse_request, request_from_url
from modsec_spoa_client.stream import EvaluationStream

__all__ = [
    "Client", "AsyncClient", "ClientConfig", "TLS", "EvaluationStream", "AsyncEvaluationStream",
    "HttpRequest", "HttpResponse", "Verdict", "RuleMatch", "Action", "Application",
    "WafError", "WafUnavailable", "WafTimeout", "InvalidRequest", "IgnoreListRefused", "UnknownApplication",
    "TransactionLost", "EngineError", "AuthError", "ErrorReason",
    "RawRequestError", "parse_request", "request_from_url",
]
