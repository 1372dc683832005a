"""Socket-level fuzzer for a RUNNING gateway.

    python -m fuzz.spop_fuzz --seconds 120            # starts wafsvc + gateway itself
    python -m fuzz.spop_fuzz --gateway 127.0.0.1:12345 # or hits one you run

Each case opens a connection and sends a session built from real HAProxy
captures (fuzz/corpus/, HAProxy 2.6 and 3.2), mutated: flipped bytes,
truncated frames, oversized lengths, bad varints, wrong typed-data tags,
unknown frame types, frames out of order or interleaved with agent frames,
random bytes. The sans-IO codec (gateway.spop) is the oracle: fed the same
bytes, it says which AGENT-DISCONNECT status the gateway must answer with,
or that the connection must stay open. The gateway's output must decode,
respect the negotiated max-frame-size and end as the oracle says.

Meanwhile a well-formed session on its own connection keeps asking for
verdicts; every one must come back, right (a rule tells benign from attack),
and in time. At the end the gateway must still be running.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import pathlib
import random
import struct
import sys
import tempfile
import time
from collections import Counter

from gateway.spop import (AgentConnection, ConnectionClosed, DisconnectReceived, FrameType, Int64,
                          Message, SetVar, SpopError, Status, decode_frame, encode_agent_hello,
                          encode_haproxy_disconnect, encode_haproxy_hello, encode_hdrs_bin,
                          encode_notify)
from gateway.spop.connection import ConnectionState

CORPUS = pathlib.Path(__file__).resolve().parent / "corpus"
MAX_FRAME_SIZE = 16380  # what the gateway under test is started with (and HAProxy offers)
ATTACK_RULE_ID = 10077
FUZZ_RULES = (f'SecRule REQUEST_HEADERS:x-fuzz-attack "@streq 1" '
              f'"id:{ATTACK_RULE_ID},phase:1,deny,status:403,log,msg:\'fuzz probe\'"\n')
CASE_TIMEOUT_S = 5.0


# -- corpus and mutations ---------------------------------------------------

def load_corpus() -> list[list[bytes]]:
    """Each capture as its list of whole frames (length prefix included)."""
    sessions = []
    for path in sorted(CORPUS.glob("*.bin")):
        sessions.append(split_frames(path.read_bytes()))
    if not sessions:
        raise SystemExit(f"no captures in {CORPUS}")
    return sessions


def split_frames(data: bytes) -> list[bytes]:
    frames, off = [], 0
    while off + 4 <= len(data):
        n = int.from_bytes(data[off:off + 4], "big")
        frames.append(data[off:off + 4 + n])
        off += 4 + n
    return frames


def _reframe(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _pick(rng: random.Random, frames: list[bytes]) -> int:
    return rng.randrange(len(frames))


def m_flip(rng, frames):
    i = _pick(rng, frames)
    f = bytearray(frames[i])
    for _ in range(rng.randint(1, 4)):
        f[rng.randrange(4, len(f))] = rng.randrange(256)
    frames[i] = bytes(f)
    return frames


def m_flip_keep_length(rng, frames):  # payload damage inside a well-framed frame
    i = _pick(rng, frames)
    f = bytearray(frames[i])
    if len(f) > 14:
        f[rng.randrange(14, len(f))] = rng.randrange(256)
    frames[i] = bytes(f)
    return frames


def m_truncate_payload(rng, frames):  # cut, with the length fixed up: decode errors
    i = _pick(rng, frames)
    body = frames[i][4:]
    frames[i] = _reframe(body[:rng.randrange(len(body))])
    return frames


def m_truncate_stream(rng, frames):  # cut mid-frame, declared length kept: the rest never comes
    data = b"".join(frames)
    return [data[:rng.randrange(1, len(data))]]


def m_oversized_length(rng, frames):
    i = _pick(rng, frames)
    size = rng.choice([MAX_FRAME_SIZE + 1, 1 << 20, (1 << 32) - 1, rng.randrange(MAX_FRAME_SIZE + 1, 1 << 32)])
    frames[i] = struct.pack(">I", size) + frames[i][4:]
    return frames


def m_undersized_length(rng, frames):
    i = _pick(rng, frames)
    frames[i] = struct.pack(">I", rng.randrange(0, 7)) + frames[i][4:]
    return frames


def m_bad_varint(rng, frames):  # stream-id that never ends or overflows 64 bits
    i = _pick(rng, frames)
    body = frames[i][4:]
    frames[i] = _reframe(body[:5] + b"\xff" * rng.randint(1, 14) + body[5:])
    return frames


def m_wrong_tag(rng, frames):  # a typed-data tag changed to another (or unknown) type
    i = _pick(rng, frames)
    f = bytearray(frames[i])
    tags = [j for j in range(11, len(f)) if f[j] & 0x0F in (2, 3, 8, 9) and f[j] >> 4 == 0]
    if tags:
        f[rng.choice(tags)] = rng.choice([0x00, 0x01, 0x02, 0x03, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0f, 0x13])
    frames[i] = bytes(f)
    return frames


def m_frame_type(rng, frames):
    i = _pick(rng, frames)
    f = bytearray(frames[i])
    f[4] = rng.choice([0, 4, 100, 101, 102, 103, 200, 255])
    frames[i] = bytes(f)
    return frames


def m_flags(rng, frames):  # fragmentation: no FIN, ABORT
    i = _pick(rng, frames)
    f = bytearray(frames[i])
    f[5:9] = struct.pack(">I", rng.choice([0, 2, 3, 0xFFFFFFFF]))
    frames[i] = bytes(f)
    return frames


def m_reorder(rng, frames):
    rng.shuffle(frames)
    return frames


def m_duplicate(rng, frames):
    i = _pick(rng, frames)
    frames.insert(rng.randrange(len(frames) + 1), frames[i])
    return frames


def m_drop(rng, frames):
    if len(frames) > 1:
        del frames[_pick(rng, frames)]
    return frames


def m_interleave_agent(rng, frames):  # frames only an agent may send, from HAProxy
    agent = rng.choice([encode_agent_hello(16380), b"\x00\x00\x00\x07\x67\x00\x00\x00\x01\x01\x01"])
    frames.insert(rng.randrange(len(frames) + 1), agent)
    return frames


def m_disconnect(rng, frames):
    frames.insert(rng.randrange(len(frames) + 1), encode_haproxy_disconnect(rng.choice([0, 2, 99]), "bye"))
    return frames


def m_random_frame(rng, frames):
    body = bytes([rng.choice([1, 2, 3])]) + b"\x00\x00\x00\x01" + rng.randbytes(rng.randrange(2, 200))
    frames.insert(rng.randrange(len(frames) + 1), _reframe(body))
    return frames


def m_small_frame_size(rng, frames):  # HAProxy offers little room: ACKs must fit it
    if frames and frames[0][4:5] == b"\x01":
        frames[0] = encode_haproxy_hello(("2.0",), rng.randrange(200, 1200), ("pipelining",))
    return frames


def m_random_bytes(rng, frames):
    return [rng.randbytes(rng.randrange(1, 300))]


def m_splice(rng, frames):
    cut = rng.randrange(len(frames) + 1)
    return frames[:cut] + [bytes(reversed(f)) if rng.random() < 0.1 else f for f in frames[cut:]]


MUTATORS = [m_flip, m_flip_keep_length, m_truncate_payload, m_truncate_stream, m_oversized_length,
            m_undersized_length, m_bad_varint, m_wrong_tag, m_frame_type, m_flags, m_reorder,
            m_duplicate, m_drop, m_interleave_agent, m_disconnect, m_random_frame, m_random_bytes,
            m_splice, m_small_frame_size]


def mutate(rng: random.Random, session: list[bytes]) -> tuple[str, bytes]:
    frames = list(session)
    names = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        mutator = rng.choice(MUTATORS)
        names.append(mutator.__name__[2:])
        try:
            frames = mutator(rng, frames) or [b""]
        except (ValueError, IndexError):  # nothing to mutate that way in so short a frame
            pass
    return "+".join(names), b"".join(frames)


# -- the oracle -------------------------------------------------------------

@dataclasses.dataclass
class Expect:
    status: int | None      # AGENT-DISCONNECT status the gateway must send; None: none
    closes: bool            # the gateway closes the connection by itself
    max_frame: int          # the negotiated max-frame-size


def oracle(data: bytes) -> Expect:
    conn = AgentConnection(max_frame_size=MAX_FRAME_SIZE)
    events = conn.receive_data(data)
    max_frame = conn.max_frame_size
    for event in events:
        if isinstance(event, ConnectionClosed):
            return Expect(int(event.status), True, max_frame)
        if isinstance(event, DisconnectReceived):
            return Expect(int(Status.NORMAL), True, max_frame)
    if conn.state is ConnectionState.CLOSED:  # health-check HELLO: AGENT-HELLO, then close
        return Expect(None, True, max_frame)
    return Expect(None, False, max_frame)


# -- running cases ----------------------------------------------------------

@dataclasses.dataclass
class Stats:
    cases: int = 0
    bytes_sent: int = 0
    failures: list = dataclasses.field(default_factory=list)
    statuses: Counter = dataclasses.field(default_factory=Counter)
    mutations: Counter = dataclasses.field(default_factory=Counter)
    verdicts: int = 0
    verdict_errors: list = dataclasses.field(default_factory=list)
    slowest_verdict_ms: float = 0.0


def parse_output(data: bytes, max_frame: int) -> list:
    frames, off = [], 0
    while off < len(data):
        if off + 4 > len(data):
            raise ValueError(f"gateway output ends inside a length prefix: {data[off:]!r}")
        n = int.from_bytes(data[off:off + 4], "big")
        if n > max_frame:
            raise ValueError(f"gateway sent a frame of {n} bytes > negotiated {max_frame}")
        if off + 4 + n > len(data):
            raise ValueError("gateway output ends inside a frame")
        frames.append(decode_frame(data[off + 4:off + 4 + n]))
        off += 4 + n
    return frames


async def _read_all(reader: asyncio.StreamReader, timeout: float) -> bytes:
    chunks = []
    async def loop():
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return
            chunks.append(chunk)
    try:
        await asyncio.wait_for(loop(), timeout)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


async def run_case(host: str, port: int, rng: random.Random, session: list[bytes], stats: Stats) -> None:
    name, data = mutate(rng, session)
    expect = oracle(data)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        # A few writes of random sizes: the gateway must not care how bytes
        # arrive. Not when it will close: bytes landing after its close make
        # the kernel reset the connection, which can eat the DISCONNECT.
        cuts = (sorted(rng.sample(range(1, len(data)), min(3, len(data) - 1)))
                if len(data) > 1 and not expect.closes else [])
        for a, b in zip([0] + cuts, cuts + [len(data)]):
            writer.write(data[a:b])
            await writer.drain()
        if not expect.closes:
            writer.write_eof()  # we end it: the gateway must close without complaint
        try:
            out = await _read_all(reader, CASE_TIMEOUT_S)
        except asyncio.TimeoutError:
            stats.failures.append((name, data.hex(), "gateway neither answered nor closed in time"))
            return
    except (ConnectionResetError, BrokenPipeError) as exc:
        stats.failures.append((name, data.hex(), f"connection reset: {exc!r}"))
        return
    finally:
        writer.close()
    stats.cases += 1
    stats.bytes_sent += len(data)
    stats.mutations[name.split("+")[0]] += 1
    try:
        frames = parse_output(out, expect.max_frame)
    except (ValueError, SpopError) as exc:
        stats.failures.append((name, data.hex(), f"bad output: {exc}"))
        return
    disconnects = [f for f in frames if type(f).__name__ == "AgentDisconnect"]
    got = disconnects[-1].status if disconnects else None
    if got is not None and got != expect.status:
        stats.failures.append((name, data.hex(), f"AGENT-DISCONNECT status {got}, expected {expect.status}"))
        return
    if expect.status is not None and got is None:
        stats.failures.append((name, data.hex(), f"no AGENT-DISCONNECT, expected status {expect.status}"))
        return
    stats.statuses[Status(got).name if got is not None else ("closed" if expect.closes else "open")] += 1


async def fuzz_loop(host: str, port: int, seconds: float, seed: int, concurrency: int, stats: Stats) -> None:
    corpus = load_corpus()
    deadline = time.monotonic() + seconds

    async def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        while time.monotonic() < deadline:
            await run_case(host, port, rng, rng.choice(corpus), stats)

    await asyncio.gather(*(worker(i) for i in range(concurrency)))


# -- the well-formed session beside the fuzzing -----------------------------

def check_request(index: int, attack: bool) -> Message:
    headers = [(b"host", b"fuzz.example"), (b"user-agent", b"spop-fuzz")]
    if attack:
        headers.append((b"x-fuzz-attack", b"1"))
    return Message("check-request", (
        ("id", f"fuzz-{index}"), ("method", "GET"), ("uri", f"/health/{index}"), ("ver", "1.1"),
        ("headers", encode_hdrs_bin(headers)), ("body", b""), ("body_size", Int64(0))))


async def healthy_session(host: str, port: int, stop: asyncio.Event, stats: Stats,
                          interval_s: float = 0.01, answer_timeout_s: float = 3.0) -> None:
    """One HAProxy-like connection asking for verdicts all along; each must be right."""
    hello = split_frames((CORPUS / "haproxy26-get.bin").read_bytes())[0]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(hello)
    buffer = bytearray()

    async def next_frame():
        while True:
            if len(buffer) >= 4:
                n = int.from_bytes(buffer[:4], "big")
                if len(buffer) >= 4 + n:
                    frame = decode_frame(bytes(buffer[4:4 + n]))
                    del buffer[:4 + n]
                    return frame
            chunk = await asyncio.wait_for(reader.read(65536), answer_timeout_s)
            if not chunk:
                raise ConnectionError("gateway closed the healthy session")
            buffer.extend(chunk)

    try:
        agent_hello = await next_frame()
        if type(agent_hello).__name__ != "AgentHello":
            raise ConnectionError(f"expected AGENT-HELLO, got {agent_hello!r}")
        index = 0
        while not stop.is_set():
            index += 1
            attack = index % 3 == 0
            started = time.monotonic()
            writer.write(encode_notify(index, 1, [check_request(index, attack)]))
            ack = await next_frame()
            elapsed_ms = (time.monotonic() - started) * 1000
            stats.slowest_verdict_ms = max(stats.slowest_verdict_ms, elapsed_ms)
            values = {a.name: a.value for a in getattr(ack, "actions", ()) if isinstance(a, SetVar)}
            if type(ack).__name__ != "Ack" or ack.stream_id != index:
                stats.verdict_errors.append(f"request {index}: unexpected frame {ack!r}")
            elif values.get("failed"):
                stats.verdict_errors.append(f"request {index}: no verdict: {values.get('error')}")
            elif values.get("intervention") != int(attack) or (attack and str(ATTACK_RULE_ID) not in values.get("rules", "")):
                stats.verdict_errors.append(f"request {index}: wrong verdict {values} (attack={attack})")
            else:
                stats.verdicts += 1
            await asyncio.sleep(interval_s)
    except (ConnectionError, asyncio.TimeoutError) as exc:
        stats.verdict_errors.append(f"healthy session broke: {exc!r}")
    finally:
        writer.close()


async def run(host: str, port: int, seconds: float, seed: int, concurrency: int) -> Stats:
    stats = Stats()
    stop = asyncio.Event()
    health = asyncio.create_task(healthy_session(host, port, stop, stats))
    await asyncio.sleep(0.2)  # the healthy session is established before the fuzzing starts
    try:
        await fuzz_loop(host, port, seconds, seed, concurrency, stats)
    finally:
        await asyncio.sleep(0.2)  # and still served after it
        stop.set()
        await health
    return stats


# -- a gateway to fuzz ------------------------------------------------------

GATEWAY_ENV = {
    "GATEWAY_MAX_FRAME_SIZE": str(MAX_FRAME_SIZE),
    "GATEWAY_HELLO_TIMEOUT_MS": "2000",
    "GATEWAY_FRAME_TIMEOUT_MS": "2000",
    "GATEWAY_IDLE_TIMEOUT_MS": "30000",
    "GATEWAY_DEADLINE_MS": "1000",
    "GATEWAY_CHANNELS": "1",
    "GATEWAY_STREAMS": "2",
    "LOG_LEVEL": "error",  # thousands of protocol errors are the point here
}


def start_gateway(log_dir: pathlib.Path, gateway_env: dict[str, str] | None = None):
    """wafsvc (one worker, the probe rule) and a gateway, no HAProxy."""
    from stack import Stack, StackSpec
    from stack.processes import wait_for_health

    rules = log_dir / "fuzz-rules.conf"
    rules.write_text(FUZZ_RULES)
    spec = StackSpec(log_dir=log_dir, wafsvc_env={"RULES": str(rules), "LOG_LEVEL": "warning"},
                     gateway_env={**GATEWAY_ENV, **(gateway_env or {})})
    stack = Stack(spec)
    try:
        proc = stack.start_wafsvc(0)
        wait_for_health(spec.wafsvc_ports[0], proc, "wafsvc")
        stack.start_gateway()
    except BaseException:
        stack.stop()
        raise
    return stack


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def report(stats: Stats, seconds: float) -> str:
    lines = [f"spop fuzz: {stats.cases} inputs tried in {seconds:.1f}s ({stats.bytes_sent} bytes), "
             f"{len(stats.failures)} failures; healthy session: {stats.verdicts} verdicts, "
             f"{len(stats.verdict_errors)} errors, slowest {stats.slowest_verdict_ms:.0f} ms",
             "  outcomes: " + ", ".join(f"{k}={v}" for k, v in stats.statuses.most_common()),
             "  mutations: " + ", ".join(f"{k}={v}" for k, v in stats.mutations.most_common())]
    for name, data, why in stats.failures[:10]:
        lines.append(f"  FAIL {name}: {why}\n    input: {data[:4000]}")
    for error in stats.verdict_errors[:10]:
        lines.append(f"  HEALTH {error}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--gateway", default="", help="HOST:PORT of a running gateway (default: start one)")
    args = parser.parse_args(argv)
    stack = None
    if args.gateway:
        host, _, port = args.gateway.rpartition(":")
        pid = None
    else:
        log_dir = pathlib.Path(tempfile.mkdtemp(prefix="spop-fuzz-"))
        stack = start_gateway(log_dir)
        host, port, pid = "127.0.0.1", stack.spec.gateway_port, stack.proc("gateway").pid
        print(f"gateway pid {pid} on {host}:{port}, logs in {log_dir}", flush=True)
    print(f"seed {args.seed}", flush=True)
    rss_before = rss_kib(pid) if pid else 0
    started = time.monotonic()
    try:
        stats = asyncio.run(run(host, int(port), args.seconds, args.seed, args.concurrency))
        print(report(stats, time.monotonic() - started))
        alive = stack is None or stack.proc("gateway").poll() is None
        if pid:
            print(f"gateway RSS: {rss_before} KiB before, {rss_kib(pid)} KiB after; alive={alive}")
    finally:
        if stack is not None:
            stack.stop()
    return 0 if alive and not stats.failures and not stats.verdict_errors and stats.verdicts else 1


if __name__ == "__main__":
    sys.exit(main())
