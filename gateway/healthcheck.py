"""Container health check: says SPOP HELLO to the gateway, as HAProxy's
`option spop-check` does, and expects AGENT-HELLO back.

    python -m gateway.healthcheck                    # the address in GATEWAY_LISTEN
    python -m gateway.healthcheck --target 127.0.0.1:12345

Exit status 0 on an AGENT-HELLO, 1 otherwise (refused, timed out, another
answer), with the reason on stderr; 2 on a bad address. Unlike a bare TCP
connect, which the kernel accepts even while the gateway's event loop is
stuck, this needs the gateway itself to answer. Compose's healthcheck and
the Kubernetes probes of the gateway sidecar use it. It imports the codec
only: no gRPC, so it starts fast.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys

from common.options import dial_address
from gateway.spop import AgentHello, SpopError, decode_frame, encode_haproxy_hello

DEFAULT_LISTEN = "127.0.0.1:12345"
MAX_REPLY = 65536




def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def check(target: tuple[str, int], timeout_s: float) -> tuple[bool, str]:
    where = f"{target[0]}:{target[1]}"
    try:
        with socket.create_connection(target, timeout=timeout_s) as sock:
            sock.sendall(encode_haproxy_hello(capabilities=(), healthcheck=True))
            length = struct.unpack(">I", _read_exactly(sock, 4))[0]
            if length > MAX_REPLY:
                return False, f"{where}: a {length}-byte frame is no AGENT-HELLO"
            frame = decode_frame(_read_exactly(sock, length))
    except (OSError, SpopError) as exc:
        return False, f"{where}: {type(exc).__name__}: {exc}"
    if not isinstance(frame, AgentHello):
        return False, f"{where}: answered {type(frame).__name__}, not AGENT-HELLO"
    return True, f"{where}: AGENT-HELLO, SPOP {frame.version}, max-frame-size {frame.max_frame_size}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="HOST:PORT to dial; default derived from GATEWAY_LISTEN")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    try:
        target = dial_address(args.target or os.environ.get("GATEWAY_LISTEN") or DEFAULT_LISTEN)
    except ValueError as exc:
        print(f"gateway.healthcheck: {'--target' if args.target else 'GATEWAY_LISTEN'}: {exc}", file=sys.stderr)
        return 2
    healthy, detail = check(target, args.timeout)
    print(detail, file=sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
