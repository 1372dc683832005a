"""Records what a real HAProxy sends the agent, for fuzz/corpus/.

    python -m fuzz.capture --haproxy haproxy --out fuzz/corpus/haproxy26-get.bin get
    python -m fuzz.capture --haproxy .tools/haproxy32/haproxy --out fuzz/corpus/haproxy32-get-and-form.bin get form

The shipped deploy/haproxy/haproxy.cfg and spoe-modsecurity.conf, in front
of the demo backend, with a recording agent in the gateway's place: it
answers every request with a pass and a transaction handle (so that HAProxy
sends the response too, frontend web inspects responses) and every response
with a pass, using the gateway's own codec. The file holds the bytes
HAProxy wrote on the SPOP connection that carried the NOTIFYs (its HELLO
first), exactly as received.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import pathlib
import subprocess
import sys
import threading

from fuzz.spop_fuzz import split_frames
from gateway.spop import AgentConnection, NotifyReceived, Scope, SetVar
from stack.processes import HAPROXY_DIR, ROOT, free_port, wait_for_port

HAPROXY_HELLO, NOTIFY = 1, 3
BROWSER = {"Host": "shop.example.com", "User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Firefox/128.0",
           "Accept": "text/html,application/xhtml+xml,*/*;q=0.8", "Accept-Language": "en-GB,en;q=0.7"}
REQUESTS = {
    "get": ("GET", "/catalog?q=boots&page=2", None, {}),
    "form": ("POST", "/login", b"user=alice&password=correct+horse", {"Content-Type": "application/x-www-form-urlencoded"}),
    "leak": ("GET", "/leaks/sql-error", None, {}),
}


class Recorder(asyncio.Protocol):
    connections: list[bytearray] = []

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.conn = AgentConnection(max_frame_size=65532)
        self.data = bytearray()
        Recorder.connections.append(self.data)

    def data_received(self, data: bytes) -> None:
        self.data += data
        for event in self.conn.receive_data(data):
            if isinstance(event, NotifyReceived):
                notify = event.notify
                if notify.messages and notify.messages[0].name == "check-response":
                    actions = [SetVar(Scope.TRANSACTION, name, value) for name, value in
                               (("res_intervention", 0), ("res_status", 0), ("res_action", "pass"))]
                else:
                    actions = [SetVar(Scope.TRANSACTION, "intervention", 0), SetVar(Scope.TRANSACTION, "status", 0),
                               SetVar(Scope.TRANSACTION, "action", "pass"),
                               SetVar(Scope.TRANSACTION, "handle", "capture/1/1#00000000.1")]
                self.conn.send_ack(notify.stream_id, notify.frame_id, actions)
        out = self.conn.data_to_send()
        if out:
            self.transport.write(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--haproxy", default="haproxy")
    p.add_argument("--out", type=pathlib.Path, required=True)
    p.add_argument("requests", nargs="+", choices=sorted(REQUESTS))
    args = p.parse_args(argv)

    agent_port, frontend, backend = free_port(), free_port(), free_port()
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(Recorder, "127.0.0.1", agent_port))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    env = {**os.environ, "FRONTEND_ADDR": f"127.0.0.1:{frontend}", "FRONTEND_ALT_ADDR": f"127.0.0.1:{free_port()}",
           "BACKEND_ADDR": f"127.0.0.1:{backend}", "GATEWAY_ADDR": f"127.0.0.1:{agent_port}",
           "SPOE_CONF": str(HAPROXY_DIR / "spoe-modsecurity.conf")}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "deploy/backend/albedo.py"), "--listen",
                               f"127.0.0.1:{backend}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_for_port(backend, procs[0], "backend")
        procs.append(subprocess.Popen([args.haproxy, "-db", "-f", str(HAPROXY_DIR / "haproxy.cfg")], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for_port(frontend, procs[1], "haproxy")
        for name in args.requests:
            method, path, body, headers = REQUESTS[name]
            conn = http.client.HTTPConnection("127.0.0.1", frontend, timeout=10)
            conn.request(method, path, body=body, headers={**BROWSER, **headers})
            reply = conn.getresponse()
            reply.read()
            conn.close()
            print(f"{method} {path}: {reply.status}", file=sys.stderr)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(10)
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    carried = [bytes(data) for data in Recorder.connections if len(data) > 200 and data[4] == 1]
    # HELLO and the NOTIFYs; not the DISCONNECT HAProxy says when it stops.
    notifying = b"".join(frame for frame in split_frames(max(carried, key=len, default=b""))
                         if frame[4] in (HAPROXY_HELLO, NOTIFY))
    if not notifying:
        print("HAProxy sent no NOTIFY", file=sys.stderr)
        return 1
    args.out.write_bytes(notifying)
    print(f"{args.out}: {len(notifying)} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
