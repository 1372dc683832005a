"""Several gateway processes on one SPOP port (GATEWAY_PROCESSES), for hosts
with more cores than one gateway process can use.

Each process is a whole gateway: its own SPOP listener bound with
SO_REUSEPORT (the kernel spreads HAProxy's connections over them), its own
pool of streams to wafsvc, its own metrics port (GATEWAY_METRICS's port plus
its index). They are forked before any gRPC object exists, as gRPC
requires. The parent only supervises: it restarts a process that dies and,
on SIGTERM or SIGINT, passes the signal on (each drains as a single gateway
does) and waits for them all.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Callable

from common.options import host_port

log = logging.getLogger("gateway")

RESTART_PAUSE_S = 1.0


def metrics_address(address: str, index: int) -> str:
    """GATEWAY_METRICS for process `index`: the same host, the port plus index."""
    if not address or index == 0:
        return address
    _, port = host_port(address)
    return f"{address.rpartition(':')[0]}:{port + index}"


def supervise(count: int, run: Callable[[int], int]) -> int:
    """Runs run(index) in `count` forked processes and waits; returns the
    exit code. run must not return before a signal asks it to."""
    children: dict[int, int] = {}   # pid -> index
    stopping = False

    def start(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the child: a gateway of its own
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 1
            try:
                code = run(index)
            finally:
                os._exit(code)
        children[pid] = index

    def stop(signo, _frame) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signo)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for index in range(count):
        start(index)
    log.info("gateway processes started", extra={"processes": count, "pids": sorted(children)})
    code = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid, None)
        if index is None:
            continue
        exit_code = os.waitstatus_to_exitcode(status)
        if stopping:
            code = code or (exit_code if exit_code > 0 else 0)
            continue
        log.error("gateway process died; starting another", extra={"index": index, "pid": pid,
                                                                    "status": exit_code})
        time.sleep(RESTART_PAUSE_S)
        start(index)
    return code
