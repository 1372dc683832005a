"""GATEWAY_PROCESSES=2: two gateway processes share HAProxy's SPOP port
(SO_REUSEPORT), each with its own streams and metrics port, under one
supervisor that stops them all."""

from __future__ import annotations

import os
import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from stack import free_port
from tests.e2e.conftest import http_request, start_stack, wait_for

SQLI = "/?id=1%27%20or%20%271%27%3D%271"


def _evaluations(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "modsec_gateway_evaluations_total")


def _two_free_ports() -> int:
    """A port whose next one is free too: process i serves metrics on port + i."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports")


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_two_processes_serve_one_port_and_stop_together(haproxy_bin, tmp_path):
    metrics = _two_free_ports()
    s = start_stack(tmp_path, haproxy_bin, wafsvc_env={"RULES": "rules/block-localhost.conf"},
                    gateway_env={"GATEWAY_PROCESSES": "2", "GATEWAY_METRICS": f"127.0.0.1:{metrics}"})
    try:
        supervisor = s.proc("gateway").pid
        children = wait_for(lambda: (lambda c: c if len(c) == 2 else None)(_children(supervisor)),
                            what="two gateway processes")
        before = _evaluations(metrics) + _evaluations(metrics + 1)
        replies = [http_request(s.spec.frontend_port, path=SQLI).status for _ in range(20)]
        assert replies == [403] * 20   # rules/block-localhost.conf: every request is denied
        after = wait_for(lambda: (lambda n: n if n - before >= 20 else None)(
            _evaluations(metrics) + _evaluations(metrics + 1)), what="evaluations counted")
        assert after - before == 20
        log = (tmp_path / "gateway.log").read_text()
        assert log.count('"gateway listening"') == 2 and "gateway process died" not in log
    finally:
        codes = s.stop()
    assert codes["gateway"] == 0
    assert not any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
                   for pid in children)
