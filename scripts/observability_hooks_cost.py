"""CPU each observation hook adds per request, measured in-process (min of
5 repeats), without the noise of a whole stack on a shared CPU:

    PYTHONPATH=. .venv/bin/python scripts/observability_hooks_cost.py

The gateway's metrics use ordinary values (one process); wafsvc's use
prometheus-client's multiprocess (mmap) values, as in a worker, measured both
flushed on every call and tallied inside an event loop (how workers run).
Logs go through the JSON formatter to /dev/null.
"""

import asyncio
import atexit
import logging
import os
import shutil
import sys
import tempfile
import timeit

os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="hooks-cost-")   # before prometheus_client
atexit.register(shutil.rmtree, os.environ["PROMETHEUS_MULTIPROC_DIR"], True)

import prometheus_client.metrics as prom_metrics  # noqa: E402
import prometheus_client.values as prom_values  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from common.logs import JsonFormatter  # noqa: E402
from gateway.mapping import RequestContext  # noqa: E402
from gateway.requestlog import RequestLog  # noqa: E402
from gateway.server import GatewayHooks  # noqa: E402
from wafapi import waf_pb2  # noqa: E402


def per_call_us(fn, n: int = 20000) -> float:
    return min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6


class FixedEngine:
    class loaded:
        rule_counts = {"": 900}
        loaded_at = 0.0

    def __init__(self, verdict):
        self.verdict = verdict

    def evaluate(self, req, verdict=None):
        return self.verdict


def main() -> int:
    handler = logging.StreamHandler(open(os.devnull, "w"))
    handler.setFormatter(JsonFormatter("bench"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    context = RequestContext("7F000001:C0C8_7F000001:DB73_6B06F9DA_0002:3D83", "web", "shop.example", "", False)
    verdicts = {"pass": waf_pb2.Verdict(action=waf_pb2.ACTION_PASS, engine_time_us=700),
                "block": waf_pb2.Verdict(intervention=True, status=403, action=waf_pb2.ACTION_DENY,
                                         engine_time_us=740,
                                         matches=[waf_pb2.RuleMatch(id=i, message="m")
                                                  for i in (920350, 942100, 949110)])}
    rows = []
    multiprocess = prom_values.ValueClass
    prom_metrics.values.ValueClass = prom_values.MutexValue     # the gateway is one process
    from gateway.metrics import GatewayMetrics
    for level in ("warning", "info"):
        root.setLevel(level.upper())
        for name, hooks in (("no-op hooks", GatewayHooks()), ("request log", RequestLog()),
                            ("metrics + request log", GatewayMetrics(CollectorRegistry()))):
            for kind, verdict in verdicts.items():
                rows.append(("gateway", level, name, kind,
                             per_call_us(lambda: hooks.verdict(context, verdict, 0.0012))))
    prom_metrics.values.ValueClass = multiprocess
    from wafsvc import metrics as waf_metrics
    request = waf_pb2.EvaluateRequest(transaction_id=context.unique_id, method="GET", uri=b"/")
    for level in ("warning", "info"):
        root.setLevel(level.upper())
        for kind, verdict in verdicts.items():
            engine = FixedEngine(verdict)
            observed = waf_metrics.ObservedEngine(engine, None)
            rows.append(("wafsvc", level, "request log", kind, per_call_us(lambda: observed.evaluate(request))))
            observed = waf_metrics.ObservedEngine(engine, waf_metrics.WafMetrics())
            rows.append(("wafsvc", level, "metrics written per call + request log", kind,
                         per_call_us(lambda: observed.evaluate(request))))

            async def in_worker():
                return per_call_us(lambda: observed.evaluate(request))
            rows.append(("wafsvc", level, "metrics tallied (as in a worker) + request log", kind,
                         asyncio.run(in_worker())))
    print("| service | LOG_LEVEL | hooks | verdict | us per request |\n|---|---|---|---|---|")
    for service, level, name, kind, us in rows:
        print(f"| {service} | {level} | {name} | {kind} | {us:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
