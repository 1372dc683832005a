"""The isolated gateway benchmark sends what HAProxy sends and its stub
answers what wafsvc answers: checked against the captures, the gateway's own
codec and mapping, and the generated protobuf classes. No sockets."""

from __future__ import annotations

import pytest

from bench import spop_driver, stats, stub_wafsvc, workloads
from fuzz.spop_fuzz import CORPUS, split_frames
from gateway import mapping
from gateway.spop import (AgentConnection, HaproxyHello, NotifyReceived, decode_frame, encode_varint)
from wafapi import waf_pb2


def test_message_and_arguments_come_from_the_shipped_spoe_file():
    name, args = spop_driver.spoe_message()
    text = spop_driver.SPOE_CONF.read_text()
    assert f"messages {name}" in text
    assert "args " + " ".join(f"{a}={f}" for a, f in args) in text
    assert [a for a, _ in args][:2] == ["id", "app"]


def test_an_unknown_sample_fetch_is_refused_not_guessed():
    with pytest.raises(ValueError, match="cannot encode"):
        spop_driver.fetch_value("req.cook(session)", workloads.BENIGN[0], 0)


@pytest.mark.parametrize("version", sorted(spop_driver.HELLO_CAPTURES))
def test_hello_is_haproxys_own(version):
    hello = decode_frame(spop_driver.hello_frame(version)[4:])
    assert isinstance(hello, HaproxyHello) and not hello.healthcheck
    assert "pipelining" in hello.capabilities
    assert ("async" in hello.capabilities) == (version == "2.6")


def test_argument_types_match_a_real_haproxy_capture():
    capture = decode_frame(split_frames((CORPUS / "haproxy26-form.bin").read_bytes())[1][4:])
    real = dict(capture.messages[0].args)
    ours = decode_frame(spop_driver.notify_frame(7, spop_driver.notify_payloads("benign", 1)[6])[4:])
    mine = dict(ours.messages[0].args)
    assert list(mine) == list(real)
    fetches = dict(spop_driver.spoe_message()[1])
    for name, value in mine.items():
        if fetches[name].startswith("var(") and value is None:
            continue  # a variable the bench's frontend leaves unset (the capture's frontend sets some)
        assert type(value) is type(real[name]), name


def test_every_notify_reaches_the_gateway_as_the_request_it_stands_for():
    """Fed to the gateway's own codec and mapping, each frame becomes the
    workload's request: method, URI, headers in order, body."""
    conn = AgentConnection(max_frame_size=65532)
    conn.receive_data(spop_driver.hello_frame("3.2"))
    payloads = spop_driver.notify_payloads("benign", variants=2)
    frames = b"".join(spop_driver.notify_frame(1000 + 2 * i, p) for i, p in enumerate(payloads))
    events = [e for e in conn.receive_data(frames) if isinstance(e, NotifyReceived)]
    assert len(events) == len(payloads) == 2 * len(workloads.BENIGN)
    ids = set()
    for i, event in enumerate(events):
        req = workloads.BENIGN[i % len(workloads.BENIGN)]
        assert event.notify.stream_id == 1000 + 2 * i and event.notify.frame_id == 1
        request, context = mapping.build_request(dict(event.notify.messages[0].args), "", 65536)
        assert (request.method, request.uri, request.body) == (req.method, req.path.encode(), req.body)
        assert [(h.name, h.value) for h in request.headers] == [
            (k.lower().encode(), v.encode()) for k, v in req.all_headers()]
        ids.add(request.transaction_id)
    assert len(ids) == len(events)  # every NOTIFY has its own unique-id


@pytest.mark.parametrize("value", [0, 1, 239, 240, 2287, 2288, 264431, 264432, 10**9])
def test_ack_ids_are_read_as_the_codec_writes_them(value):
    data = encode_varint(value) + b"\x05"
    assert spop_driver._read_varint(data, 0) == (value, len(data) - 1)


def test_stub_answers_each_request_with_a_pass_verdict_for_its_ref():
    batch = waf_pb2.EvaluateBatch()
    for ref, tid in ((1, "a"), (300, ""), (2**40, "7F000001:9C40")):
        batch.requests.add(ref=ref).request.transaction_id = tid
    answer = waf_pb2.VerdictBatch.FromString(stub_wafsvc.answer(batch.SerializeToString()))
    assert [(v.ref, v.verdict.transaction_id) for v in answer.verdicts] == [
        (1, "a"), (300, ""), (2**40, "7F000001:9C40")]
    for v in answer.verdicts:
        assert v.WhichOneof("result") == "verdict"
        assert v.verdict.action == waf_pb2.ACTION_PASS and not v.verdict.intervention


def test_percentiles_use_the_nearest_rank():
    p = stats.percentiles_us([i / 1e6 for i in range(1, 1001)])
    assert (p["p50"], p["p99"], p["p999"], p["max"], p["samples"]) == (500, 990, 999, 1000, 1000)
    assert stats.percentiles_us([])["samples"] == 0
    assert stats.spread([3, 1, 2]) == {"min": 1, "median": 2, "max": 3}


def test_gateway_profile_table_shares_add_up(tmp_path):
    from bench.gateway_isolated import profile_table

    raw = tmp_path / "g.raw"
    raw.write_text("main;_run_module_as_main (runpy);_decode_notify (gateway/spop/frames.py:336) 3\n"
                   "poller;epoll_wait (libc.so.6) 1\n")
    lines = profile_table(raw)
    assert "| SPOP codec | 75.0% |" in lines and "| syscalls: epoll (waiting) | 25.0% |" in lines
    assert "| thread: gRPC poller thread | 25.0% |" in lines
