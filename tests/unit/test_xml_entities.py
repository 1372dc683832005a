"""The engine's XML parser never reads an external entity: a request body
that declares one must not make the WAF itself open a file (XXE against the
WAF). Internal entities are expanded, so what they hold is inspected."""

from __future__ import annotations

from wafapi import waf_pb2
from wafsvc.apps import Application, Applications
from wafsvc.config import REPO_RULES
from wafsvc.engine import Engine
from wafsvc.rules import RuleSetSpec

RULES = """\
SecRule REQUEST_HEADERS:Content-Type "@rx xml" "id:1,phase:1,pass,nolog,ctl:requestBodyProcessor=XML"
SecRule XML:/* "@contains SECRET-7f3a" "id:2,phase:2,deny,status:403,log"
SecRule XML:/* "@contains inline-9c1d" "id:3,phase:2,deny,status:403,log"
"""


def _engine(tmp_path) -> Engine:
    rules = tmp_path / "xml.conf"
    rules.write_text(RULES)
    spec = RuleSetSpec(base_conf=str(REPO_RULES / "modsecurity.conf"), rules_file=str(rules))
    return Engine(Applications({"site": Application("site", spec)}, "site"))


def _post_xml(engine: Engine, body: bytes) -> waf_pb2.Verdict:
    headers = [(b"host", b"shop"), (b"content-type", b"application/xml"),
               (b"content-length", str(len(body)).encode())]
    return engine.evaluate(waf_pb2.EvaluateRequest(
        method="POST", uri=b"/api", client_ip="192.0.2.1", body=body, content_length=len(body),
        headers=[waf_pb2.Header(name=n, value=v) for n, v in headers]))


def test_an_external_entity_is_never_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-7f3a\n")
    body = (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file://%s">]><r>&x;</r>'
            % str(secret).encode())
    verdict = _post_xml(_engine(tmp_path), body)
    assert 2 not in [m.id for m in verdict.matches]


def test_an_internal_entity_is_expanded_and_inspected(tmp_path):
    # The control: the same document shape does reach XML:/* with the entity's text.
    body = b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x "inline-9c1d">]><r>&x;</r>'
    verdict = _post_xml(_engine(tmp_path), body)
    assert verdict.intervention and [m.id for m in verdict.matches] == [3]
