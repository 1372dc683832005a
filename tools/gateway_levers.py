"""CPU per request of the gateway's own Python path, stage by stage: the
reference path (what the gateway ran before issue 17) against the one it
runs now, side by side in one process.

    python -m tools.gateway_levers            # a Markdown table on stdout

- NOTIFY to batch entry: frames.decode_payload + mapping.build_request +
  a BatchRequest serialized through upb, against NotifyDecoder (one pass
  straight into protobuf bytes) + protowire.batch_entry.
- ACK: encode_ack(setvars.verdict_actions(v)) against AckEncoder's cached
  decision bytes, for a pass and for a CRS-like block.
- Metrics per verdict: prometheus_client children (a histogram observe and a
  labelled counter, as before) against the plain-int Tallies.

The requests are the bench's benign mix, encoded as HAProxy sends the
shipped SPOE message (bench/spop_driver.py). Times are process CPU time,
the minimum of repeats, so other load on the machine blurs them less.
gRPC and the event loop are not in here: bench.gateway_isolated measures
the whole process.
"""

from __future__ import annotations

import sys
import time
import timeit

from bench import spop_driver
from gateway import mapping, setvars
from gateway.acks import AckEncoder
from gateway.metrics import LATENCY_BUCKETS, Tallies
from gateway.notify import NotifyDecoder
from gateway.protowire import batch_entry
from gateway.spop import decode_frame_header, decode_payload, encode_ack, encode_ack_frame
from wafapi import waf_pb2

PASS = waf_pb2.Verdict(action=waf_pb2.ACTION_PASS)
BLOCK = waf_pb2.Verdict(intervention=True, status=403, action=waf_pb2.ACTION_DENY, matches=[
    waf_pb2.RuleMatch(id=942100, message="SQL Injection Attack Detected via libinjection"),
    waf_pb2.RuleMatch(id=949110, message="Inbound Anomaly Score Exceeded (Total Score: 5)")])


def _frames() -> list[tuple[bytes, tuple]]:
    out = []
    for i, payload in enumerate(spop_driver.notify_payloads("benign")):
        body = spop_driver.notify_frame(1000 + i, payload)[4:]
        out.append((body, decode_frame_header(body)))
    return out


def per_request_us(fn, count: int, number: int = 20, repeat: int = 15) -> float:
    best = min(timeit.repeat(fn, number=number, repeat=repeat, timer=time.process_time))
    return best / number / count * 1e6


def measure() -> list[tuple[str, float, float]]:
    frames = _frames()
    n = len(frames)
    decoder = NotifyDecoder("", 65536)

    def reference_decode():
        for body, (ftype, _, sid, fid, pos) in frames:
            notify = decode_payload(ftype, sid, fid, body, pos)
            request, _ = mapping.build_request(notify.messages[0].args, "", 65536)
            waf_pb2.BatchRequest(ref=sid, request=request).SerializeToString()

    def fast_decode():
        for body, (_, _, sid, fid, pos) in frames:
            batch_entry(sid, decoder(sid, fid, body, pos).request)

    def reference_ack(verdict):
        return lambda: [encode_ack(1000 + i, 1, setvars.verdict_actions(verdict)) for i in range(n)]

    encoder = AckEncoder(True)

    def cached_ack(verdict):
        return lambda: [encode_ack_frame(1000 + i, 1, encoder.verdict(verdict)) for i in range(n)]

    from prometheus_client import CollectorRegistry, Counter, Histogram
    registry = CollectorRegistry()
    histogram = Histogram("h", "h", buckets=LATENCY_BUCKETS, registry=registry)
    counter = Counter("c", "c", ["verdict", "app"], registry=registry)
    children = {}

    def prometheus_metrics():
        for _ in range(n):
            histogram.observe(0.0012)
            child = children.get(("pass", "default"))
            if child is None:
                child = children[("pass", "default")] = counter.labels("pass", "default")
            child.inc()

    tallies = Tallies()

    def tallied_metrics():
        evaluations = tallies.evaluations
        for _ in range(n):
            tallies.observe(0.0012)
            key = ("pass", "default")
            evaluations[key] = evaluations.get(key, 0) + 1

    return [
        ("NOTIFY to batch entry", per_request_us(reference_decode, n), per_request_us(fast_decode, n)),
        ("ACK, pass", per_request_us(reference_ack(PASS), n), per_request_us(cached_ack(PASS), n)),
        ("ACK, block (2 rules)", per_request_us(reference_ack(BLOCK), n), per_request_us(cached_ack(BLOCK), n)),
        ("metrics, a pass", per_request_us(prometheus_metrics, n), per_request_us(tallied_metrics, n)),
    ]


def main() -> int:
    rows = measure()
    print("| stage | before, µs | now, µs | ratio |\n|---|---:|---:|---:|")
    for name, before, now in rows:
        print(f"| {name} | {before:.1f} | {now:.1f} | {now / before:.2f} |")
    before = rows[0][1] + rows[1][1] + rows[3][1]
    now = rows[0][2] + rows[1][2] + rows[3][2]
    print(f"| a passed request (decode, ACK, metrics) | {before:.1f} | {now:.1f} | {now / before:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
