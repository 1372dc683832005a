"""A synthetic HAProxy for the isolated gateway benchmark: SPOP frames as
HAProxy sends them, pipelined over many connections.

- HELLO: HAProxy's own bytes, from the captures in fuzz/corpus/ (2.6 offers
  pipelining and async, 3.2 pipelining only).
- NOTIFY: the check-request message with the arguments of
  deploy/haproxy/spoe-modsecurity.conf, read from that file, each encoded the
  way HAProxy encodes that sample fetch (headers as req.hdrs_bin, url as a
  string, ports as INT64, ...), for the requests of bench/workloads.py.
- Pipelining: `depth` NOTIFYs in flight per connection (HAProxy 3.1+ allows
  20 per connection; 2.6 has max-waiting-frames, 20 by default). Stream ids
  grow as HAProxy's do: one counter for all connections in 2.6 (the HTTP
  stream's id), odd ids per connection in 3.2 (the mux's streams).

Two ways to drive:
- closed loop (`rate=0`): every ACK is answered with a new NOTIFY on its
  connection, those of one read in one write; this saturates the gateway;
- open loop (`rate>0`): NOTIFYs are due at fixed intervals, whatever the
  answers do. A NOTIFY that finds no connection with room waits, and its
  latency still counts from the time it was due (no coordinated omission);
  how late sends left against their schedule is reported as slip.

Every ACK is checked: a pass verdict's actions are the same bytes each time,
so one decoded and checked answer is compared with the rest byte for byte;
anything else is decoded and counted (a `failed` verdict is a failure).
"""

from __future__ import annotations

import asyncio
import pathlib
import re
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from bench import workloads
from gateway.spop import (Int64, Message, SetVar, decode_frame, encode_hdrs_bin, encode_kv_list,
                          encode_name, encode_varint)

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPOE_CONF = ROOT / "deploy" / "haproxy" / "spoe-modsecurity.conf"
CORPUS = ROOT / "fuzz" / "corpus"
HELLO_CAPTURES = {"2.6": "haproxy26-get.bin", "3.2": "haproxy32-get-and-form.bin"}
MAX_DEPTH = 20      # HAProxy's streams per SPOP connection (3.1+) / max-waiting-frames (2.6)
NOTIFY, AGENT_HELLO, AGENT_DISCONNECT, ACK = 3, 101, 102, 103
FIN = 1
TICK_S = 0.001       # the open-loop scheduler's pace (uvloop's timers have 1 ms steps); slip shows it
VARIANTS = 64       # distinct encodings per request of the mix (ids and ports differ)


# -- what HAProxy sends -------------------------------------------------------

def hello_frame(version: str) -> bytes:
    """HAProxy's HAPROXY-HELLO, exactly as captured."""
    data = (CORPUS / HELLO_CAPTURES[version]).read_bytes()
    return data[:4 + int.from_bytes(data[:4], "big")]


def spoe_message(conf: pathlib.Path = SPOE_CONF) -> tuple[str, list[tuple[str, str]]]:
    """The message name and its (argument, sample fetch) pairs from the SPOE file."""
    text = conf.read_text()
    name = re.search(r"^\s*messages\s+(\S+)", text, re.M).group(1)
    block = re.search(rf"^spoe-message\s+{re.escape(name)}\s*$(.*?)(?=^\S|\Z)", text, re.M | re.S).group(1)
    args = re.search(r"^\s*args\s+(.+)$", block, re.M).group(1).split()
    return name, [tuple(arg.split("=", 1)) for arg in args]


def _unique_id(i: int) -> str:
    # unique-id-format %{+X}o%ci:%cp_%fi:%fp_%Ts_%rt:%pid (deploy/haproxy/haproxy.cfg)
    return f"7F000001:{40000 + i % 20000:04X}_7F000001:1F90_{1764075000 + i:08X}_{i % 65536:04X}:4F79"


# How HAProxy encodes each sample fetch the SPOE file may name: typed data
# as the captures in fuzz/corpus/ show it. An unset variable is NULL.
FETCHES = {
    "unique-id": lambda req, i: _unique_id(i),
    "src": lambda req, i: IPv4Address("127.0.0.1"),
    "src_port": lambda req, i: Int64(40000 + i % 20000),
    "dst": lambda req, i: IPv4Address("127.0.0.1"),
    "dst_port": lambda req, i: Int64(8080),
    "method": lambda req, i: req.method,
    "url": lambda req, i: req.path,
    "path": lambda req, i: req.path.partition("?")[0],
    "query": lambda req, i: req.path.partition("?")[2] if "?" in req.path else None,
    "req.ver": lambda req, i: "1.1",
    "req.hdrs_bin": lambda req, i: encode_hdrs_bin([(k.lower().encode(), v.encode()) for k, v in req.all_headers()]),
    "req.body": lambda req, i: req.body,
    "req.body_size": lambda req, i: Int64(len(req.body)),
    "fe_name": lambda req, i: "web",
}


def fetch_value(fetch: str, req: workloads.Request, index: int):
    if fetch.startswith("var("):
        return None  # txn.waf_app, txn.ignorerules...: unset in the plain frontend
    try:
        return FETCHES[fetch](req, index)
    except KeyError:
        raise ValueError(f"{SPOE_CONF.name} sends '{fetch}', which the SPOP driver cannot encode yet: "
                         f"add it to FETCHES in bench/spop_driver.py") from None


def notify_payloads(mix: str, variants: int = VARIANTS) -> list[bytes]:
    """NOTIFY payloads (the message, no frame header) for every request of
    the mix, `variants` times each with different ids and ports."""
    name, args = spoe_message()
    out = []
    for v in range(variants):
        for n, req in enumerate(workloads.MIXES[mix]):
            i = v * len(workloads.MIXES[mix]) + n
            kv = [(arg, fetch_value(fetch, req, i)) for arg, fetch in args]
            out.append(encode_name(name) + bytes((len(kv),)) + encode_kv_list(kv))
    return out


def notify_frame(stream_id: int, payload: bytes) -> bytes:
    ids = encode_varint(stream_id) + b"\x01"  # frame-id 1: one frame per stream
    return struct.pack(">IBI", 5 + len(ids) + len(payload), NOTIFY, FIN) + ids + payload


def _read_varint(buf, pos: int) -> tuple[int, int]:
    b = buf[pos]
    if b < 240:
        return b, pos + 1
    value, shift = b, 4
    while True:
        pos += 1
        b = buf[pos]
        value += b << shift
        shift += 7
        if b < 128:
            return value, pos + 1


# -- the run ------------------------------------------------------------------

@dataclass
class Tally:
    acks: int = 0
    failed: int = 0           # ACKs without a verdict (the gateway's failure policy)
    unexpected: int = 0       # anything else that is not a pass verdict
    errors: list = field(default_factory=list)
    latencies: list = field(default_factory=list)   # seconds, from the intended send time
    slips: list = field(default_factory=list)       # seconds the scheduler sent late (open loop)
    waited: int = 0           # sends that found every connection full and waited for an answer
    record_after: float = float("inf")              # only sends due after this are recorded


class Driver:
    """Shared state of one run: the schedule, the payloads, the tallies."""

    def __init__(self, version: str, mix: str, depth: int) -> None:
        if not 1 <= depth <= MAX_DEPTH:
            raise ValueError(f"depth must be 1..{MAX_DEPTH} (HAProxy's streams per connection)")
        self.version = version
        self.depth = depth
        self.hello = hello_frame(version)
        self.payloads = notify_payloads(mix)
        self.turn = 0
        self.global_stream = 0
        self.expected_actions: bytes | None = None
        self.tally = Tally()
        self.backlog: deque[float] = deque()  # intended send times waiting for room (open loop)
        self.closed_loop = True
        self.stopping = False           # the run is over: connections close with NOTIFYs unanswered

    def next_payload(self) -> bytes:
        self.turn += 1
        return self.payloads[self.turn % len(self.payloads)]

    def check_ack(self, frame: bytes, actions: bytes) -> None:
        tally = self.tally
        tally.acks += 1
        if actions == self.expected_actions:
            return
        ack = decode_frame(frame)
        values = {a.name: a.value for a in ack.actions if isinstance(a, SetVar)}
        if values.get("failed"):
            tally.failed += 1
            if len(tally.errors) < 5:
                tally.errors.append(f"no verdict: {values.get('error')}")
        elif self.expected_actions is None and values.get("intervention") == 0 and values.get("action") == "pass":
            self.expected_actions = actions
        else:
            tally.unexpected += 1
            if len(tally.errors) < 5:
                tally.errors.append(f"unexpected ACK: {values}")


class DriverConnection(asyncio.Protocol):
    def __init__(self, driver: Driver, ready: asyncio.Future) -> None:
        self.d = driver
        self.ready = ready
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.inflight: dict[int, float] = {}  # stream id -> intended send time
        self.stream = -1 if driver.version == "3.2" else 0
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.d.hello)

    def connection_lost(self, exc) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"gateway closed the connection before AGENT-HELLO: {exc}"))
        elif self.inflight and not self.d.stopping:
            self.d.tally.errors.append(f"gateway closed a connection with {len(self.inflight)} NOTIFYs unanswered")

    def room(self) -> int:
        return 0 if self.closed else self.d.depth - len(self.inflight)

    def frames_for(self, intended: list[float], now: float) -> bytes:
        """NOTIFY frames for sends due at `intended` times."""
        d, out = self.d, []
        for due in intended:
            if self.d.version == "3.2":
                self.stream += 2
                stream = self.stream
            else:
                d.global_stream += 1
                stream = d.global_stream
            self.inflight[stream] = due
            out.append(notify_frame(stream, d.next_payload()))
        return b"".join(out)

    def send(self, intended: list[float], now: float) -> None:
        self.transport.write(self.frames_for(intended, now))

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        d, tally = self.d, self.d.tally
        now = time.monotonic()
        answered = 0
        off, end = 0, len(buf)
        while end - off >= 4:
            n = int.from_bytes(buf[off:off + 4], "big")
            if end - off < 4 + n:
                break
            kind = buf[off + 4]
            if kind == ACK:
                stream, pos = _read_varint(buf, off + 9)
                _, pos = _read_varint(buf, pos)
                due = self.inflight.pop(stream, None)
                if due is None:
                    tally.unexpected += 1
                    tally.errors.append(f"ACK for unknown stream {stream}")
                else:
                    d.check_ack(bytes(buf[off + 4:off + 4 + n]), bytes(buf[pos:off + 4 + n]))
                    if due >= tally.record_after:
                        tally.latencies.append(now - due)
                    answered += 1
            elif kind == AGENT_HELLO:
                if not self.ready.done():
                    self.ready.set_result(self)
            elif kind == AGENT_DISCONNECT:
                tally.errors.append(f"AGENT-DISCONNECT: {decode_frame(bytes(buf[off + 4:off + 4 + n]))!r}")
            off += 4 + n
        del buf[:off]
        if not answered:
            return
        if d.closed_loop:
            self.send([now] * answered, now)
        elif d.backlog:
            backlog = d.backlog
            self.send([backlog.popleft() for _ in range(min(answered, len(backlog)))], now)


async def open_connections(host: str, port: int, driver: Driver, count: int) -> list[DriverConnection]:
    loop = asyncio.get_running_loop()
    conns = []
    for _ in range(count):
        ready = loop.create_future()
        await loop.create_connection(lambda: DriverConnection(driver, ready), host, port)
        conns.append(await asyncio.wait_for(ready, 5))
    return conns


async def run_closed(conns: list[DriverConnection], driver: Driver, warmup_s: float, on_window) -> None:
    """Every connection keeps `depth` NOTIFYs in flight; `on_window(start)`
    is awaited after the warm-up and measures the window itself."""
    driver.closed_loop = True
    now = time.monotonic()
    for conn in conns:
        conn.send([now] * driver.depth, now)
    await asyncio.sleep(warmup_s)
    driver.tally.record_after = time.monotonic()
    await on_window()


async def run_open(conns: list[DriverConnection], driver: Driver, rate: float, warmup_s: float,
                   seconds: float, on_window) -> None:
    """NOTIFYs due every 1/rate s, handed to the connections in turn; one
    that finds no connection with room waits in the backlog for an answer."""
    driver.closed_loop = False
    start = time.monotonic()
    window = asyncio.get_running_loop().create_task(_after(warmup_s, driver, on_window))
    backlog, tally = driver.backlog, driver.tally
    sent, turn, n = 0, 0, len(conns)
    end = start + warmup_s + seconds + 0.5
    while not window.done():
        now = time.monotonic()
        fresh = 0
        if now < end:
            fresh = max(0, int((now - start) * rate) - sent)
            backlog.extend(start + (sent + k + 1) / rate for k in range(fresh))
            sent += fresh
        # Hand what is due to connections with room, in turn; what is left
        # waits for an answer to free a place (HAProxy queues it the same way).
        batches: dict[DriverConnection, list[float]] = {}
        waiting = len(backlog) - fresh
        while backlog:
            for _ in range(n):
                conn = conns[turn % n]
                turn += 1
                if conn.room() > len(batches.get(conn, ())):
                    break
            else:
                break
            due = backlog.popleft()
            batches.setdefault(conn, []).append(due)
            if waiting > 0:
                waiting -= 1
            elif due >= tally.record_after:
                tally.slips.append(now - due)  # the scheduler's own lateness
        if fresh and tally.record_after <= now:
            tally.waited += min(fresh, len(backlog))
        for conn, intended in batches.items():
            conn.send(intended, now)
        await asyncio.sleep(TICK_S)
    await window


async def _after(delay: float, driver: Driver, on_window) -> None:
    await asyncio.sleep(delay)
    driver.tally.record_after = time.monotonic()
    await on_window()
