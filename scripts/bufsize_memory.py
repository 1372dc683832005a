"""HAProxy's memory per request in flight, at several tune.bufsize values:
what raising the inspected body size costs.

    python scripts/bufsize_memory.py [--haproxy BIN ...] [--bufsizes 16384,65536,131072] [--streams 400]

Runs the shipped deploy/haproxy/haproxy.cfg with only tune.bufsize changed
and opens N slow uploads: each sends its headers and part of a 2 MB body,
then waits (option http-buffer-request holds the request until the body
fills the buffer). Two fills per buffer size: 4 KB of body, and the buffer
nearly full (bufsize - 8 KB), which is what a slow or hostile client can
make HAProxy hold. HAProxy's RSS is read before and while the N uploads
wait; the difference divided by N is the cost of one request in flight. No
agent is needed: nothing reaches SPOE before the buffer fills.
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts import results  # noqa: E402
from stack.processes import HAPROXY_DIR, free_port, wait_for_port  # noqa: E402

MIB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss(pid: int) -> int:
    return int(pathlib.Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def version(binary: str) -> str:
    return subprocess.run([binary, "-v"], capture_output=True, text=True).stdout.split()[2]


def measure(binary: str, bufsize: int, fill: int, streams: int, workdir: pathlib.Path) -> dict:
    cfg = workdir / f"haproxy-{bufsize}.cfg"
    text = re.sub(r"^(\s*)tune\.bufsize \d+", rf"\g<1>tune.bufsize {bufsize}",
                  (HAPROXY_DIR / "haproxy.cfg").read_text(), flags=re.M)
    cfg.write_text(text)
    port = free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "FRONTEND_ADDR": f"127.0.0.1:{port}",
           "FRONTEND_ALT_ADDR": f"127.0.0.1:{free_port()}", "BACKEND_ADDR": f"127.0.0.1:{free_port()}",
           "GATEWAY_ADDR": f"127.0.0.1:{free_port()}", "SPOE_CONF": str(HAPROXY_DIR / "spoe-modsecurity.conf")}
    proc = subprocess.Popen([binary, "-db", "-f", str(cfg)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    socks = []
    try:
        wait_for_port(port, proc, "haproxy")
        time.sleep(0.5)
        before = rss(proc.pid)
        head = (b"POST /upload HTTP/1.1\r\nHost: shop.localhost\r\nUser-Agent: slow-upload\r\n"
                b"Content-Type: application/octet-stream\r\nContent-Length: 2097152\r\n\r\n")
        for _ in range(streams):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(head + b"x" * fill)
            socks.append(sock)
        time.sleep(1.0)
        if proc.poll() is not None:
            raise RuntimeError("haproxy exited")
        during = rss(proc.pid)
        # Every upload must still be waiting: no answer, not closed.
        waiting = 0
        for sock in socks:
            sock.setblocking(False)
            try:
                sock.recv(1, socket.MSG_PEEK)   # an answer, or b"" (closed): not waiting
            except BlockingIOError:
                waiting += 1
        return {"haproxy": version(binary), "bufsize": bufsize, "body_sent": fill, "streams": streams,
                "waiting": waiting, "rss_before_mib": round(before / MIB, 1), "rss_during_mib": round(during / MIB, 1),
                "kib_per_stream": round((during - before) / streams / 1024, 1)}
    finally:
        for sock in socks:
            sock.close()
        proc.terminate()
        proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_bins = [b for b in (shutil.which("haproxy"), str(ROOT / ".tools" / "haproxy32" / "haproxy"))
                    if b and pathlib.Path(b).exists()]
    parser.add_argument("--haproxy", nargs="*", default=default_bins)
    parser.add_argument("--bufsizes", default="16384,65536,131072")
    parser.add_argument("--streams", type=int, default=400)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for binary in args.haproxy:
            for bufsize in (int(b) for b in args.bufsizes.split(",")):
                for fill in (4096, bufsize - 8192):
                    rows.append(measure(binary, bufsize, fill, args.streams, pathlib.Path(tmp)))
                    print(json.dumps(rows[-1]), file=sys.stderr)
    result = {"what": "HAProxy RSS per request in flight (slow uploads held by option http-buffer-request)",
              "measured_at": results.now(), "rows": rows}
    return results.emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
