"""`python -m wafsvc.healthcheck`, the container health check of the wafsvc
image and of Compose, against a real wafsvc process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from stack import Stack, StackSpec, free_port
from stack.processes import ROOT, wait_for_health


def healthcheck(listen: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WAF_LISTEN": listen}
    return subprocess.run([sys.executable, "-m", "wafsvc.healthcheck", "--timeout", "2", *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)


def start_wafsvc(log_dir):
    port = free_port()
    spec = StackSpec(wafsvc_ports=[port], log_dir=log_dir,
                     wafsvc_env={"RULES": str(ROOT / "rules/block-localhost.conf")})
    stack = Stack(spec)
    proc = stack.start_wafsvc(0)
    wait_for_health(port, proc, "wafsvc")
    return stack, port, proc


@pytest.fixture(scope="module")
def wafsvc(tmp_path_factory):
    stack, port, proc = start_wafsvc(tmp_path_factory.mktemp("healthcheck"))
    yield port, proc
    stack.stop()


@pytest.fixture()
def doomed_wafsvc(tmp_path):
    stack, port, proc = start_wafsvc(tmp_path)
    yield port, proc
    stack.stop()


def test_serving_wafsvc_is_healthy_through_a_wildcard_listen_address(wafsvc):
    port, _ = wafsvc
    result = healthcheck(f"0.0.0.0:{port}")
    assert result.returncode == 0, result.stderr
    assert "SERVING" in result.stderr


def test_unknown_service_is_unhealthy(wafsvc):
    port, _ = wafsvc
    result = healthcheck(f"127.0.0.1:{port}", "--service", "no.such.Service")
    assert result.returncode == 1
    assert "NOT_FOUND" in result.stderr


def test_stopped_wafsvc_is_unhealthy(doomed_wafsvc):
    port, proc = doomed_wafsvc
    proc.send_signal(signal.SIGTERM)
    proc.wait(15)
    result = healthcheck(f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr


# -- python -m gateway.healthcheck: the gateway image's, Compose's and the
# Kubernetes sidecar's probe, against a real gateway process.

def gateway_healthcheck(listen: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GATEWAY_LISTEN": listen}
    return subprocess.run([sys.executable, "-m", "gateway.healthcheck", "--timeout", "1"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)


@pytest.fixture()
def gateway(tmp_path):
    # No wafsvc: the HELLO is the gateway's own answer, whatever its pool.
    stack = Stack(StackSpec(wafsvc_ports=[free_port()], log_dir=tmp_path))
    proc = stack.start_gateway()
    yield stack.spec.gateway_port, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
    stack.stop()


def test_gateway_answering_hello_is_healthy_through_a_wildcard_listen_address(gateway):
    port, _ = gateway
    result = gateway_healthcheck(f"0.0.0.0:{port}")
    assert result.returncode == 0, result.stderr
    assert "AGENT-HELLO" in result.stderr


def test_stuck_gateway_is_unhealthy_though_its_port_accepts(gateway):
    """A frozen process still completes TCP handshakes (the kernel does):
    only an SPOP answer tells a working gateway from a stuck one."""
    import socket
    port, proc = gateway
    proc.send_signal(signal.SIGSTOP)
    socket.create_connection(("127.0.0.1", port), 2).close()
    result = gateway_healthcheck(f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert "timed out" in result.stderr
    proc.send_signal(signal.SIGCONT)
    assert gateway_healthcheck(f"127.0.0.1:{port}").returncode == 0


def test_stopped_gateway_is_unhealthy(gateway):
    port, proc = gateway
    proc.send_signal(signal.SIGTERM)
    proc.wait(15)
    result = gateway_healthcheck(f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert "ConnectionRefused" in result.stderr
