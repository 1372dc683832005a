"""What inspecting a body cut at HAProxy's buffer costs the engine.

    python scripts/large_body_cost.py [--crs-dir DIR ...] [--cut 64000] [--rounds 7]

One process, the engine alone (wafsvc.engine.Engine, CRS at paranoia level
1, the shipped base configuration, truncated-body policy pass): a 2 MB
multipart upload, a 150 KB urlencoded form and a 150 KB JSON document, each
cut at `--cut` bytes as HAProxy hands them over (body_truncated), plus the
same upload whole for comparison. Minimum and median engine time over the
rounds. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts import results  # noqa: E402
from wafapi import waf_pb2  # noqa: E402
from wafsvc.apps import Application, Applications  # noqa: E402
from wafsvc.config import REPO_RULES  # noqa: E402
from wafsvc.engine import Engine  # noqa: E402
from wafsvc.rules import RuleSetSpec  # noqa: E402

BOUNDARY = b"----formdata7MA4YWxk"


def bodies() -> dict[str, tuple[bytes, bytes]]:
    photo = os.urandom(2 * 1024 * 1024).replace(b"--", b"-x")
    upload = (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="title"\r\n\r\nholiday\r\n--' + BOUNDARY
              + b'\r\nContent-Disposition: form-data; name="file"; filename="beach.jpg"\r\n'
              b"Content-Type: image/jpeg\r\n\r\n" + photo + b"\r\n--" + BOUNDARY + b"--\r\n")
    text = "lorem ipsum dolor sit amet " * 40
    form = "&".join(f"field{i}={text.replace(' ', '+')}" for i in range(140)).encode()
    doc = json.dumps({"posts": [{"title": f"post {i}", "body": text} for i in range(140)]}).encode()
    return {"2 MB multipart upload": (b"multipart/form-data; boundary=" + BOUNDARY, upload),
            "150 KB urlencoded form": (b"application/x-www-form-urlencoded", form),
            "150 KB JSON document": (b"application/json", doc)}


def request(content_type: bytes, body: bytes, cut: int | None) -> waf_pb2.EvaluateRequest:
    headers = [(b"host", b"shop.example"), (b"user-agent", b"Mozilla/5.0"), (b"accept", b"*/*"),
               (b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    return waf_pb2.EvaluateRequest(method="POST", uri=b"/upload", client_ip="10.0.0.1",
                                   headers=[waf_pb2.Header(name=n, value=v) for n, v in headers],
                                   body=body[:cut] if cut else body, body_truncated=bool(cut),
                                   content_length=len(body))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crs-dir", nargs="*", default=[str(ROOT.parent / "shared" / "crs" / "v4.28.0"),
                                                          "/usr/share/modsecurity-crs"])
    parser.add_argument("--cut", type=int, default=64000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    cases = bodies()
    rows = []
    for crs_dir in args.crs_dir:
        spec = RuleSetSpec(base_conf=str(REPO_RULES / "modsecurity.conf"), crs_dir=crs_dir, paranoia=1)
        engine = Engine(Applications({"site": Application("site", spec, min_inspected=0)}, "site"))
        runs = [(name, ct, body, args.cut) for name, (ct, body) in cases.items()]
        runs.append(("2 MB multipart upload, whole", *cases["2 MB multipart upload"], None))
        for name, content_type, body, cut in runs:
            message = request(content_type, body, cut)
            times, verdict = [], None
            for _ in range(args.rounds):
                started = time.perf_counter()
                verdict = engine.evaluate(message)
                times.append((time.perf_counter() - started) * 1000)
            rows.append({"crs_dir": crs_dir, "body": name, "inspected_bytes": len(message.body),
                         "ms_min": round(min(times), 1), "ms_median": round(statistics.median(times), 1),
                         "verdict": "block" if verdict.intervention else "pass",
                         "rules": [m.id for m in verdict.matches]})
            print(json.dumps(rows[-1]), file=sys.stderr)
    result = {"what": "engine time for a body cut at HAProxy's buffer (CRS PL1, one process)",
              "measured_at": results.now(),
              "load_average": os.getloadavg(), "rows": rows}
    return results.emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
