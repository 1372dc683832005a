"""Bodies cut short before inspection: closed so that the engine parses
what arrived (wafsvc/bodies.py), then judged by the application's policy.
The engine cases run CRS v4.28.0 with the shipped base configuration."""

from __future__ import annotations

import json
import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_response_inspection import crs_dir
from wafapi import waf_pb2
from wafsvc.apps import Application, Applications
from wafsvc.bodies import close_cut_body, close_json, close_multipart, content_type_of
from wafsvc.config import REPO_RULES
from wafsvc.engine import Engine
from wafsvc.rules import RuleSetSpec

BOUNDARY = b"----formdata7MA4YWxk"
MULTIPART = b"multipart/form-data; boundary=" + BOUNDARY
SQLI = b"1' or '1'='1' union select password from users --"


def multipart(*parts: tuple[bytes, bytes | None, bytes]) -> bytes:
    out = b""
    for name, filename, data in parts:
        out += b"--" + BOUNDARY + b"\r\n"
        if filename is None:
            out += b'Content-Disposition: form-data; name="%s"\r\n\r\n' % name
        else:
            out += (b'Content-Disposition: form-data; name="%s"; filename="%s"\r\n'
                    b"Content-Type: application/octet-stream\r\n\r\n" % (name, filename))
        out += data + b"\r\n"
    return out + b"--" + BOUNDARY + b"--\r\n"


def photo(size: int) -> bytes:
    return os.urandom(size).replace(b"--", b"-x").replace(b"\r\n", b"\rx")


# -- closing, without the engine ---------------------------------------------------

def test_a_multipart_body_cut_in_content_is_ended_there():
    body = multipart((b"title", None, b"holiday"), (b"file", b"a.jpg", b"x" * 5000))[:3000]
    closed = close_multipart(body, BOUNDARY)
    assert closed == body + b"\r\n--" + BOUNDARY + b"--\r\n"


def test_a_multipart_body_cut_in_a_delimiter_or_headers_ends_cleanly():
    whole = multipart((b"title", None, b"holiday"), (b"file", b"a.jpg", b"x" * 100))
    second = whole.index(b"--" + BOUNDARY, 10)
    delimiter_end = second + 2 + len(BOUNDARY)
    # Inside the delimiter line (after the delimiter, before its CRLF): the
    # body ends before it.
    for cut in (delimiter_end, delimiter_end + 1):
        assert close_multipart(whole[:cut], BOUNDARY) == whole[:second] + b"--" + BOUNDARY + b"--\r\n"
    # Inside the delimiter itself: those bytes are the previous part's content.
    assert close_multipart(whole[:second + 5], BOUNDARY) == whole[:second + 5] + b"\r\n--" + BOUNDARY + b"--\r\n"
    # Inside the part's headers: they are ended (and still inspected).
    cut = whole[:second + len(BOUNDARY) + 20]
    assert close_multipart(cut, BOUNDARY) == cut + b"\r\n\r\n\r\n--" + BOUNDARY + b"--\r\n"
    # A whole body is left alone, and so is one cut before any delimiter.
    assert close_multipart(whole, BOUNDARY) == whole
    assert close_multipart(b"garbage", BOUNDARY) == b"garbage"


def test_only_one_unambiguous_content_type_is_closed():
    body = b'{"a": "b'
    assert close_cut_body(b"application/json", body) == b'{"a": "b"}'
    assert close_cut_body(b"application/vnd.api+json; charset=utf-8", body) == b'{"a": "b"}'
    assert close_cut_body(b"text/plain", body) == body
    assert close_cut_body(b"multipart/form-data", body) == body          # no boundary
    assert content_type_of([(b"Content-Type", b"a/b"), (b"content-type", b"c/d")]) == b""
    assert content_type_of([(b"Content-Type", b"a/b")]) == b"a/b"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(doc=st.one_of(st.lists(JSON_VALUES, min_size=1, max_size=4),
                     st.dictionaries(st.text(max_size=6), JSON_VALUES, min_size=1, max_size=4)),
       ascii=st.booleans(), data=st.data())
def test_any_cut_json_document_closes_into_valid_json_keeping_what_arrived(doc, ascii, data):
    text = json.dumps(doc, ensure_ascii=ascii).encode()
    cut = data.draw(st.integers(min_value=1, max_value=len(text)))
    closed = close_json(text[:cut])
    json.loads(closed)
    # Everything that arrived is kept but a number or literal that may be
    # cut, or the start of an escape or of a UTF-8 character.
    dropped = text[len(os.path.commonprefix([closed, text[:cut]])):cut]
    assert re.fullmatch(rb"[-+0-9.eEa-z]*", dropped) or len(dropped) <= 5, dropped


def test_broken_json_is_left_for_the_engine_to_refuse():
    for broken in (b'{"a" 1', b'[1 2', b'{"a": 1}}', b'}', b'{"a": 1} [', b'{1: 2'):
        assert close_json(broken) == broken


# -- with CRS: what the engine sees ----------------------------------------------

@pytest.fixture(scope="module")
def crs():
    spec = RuleSetSpec(base_conf=str(REPO_RULES / "modsecurity.conf"), crs_dir=crs_dir(), paranoia=1)
    apps = {"pass": Application("pass", spec), "block": Application("block", spec, truncated_body="block")}
    return Engine(Applications(apps, "pass"))


def upload(body: bytes, cut: int | None, content_type: bytes = MULTIPART, app: str = "pass") -> waf_pb2.EvaluateRequest:
    headers = [(b"host", b"shop.example"), (b"user-agent", b"Mozilla/5.0"), (b"accept", b"*/*"),
               (b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    return waf_pb2.EvaluateRequest(method="POST", uri=b"/upload", client_ip="10.0.0.1", application=app,
                                   headers=[waf_pb2.Header(name=n, value=v) for n, v in headers],
                                   body=body[:cut] if cut else body, body_truncated=bool(cut),
                                   content_length=len(body))


def ids(verdict) -> list[int]:
    return [m.id for m in verdict.matches]


def test_a_clean_2_mb_upload_cut_at_the_buffer_passes_flagged(crs):
    body = multipart((b"title", None, b"holiday"), (b"file", b"beach.jpg", photo(2 * 1024 * 1024)))
    verdict = crs.evaluate(upload(body, 64000))
    assert not verdict.intervention and ids(verdict) == [99010] and verdict.body_truncated
    assert verdict.matches[0].matched_data == f"64000 bytes inspected, {len(body)} declared"
    # Without the closing the multipart parser would fail, and then deny: 400.
    blocked = crs.evaluate(upload(body, 64000, app="block"))
    assert blocked.intervention and blocked.status == 403 and ids(blocked) == [99010]


@pytest.mark.parametrize("where", ["first field", "after a 30 kB file", "after a 60 kB field"])
def test_an_attack_in_the_first_60_kb_of_a_2_mb_upload_is_blocked(crs, where):
    big = photo(2 * 1024 * 1024)
    parts = {"first field": [(b"q", None, SQLI), (b"file", b"a.jpg", big)],
             "after a 30 kB file": [(b"notes", b"n.txt", b"a" * 30000), (b"q", None, SQLI), (b"file", b"a.jpg", big)],
             "after a 60 kB field": [(b"pad", None, b"b" * 60000), (b"q", None, SQLI), (b"file", b"a.jpg", big)]}
    body = multipart(*parts[where])
    assert body.index(SQLI) < 61000
    verdict = crs.evaluate(upload(body, 64000))
    assert verdict.intervention and verdict.status == 403 and 949110 in ids(verdict), ids(verdict)
    assert 942100 in ids(verdict) and ids(verdict)[-1] == 99010


def test_a_cut_json_document_is_inspected_up_to_the_cut(crs):
    doc = {"posts": [{"title": f"post {i}", "body": "lorem ipsum dolor sit amet " * 40} for i in range(200)]}
    text = json.dumps(doc).encode()
    clean = crs.evaluate(upload(text, 60000, b"application/json"))
    assert not clean.intervention and ids(clean) == [99010]
    attack = text[:30000] + text[30000:].replace(b'"body": "', b'"body": "' + SQLI.replace(b"'", b"\\u0027"), 1)
    verdict = crs.evaluate(upload(attack, 60000, b"application/json"))
    assert verdict.intervention and 942100 in ids(verdict), ids(verdict)


def xml_document(*inside: bytes) -> bytes:
    return b"<?xml version='1.0'?><doc>" + b"".join(inside) + b"<item>text</item>" * 4000 + b"</doc>"


def test_a_cut_xml_document_is_closed_inspected_and_passes_flagged(crs):
    # Without the closing libxml2 refuses it: 400 (200002).
    assert ids(crs.evaluate(upload(xml_document(), 30000, b"application/xml"))) == [99010]
    for inside, cut in (
        (b"<item>text</item>" * 1000 + b"<q>" + SQLI + b"</q>", 30000),              # in an element
        (b"<q><![CDATA[" + b"a" * 29000 + SQLI + b"a" * 9000 + b"]]></q>", 29400),   # in CDATA, cut there
        (b"<q v=\"" + b"a " * 14500 + SQLI.replace(b"'", b"&apos;") + b"a" * 9000 + b"\"/>", 29400),  # an attribute
    ):
        body = xml_document(inside)
        assert body.index(b"union select password") < cut - 100     # in the part that arrived
        verdict = crs.evaluate(upload(body, cut, b"text/xml; charset=utf-8"))
        assert verdict.intervention and 942100 in ids(verdict) and ids(verdict)[-1] == 99010, ids(verdict)


def test_a_cut_xml_document_that_cannot_be_closed_is_still_refused(crs):
    # Cut inside its internal subset: what the DOCTYPE would declare is unknown.
    doctype = b"<?xml version='1.0'?><!DOCTYPE d [" + b"<!ENTITY e 'v'>" * 4000 + b"]><d>&e;</d>"
    verdict = crs.evaluate(upload(doctype, 30000, b"application/xml"))
    assert verdict.intervention and verdict.status == 400 and ids(verdict) == [200002, 99010]
