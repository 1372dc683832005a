"""Response inspection in the engine: real libmodsecurity, CRS v4.28.0 and
the shipped rules/modsecurity.conf. Phases 3-4 run on the SAME transaction
as the request's phases 1-2, kept in the worker's store between the two."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from wafapi import waf_pb2
from wafsvc.apps import Application, Applications
from wafsvc.config import REPO_RULES
from wafsvc.engine import Engine
from wafsvc.errors import EvaluationFailed
from wafsvc.held import Reason
from wafsvc.responses import Responses, TransactionMiss
from wafsvc.rules import RuleSetSpec
from wafsvc.transaction import TransactionStateError

ROOT = pathlib.Path(__file__).resolve().parents[2]
BASE = str(REPO_RULES / "modsecurity.conf")
H = waf_pb2.Header
BROWSER = [(b"host", b"shop.example.com"), (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64; rv:128.0)"),
           (b"accept", b"text/html,*/*;q=0.8"), (b"accept-language", b"en-GB,en;q=0.7")]
HTML = [(b"content-type", b"text/html; charset=utf-8")]
WORKER = "test-host/1/2"


def crs_dir() -> str:
    for candidate in (os.environ.get("CRS_DIR", ""), str(ROOT.parent / "shared" / "crs" / "v4.28.0"),
                      str(ROOT.parent.parent / "shared" / "crs" / "v4.28.0"), "/work/shared/crs/v4.28.0"):
        if candidate and os.path.isfile(os.path.join(candidate, "rules", "RESPONSE-951-DATA-LEAKAGES-SQL.conf")):
            return candidate
    pytest.fail("CRS v4.28.0 not found beside the checkout (../shared/crs/v4.28.0) nor in CRS_DIR")


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def crs_engine():
    return Engine({"": RuleSetSpec(base_conf=BASE, crs_dir=crs_dir(), paranoia=1)})


def request(uri=b"/", headers=BROWSER, keep=True, **kw) -> waf_pb2.EvaluateRequest:
    return waf_pb2.EvaluateRequest(transaction_id=kw.pop("transaction_id", "req-1"), method=kw.pop("method", "GET"),
                                   uri=uri, headers=[H(name=n, value=v) for n, v in headers],
                                   inspect_response=keep, **kw)


def response(handle: str, body: bytes, headers=HTML, status=200, **kw) -> waf_pb2.ResponseRequest:
    return waf_pb2.ResponseRequest(transaction_handle=handle, status=status, body=body,
                                   headers=[H(name=n, value=v) for n, v in headers], **kw)


def roundtrip(responses: Responses, body: bytes, headers=HTML, req=None) -> waf_pb2.Verdict:
    verdict = responses.evaluate(req or request())
    assert verdict.action == waf_pb2.ACTION_PASS and verdict.transaction_handle.startswith(WORKER + "#")
    return responses.evaluate_response(response(verdict.transaction_handle, body, headers))


@pytest.fixture
def crs(crs_engine):
    return Responses(crs_engine, WORKER, 35000, 100)


def ids(verdict) -> list[int]:
    return [m.id for m in verdict.matches]


# -- CRS response rules ------------------------------------------------------

def test_sql_error_leak_is_blocked_in_phase_4(crs):
    verdict = roundtrip(crs, b"<html><body>Warning: SQL Error: ORA-00933: SQL command not properly ended"
                             b"</body></html>")
    assert verdict.intervention and verdict.status == 403 and verdict.action == waf_pb2.ACTION_DENY
    assert 951120 in ids(verdict) and 959100 in ids(verdict)
    assert {m.phase for m in verdict.matches} == {4}


def test_php_source_leak_is_blocked(crs):
    verdict = roundtrip(crs, b"<?php echo \"Hello World!\\n\" ?>", headers=[(b"content-type", b"text/plain")])
    assert verdict.intervention and 953120 in ids(verdict) and 959100 in ids(verdict)


def test_directory_listing_is_blocked(crs):
    page = (b"<html><head><title>Index of /backup</title></head><body><h1>Index of /backup</h1>"
            b"<a href=\"db.sql\">db.sql</a></body></html>")
    verdict = roundtrip(crs, page)
    assert verdict.intervention and 950130 in ids(verdict)


def test_a_benign_page_passes_with_no_match(crs):
    verdict = roundtrip(crs, b"<html><head><title>Trail runner</title></head><body>In stock.</body></html>")
    assert verdict.action == waf_pb2.ACTION_PASS and not verdict.matches
    assert verdict.transaction_id == "req-1" and not verdict.transaction_handle


def test_bodies_of_types_not_listed_are_not_inspected(crs):
    leak = b"SQL Error: ORA-00933: SQL command not properly ended"
    assert not roundtrip(crs, leak, headers=[(b"content-type", b"application/octet-stream")]).matches
    assert roundtrip(crs, leak, headers=[(b"content-type", b"text/plain")]).intervention


def test_response_phases_see_the_request_phases_scores():
    """RESPONSE-959 and 980 work on the transaction's TX collection, so the
    inbound score of phases 1-2 is still there in phases 3 to 5: a rule in
    each of those phases reports what it sees."""
    probes = ("SecAction \"id:1003,phase:3,pass,log,msg:'phase 3 inbound=%{tx.blocking_inbound_anomaly_score}'\"\n"
              "SecAction \"id:1005,phase:5,pass,log,msg:'phase 5 combined=%{tx.anomaly_score} "
              "inbound=%{tx.blocking_inbound_anomaly_score} outbound=%{tx.blocking_outbound_anomaly_score}'\"")
    engine = Engine({"": RuleSetSpec(base_conf=BASE, crs_dir=crs_dir(), paranoia=1, extra_directives=probes)})
    responses = Responses(engine, WORKER, 35000, 10)
    numeric_host = request(headers=[(b"host", b"127.0.0.1"), *BROWSER[1:]])     # 920350: 3 points, passes
    first = responses.evaluate(numeric_host)
    assert ids(first) == [920350] and not first.intervention
    verdict = responses.evaluate_response(response(first.transaction_handle, b"<html>ORA-00933: SQL command</html>"))
    messages = {m.id: m.message for m in verdict.matches}
    assert 920350 not in messages                        # reported with the request, not again
    assert messages[1003] == "phase 3 inbound=3"
    assert 951120 in messages and 959100 in messages     # outbound score 5 -> RESPONSE-959 blocks
    # RESPONSE-980 (980099, phase 5) adds inbound and outbound into tx.anomaly_score.
    assert messages[1005] == "phase 5 combined=8 inbound=3 outbound=5"


def test_tx_variables_of_the_request_reach_the_response():
    rules = ("SecRuleEngine On\n"
             "SecRule ARGS:user \"@rx ^(.+)$\" \"id:11,phase:1,pass,nolog,capture,setvar:tx.user=%{TX.1}\"\n"
             "SecRule RESPONSE_BODY \"@within %{tx.user}\" \"id:41,phase:4,deny,status:403,log,"
             "msg:'response names the requesting user'\"\n")
    engine = Engine({"": RuleSetSpec(base_conf=BASE, extra_directives=rules)})
    responses = Responses(engine, WORKER, 35000, 10)
    kept = responses.evaluate(request(uri=b"/?user=alice"))
    verdict = responses.evaluate_response(response(kept.transaction_handle, b"alice"))
    assert verdict.intervention and ids(verdict) == [41]


# -- what is kept, and what is not -----------------------------------------------

def test_a_blocked_request_is_not_kept(crs):
    verdict = crs.evaluate(request(uri=b"/?id=1%27%20or%20%271%27%3D%271"))
    assert verdict.intervention and not verdict.transaction_handle and len(crs.store) == 0


def test_without_inspect_response_nothing_is_kept_and_logging_has_run(crs):
    verdict = crs.evaluate(request(keep=False))
    assert verdict.action == waf_pb2.ACTION_PASS and not verdict.transaction_handle and len(crs.store) == 0


def test_the_handle_names_the_worker_and_the_ttl_is_given(crs):
    verdict = crs.evaluate(request())
    worker, sep, token = verdict.transaction_handle.rpartition("#")
    assert worker == WORKER and sep and token
    assert verdict.transaction_ttl_ms == 35000 and len(crs.store) == 1


# -- truncated response bodies ---------------------------------------------------

@pytest.mark.parametrize("mode,policy,denied", [("block", "block", True), ("block", "pass", False),
                                                ("detect", "block", False), ("block", None, False)])
def test_truncated_response_body_is_flagged_and_follows_the_policy(mode, policy, denied):
    """Its own policy, apart from the request's: pass (flagged) unless told to block."""
    spec = RuleSetSpec(base_conf=BASE, mode=mode, extra_directives="SecRuleEngine On")
    app = Application("default", spec, truncated_body="block",
                      **({"truncated_response_body": policy} if policy else {}))
    engine = Engine(Applications({"default": app}, "default"))
    responses = Responses(engine, WORKER, 35000, 10)
    kept = responses.evaluate(request())
    verdict = responses.evaluate_response(response(kept.transaction_handle, b"x" * 1000, body_truncated=True,
                                                   content_length=250000))
    assert verdict.body_truncated and verdict.matches[-1].id == 99011 and verdict.matches[-1].phase == 4
    assert verdict.matches[-1].matched_data == "1000 bytes inspected, 250000 declared"
    assert verdict.intervention is denied and (verdict.status == 403) is denied


# -- misses ------------------------------------------------------------------------

def miss(responses: Responses, handle: str) -> int:
    with pytest.raises(TransactionMiss) as caught:
        responses.evaluate_response(response(handle, b"ok"))
    assert caught.value.code == "NOT_FOUND"
    return caught.value.reason


def test_each_miss_has_its_reason(crs_engine):
    clock = Clock()
    responses = Responses(crs_engine, WORKER, 1000, 2, clock=clock)
    used = responses.evaluate(request()).transaction_handle
    responses.evaluate_response(response(used, b"ok"))
    assert miss(responses, used) == waf_pb2.TRANSACTION_UNKNOWN                   # used once
    evicted = responses.evaluate(request()).transaction_handle
    for _ in range(2):
        responses.evaluate(request())
    assert miss(responses, evicted) == waf_pb2.TRANSACTION_EVICTED
    expiring = responses.evaluate(request()).transaction_handle
    clock.now += 1.0
    assert miss(responses, expiring) == waf_pb2.TRANSACTION_EXPIRED
    prefix = used.rsplit(".", 1)[0]
    assert miss(responses, prefix + ".ffffff") == waf_pb2.TRANSACTION_UNKNOWN      # never held
    assert miss(responses, WORKER + "#00000000.1") == waf_pb2.TRANSACTION_UNKNOWN  # an earlier life
    assert miss(responses, "other-host/7/8#abc.1") == waf_pb2.TRANSACTION_OTHER_WORKER
    assert miss(responses, "test-host/1/999999999#abc.1") == waf_pb2.TRANSACTION_UNKNOWN  # sibling gone
    assert responses.misses[waf_pb2.TRANSACTION_EVICTED] == 1
    assert responses.store.ended[Reason.EVICTED] == 2 and responses.store.ended[Reason.EXPIRED] == 1


@pytest.mark.parametrize("handle", ["", "no-hash", "#", f"{WORKER}#"])
def test_malformed_handles_are_invalid_arguments(crs, handle):
    with pytest.raises(EvaluationFailed) as caught:
        crs.evaluate_response(response(handle, b"ok"))
    assert caught.value.code == "INVALID_ARGUMENT" and caught.value.reason == waf_pb2.FIELD_INVALID


def test_a_response_without_a_status_is_refused(crs):
    kept = crs.evaluate(request())
    with pytest.raises(EvaluationFailed) as caught:
        crs.evaluate_response(response(kept.transaction_handle, b"ok", status=0))
    assert caught.value.reason == waf_pb2.FIELD_INVALID
    assert crs.evaluate_response(response(kept.transaction_handle, b"ok")).action == waf_pb2.ACTION_PASS


# -- reloads ---------------------------------------------------------------------------

def test_a_reload_lets_held_transactions_finish_on_their_own_rules(tmp_path):
    rules = tmp_path / "rules.conf"
    rules.write_text("SecRuleEngine On\nSecRule RESPONSE_BODY \"@contains secret\" "
                     "\"id:41,phase:4,deny,status:403,log\"\n")
    specs = {"": RuleSetSpec(base_conf=BASE, rules_file=str(rules))}
    engine = Engine(specs)
    responses = Responses(engine, WORKER, 35000, 10)
    before = responses.evaluate(request()).transaction_handle
    rules.write_text("SecRuleEngine On\n")                                  # the new rules find nothing
    engine.reload(specs)
    responses.rules_reloaded()
    after = responses.evaluate(request()).transaction_handle
    # Started on the old rules: finished on them (its RulesSet outlived the reload).
    assert responses.evaluate_response(response(before, b"a secret")).intervention
    assert not responses.evaluate_response(response(after, b"a secret")).intervention
    # Two reloads within the TTL: those from two generations ago end.
    two_ago = responses.evaluate(request()).transaction_handle
    one_ago_engine_generation = engine.generation
    engine.reload(specs)
    responses.rules_reloaded()
    one_ago = responses.evaluate(request()).transaction_handle
    engine.reload(specs)
    responses.rules_reloaded()
    assert engine.generation == one_ago_engine_generation + 2
    assert miss(responses, two_ago) == waf_pb2.TRANSACTION_RELOADED
    assert responses.evaluate_response(response(one_ago, b"ok")).action == waf_pb2.ACTION_PASS


# -- the audit log: one entry per transaction -----------------------------------------------

def test_the_audit_log_holds_request_and_response_as_one_entry(tmp_path):
    audit = tmp_path / "audit.json"
    engine = Engine({"": RuleSetSpec(base_conf=BASE, crs_dir=crs_dir(), audit_log=str(audit),
                                     audit_log_parts="ABFHZ")})
    responses = Responses(engine, WORKER, 35000, 10)
    kept = responses.evaluate(request(headers=[(b"host", b"127.0.0.1"), *BROWSER[1:]], transaction_id="uid-7"))
    assert not audit.exists() or "uid-7" not in audit.read_text()   # not logged before its response
    responses.evaluate_response(response(kept.transaction_handle, b"<html>ORA-00933: SQL command</html>"))
    entries = [json.loads(line)["transaction"] for line in audit.read_text().splitlines()]
    mine = [e for e in entries if e["unique_id"] == "uid-7"]
    assert len(mine) == 1
    rule_ids = {m["details"]["ruleId"] for m in mine[0]["messages"]}
    assert {"920350", "951120", "959100"} <= rule_ids
    assert mine[0]["response"]["http_code"] == 200


def test_an_evicted_transaction_is_logged_at_eviction(tmp_path):
    audit = tmp_path / "audit.json"
    engine = Engine({"": RuleSetSpec(base_conf=BASE, crs_dir=crs_dir(), audit_log=str(audit))})
    responses = Responses(engine, WORKER, 35000, 1)
    responses.evaluate(request(headers=[(b"host", b"127.0.0.1"), *BROWSER[1:]], transaction_id="uid-evicted"))
    assert not audit.exists() or "uid-evicted" not in audit.read_text()
    responses.evaluate(request(transaction_id="uid-next"))                 # pushes it out
    assert "uid-evicted" in audit.read_text()


# -- the incremental API ---------------------------------------------------------------------

def test_bodies_fed_in_chunks_are_inspected_whole():
    rules = ("SecRuleEngine On\n"
             "SecRule REQUEST_BODY \"@contains needle-in-the-upload\" \"id:21,phase:2,deny,status:403,log\"\n"
             "SecRule RESPONSE_BODY \"@contains split-leak\" \"id:41,phase:4,deny,status:502,log\"\n")
    engine = Engine({"": RuleSetSpec(base_conf=BASE, extra_directives=rules)})
    upload = b"a" * (5 * 1024 * 1024 - 20) + b"needle-in-the-upload"   # 5 MB, the match at the very end
    tx = engine.begin(transaction_id="chunks")
    tx.connection("203.0.113.7", 50000, "10.0.0.5", 443)
    assert not tx.request_headers("POST", b"/upload", "2.0", [(b"host", b"x"), (b"content-type", b"text/plain")])
    decided = [tx.request_body(upload[i:i + 65536]) for i in range(0, len(upload), 65536)]
    assert not any(decided)
    verdict = tx.end_request(keep=True)
    assert verdict.intervention and ids(verdict) == [21] and not tx.open and tx.closed

    tx = engine.begin(transaction_id="chunks-2")
    tx.request_headers("GET", b"/", "1.1", [(b"host", b"x")])
    assert tx.end_request(keep=True).action == waf_pb2.ACTION_PASS and tx.open
    assert not tx.response_headers(200, [(b"content-type", b"text/html")])
    for chunk in (b"<html>... split-", b"leak ...</html>"):
        tx.response_body(chunk)
    verdict = tx.end_response()
    assert verdict.intervention and verdict.status == 502 and ids(verdict) == [41] and tx.closed
    tx.close()   # idempotent


def test_steps_out_of_order_are_refused():
    engine = Engine({"": RuleSetSpec(base_conf=BASE, extra_directives="SecRuleEngine On")})
    tx = engine.begin()
    with pytest.raises(TransactionStateError):
        tx.response_headers(200, [])
    tx.request_headers("GET", b"/", "1.1", [])
    with pytest.raises(TransactionStateError):
        tx.end_response()
    tx.end_request()                       # keep=False: ended
    with pytest.raises(TransactionStateError):
        tx.response_headers(200, [])
    tx.close()


def test_an_intervention_mid_body_stops_the_feed():
    rules = ("SecRuleEngine On\nSecRequestBodyLimit 1000\nSecRequestBodyLimitAction Reject\n")
    engine = Engine({"": RuleSetSpec(base_conf=BASE, extra_directives=rules)})
    tx = engine.begin()
    tx.request_headers("POST", b"/", "1.1", [(b"content-type", b"application/octet-stream")])
    results = [tx.request_body(b"x" * 600) for _ in range(4)]
    assert results[0] is False and all(results[1:])
    verdict = tx.end_request(keep=True)
    assert verdict.intervention and "body limit" in verdict.log and tx.closed


def test_a_request_denied_for_its_truncated_body_is_not_kept():
    engine = Engine({"": RuleSetSpec(base_conf=BASE, extra_directives="SecRuleEngine On")})
    responses = Responses(engine, WORKER, 35000, 10)
    verdict = responses.evaluate(request(method="POST", body=b"a=1", body_truncated=True, content_length=99999))
    assert verdict.intervention and verdict.matches[-1].id == 99010
    assert not verdict.transaction_handle and len(responses.store) == 0


def test_a_5_mb_upload_streamed_in_chunks_with_crs(crs_engine):
    """Envoy's STREAMED body mode: a multipart upload fed 64 KB at a time.
    The file passes; an injection in a form field after it is found."""
    def upload(field: bytes) -> waf_pb2.Verdict:
        body = (b"--b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"photo.bin\"\r\n"
                b"Content-Type: application/octet-stream\r\n\r\n" + b"\x5a" * (5 * 1024 * 1024) +
                b"\r\n--b0undary\r\nContent-Disposition: form-data; name=\"comment\"\r\n\r\n" + field +
                b"\r\n--b0undary--\r\n")
        tx = crs_engine.begin(transaction_id="upload")
        headers = [*BROWSER, (b"content-type", b"multipart/form-data; boundary=b0undary"),
                   (b"content-length", str(len(body)).encode())]
        assert not tx.request_headers("POST", b"/upload", "2.0", headers)
        for offset in range(0, len(body), 65536):
            if tx.request_body(body[offset:offset + 65536]):
                break
        return tx.end_request()
    assert upload(b"nice shoes").action == waf_pb2.ACTION_PASS
    blocked = upload(b"1' UNION SELECT username, password FROM users--")
    assert blocked.intervention and 949110 in ids(blocked)
