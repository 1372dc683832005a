"""What long runs of one character inside one value cost the engine, with
and without rules/crs-mitigations.conf, side by side in one process.

    python scripts/costly_runs.py [--crs-dir DIR ...] [--rounds 3] [--out FILE]

Per CRS directory (CRS at paranoia level 1, the shipped base
configuration), two engines: "before" loads no mitigations
(RuleSetSpec.crs_mitigations=""), "after" the shipped file. Each body is
evaluated by both in turn, round after round, so that a busy machine
disturbs both alike. CPU time of Engine.evaluate (the engine runs on the
calling thread), minimum and median over rounds. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
import urllib.parse

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts import results  # noqa: E402
from wafapi import waf_pb2  # noqa: E402
from wafsvc.apps import Application, Applications  # noqa: E402
from wafsvc.config import REPO_RULES  # noqa: E402
from wafsvc.engine import Engine  # noqa: E402
from wafsvc.rules import RuleSetSpec  # noqa: E402

FORM = b"application/x-www-form-urlencoded"


def form(run: str) -> tuple[bytes, bytes]:
    return FORM, b"a=x" + urllib.parse.quote(run, safe=" ").encode() + b"y"


def bodies() -> dict[str, tuple[bytes, bytes]]:
    """Name -> (Content-Type, body). Sizes are of the run, in bytes."""
    return {
        "form, 16 KB of spaces": form(" " * 16384),
        "form, 32 KB of spaces": form(" " * 32768),
        "form, 60 KB of spaces": form(" " * 60000),
        "form, 16 KB of %20": (FORM, b"a=x" + b"%20" * 16384 + b"y"),
        "form, 16 KB of tabs": form("\t" * 16384),
        "JSON string, 32 KB of spaces": (b"application/json", json.dumps({"a": " " * 32768}).encode()),
        "XML text, 32 KB of spaces": (b"text/xml", b"<r><a>" + b" " * 32768 + b"</a></r>"),
        # Not mitigated (docs/SECURITY.md "Costly bodies"): for comparison.
        "form, 1 KB of newlines": form("\n" * 1024),
        "form, 8 KB of pipes": form("|" * 8192),
    }


def request(content_type: bytes, body: bytes) -> waf_pb2.EvaluateRequest:
    headers = [(b"host", b"shop.example"), (b"user-agent", b"Mozilla/5.0"), (b"accept", b"*/*"),
               (b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    return waf_pb2.EvaluateRequest(method="POST", uri=b"/form", client_ip="10.0.0.1", body=body,
                                   headers=[waf_pb2.Header(name=n, value=v) for n, v in headers],
                                   content_length=len(body))


def engine(crs_dir: str, mitigations: bool) -> Engine:
    spec = RuleSetSpec(base_conf=str(REPO_RULES / "modsecurity.conf"), crs_dir=crs_dir, paranoia=1,
                       **({} if mitigations else {"crs_mitigations": ""}))
    return Engine(Applications({"site": Application("site", spec, min_inspected=0)}, "site"))


def cpu_ms(engine: Engine, message: waf_pb2.EvaluateRequest) -> tuple[float, list[int]]:
    started = time.process_time()
    verdict = engine.evaluate(message)
    return (time.process_time() - started) * 1000, [m.id for m in verdict.matches]


def summary(times: list[float]) -> dict[str, float]:
    return {"ms_min": round(min(times), 1), "ms_median": round(statistics.median(times), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crs-dir", nargs="*", default=[str(ROOT.parent / "shared" / "crs" / "v4.28.0"),
                                                          "/usr/share/modsecurity-crs"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    rows = []
    for crs_dir in args.crs_dir:
        engines = {"before": engine(crs_dir, False), "after": engine(crs_dir, True)}
        for name, (content_type, body) in bodies().items():
            message = request(content_type, body)
            times = {which: [] for which in engines}
            rules = {}
            for _ in range(args.rounds):
                for which, eng in engines.items():
                    ms, rules[which] = cpu_ms(eng, message)
                    times[which].append(ms)
            rows.append({"crs_dir": crs_dir, "body": name, "body_bytes": len(body),
                         **{which: {**summary(times[which]), "rules": rules[which]} for which in engines}})
            print(json.dumps(rows[-1]), file=sys.stderr)
    result = {"what": "engine CPU time for one value holding a long run of one character, "
                      "without (before) and with (after) rules/crs-mitigations.conf (CRS PL1, one process)",
              "measured_at": results.now(), "load_average": os.getloadavg(), "rows": rows}
    return results.emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
