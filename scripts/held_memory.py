"""Memory of transactions held for their response (response inspection),
measured in-process with CRS at paranoia level 1 and the shipped engine
configuration, through the same Responses store the worker uses.

    python scripts/held_memory.py                       # per held transaction
    python scripts/held_memory.py --unanswered 200000   # plus RSS over 200k never answered

Per held transaction: RSS grown while N requests are held, divided by N,
after warming up and trimming the allocator, for a typical browser GET and a
1 KB form POST (bench/workloads.py). Unanswered: 200k kept requests at the
default cap (WAF_MAX_HELD_TRANSACTIONS), RSS sampled as they go.
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import workloads  # noqa: E402
from bench.rulesets import default_crs_dir, rule_specs  # noqa: E402
from gateway import mapping  # noqa: E402
from wafsvc.config import WafConfig  # noqa: E402
from wafsvc.engine import Engine  # noqa: E402
from wafsvc.held import Reason  # noqa: E402
from wafsvc.responses import Responses  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
FORM_POST = workloads.Request("POST", "/contact", workloads._browser(workloads.FORM), workloads._form({
    "name": "Maria Keller", "email": "maria.keller@example.org", "subject": "Order 8841",
    "message": ("Hello, the trail runners I ordered arrived in the wrong size. " * 15)[:680]}))
CASES = {"browser GET": workloads.BENIGN[0], "1 KB form POST": FORM_POST}


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


def settle() -> int:
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)
    return rss()


def kept_request(req: workloads.Request, index: int):
    message = mapping.build_request(workloads.spoe_args(req, index))[0]
    message.inspect_response = True
    return message


def per_transaction(engine: Engine, req: workloads.Request, count: int) -> dict:
    message = kept_request(req, 0)
    warm = Responses(engine, "measure/1/1", 60_000, count)
    for _ in range(300):
        warm.evaluate(message)
    warm.close_all()
    del warm
    start = settle()
    responses = Responses(engine, "measure/1/1", 60_000, count)
    for _ in range(count):
        assert responses.evaluate(message).transaction_handle
    held = rss()
    responses.close_all()
    freed = settle()
    return {"body_bytes": len(req.body), "held": count, "bytes_per_transaction": round((held - start) / count),
            "rss_start_mib": round(start / 2**20, 1), "rss_held_mib": round(held / 2**20, 1),
            "rss_after_close_and_trim_mib": round(freed / 2**20, 1)}


def unanswered(engine: Engine, total: int, cap: int) -> dict:
    message = kept_request(workloads.BENIGN[0], 0)
    responses = Responses(engine, "measure/1/1", 60_000, cap)
    samples, started = [], time.monotonic()
    for n in range(1, total + 1):
        responses.evaluate(message)
        if n % (total // 10) == 0 or n == cap:
            samples.append({"kept": n, "held": len(responses.store), "rss_mib": round(rss() / 2**20, 1)})
    return {"kept": total, "cap": cap, "evicted": responses.store.ended[Reason.EVICTED],
            "samples": samples, "seconds": round(time.monotonic() - started, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held", type=int, default=3000, help="transactions held per case")
    parser.add_argument("--unanswered", type=int, default=0, help="also keep this many, never answered")
    parser.add_argument("--crs-dir", default="")
    args = parser.parse_args(argv)
    crs = args.crs_dir or default_crs_dir()
    engine = Engine(rule_specs("crs", crs))
    cap = WafConfig.__dataclass_fields__["max_held_transactions"].default
    result = {"crs": crs, "paranoia": 1, "rules": engine.loaded.rule_counts["default"],
              "per_transaction": {name: per_transaction(engine, req, args.held) for name, req in CASES.items()}}
    if args.unanswered:
        result["unanswered"] = unanswered(engine, args.unanswered, cap)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
