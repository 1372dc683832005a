"""The Python client against real wafsvc processes over gRPC: verdicts,
inputs, stream mode and its ordering, typed errors, TLS and tokens, and
retries on another replica when one is SIGKILLed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading

import pytest

from modsec_spoa_client import (TLS, Action, AsyncClient, AuthError, Client, ErrorReason, HttpRequest, HttpResponse,
                                TransactionLost, UnknownApplication, WafError, WafTimeout, WafUnavailable)
from stack import free_port
from tests.e2e.tls_certs import SERVER_NAME, make_pki
from tests.e2e.wafsvc_only import start_wafsvc, target

ATTACK = HttpRequest("GET", "/search?q=attack", headers={"Host": "shop.example"})
BENIGN = HttpRequest("GET", "/search?q=shoes", headers={"Host": "shop.example"})


@pytest.fixture(scope="module")
def waf(tmp_path_factory):
    stack = start_wafsvc(tmp_path_factory.mktemp("client"), workers=2)
    yield target(stack)
    stack.stop()


def test_evaluate_gives_typed_verdicts(waf):
    with Client(target=waf) as client:
        blocked = client.evaluate(ATTACK)
        allowed = client.evaluate(BENIGN)
    assert blocked.blocked and blocked.action is Action.DENY and blocked.status == 403
    assert blocked.rule_ids == (1001,) and blocked.matches[0].message == "attack marker"
    assert allowed.allowed and allowed.action is Action.PASS and allowed.rule_ids == ()


def test_raw_http_bytes_are_evaluated_whole(waf):
    raw = (b"POST /form HTTP/1.1\r\nHost: shop.example\r\nX-Probe: probe\r\n"
           b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 15\r\n\r\nname=attack&x=1")
    with Client(target=waf) as client:
        verdict = client.evaluate(raw)
    assert verdict.blocked and verdict.rule_ids == (1002, 1001)


def test_body_past_the_client_limit_is_cut_and_flagged(waf):
    with Client(target=waf, max_body_bytes=16) as client:
        verdict = client.evaluate(HttpRequest("POST", "/", headers={"Content-Type": "text/plain"},
                                              body=b"x" * 32 + b"attack", content_length=38))
    # Cut before the attack: wafsvc's truncated-body policy (block) decides.
    assert verdict.blocked and 99010 in verdict.rule_ids


def test_async_client(waf):
    async def run():
        async with AsyncClient(target=waf) as client:
            return await asyncio.gather(client.evaluate(ATTACK), client.evaluate(BENIGN))
    blocked, allowed = asyncio.run(run())
    assert blocked.blocked and allowed.allowed


def test_stream_answers_every_request_once_in_order(waf):
    requests = [ATTACK if i % 3 == 0 else BENIGN for i in range(600)]
    with Client(target=waf) as client, client.stream() as stream:
        verdicts = list(stream.evaluate_many(requests, window=64))
        assert stream.worker.count("/") == 2  # "<host>/<supervisor pid>/<worker pid>"
    assert [v.blocked for v in verdicts] == [r is ATTACK for r in requests]


def test_async_stream_batches_concurrent_requests(waf):
    requests = [ATTACK if i % 5 == 0 else BENIGN for i in range(500)]

    async def run():
        async with AsyncClient(target=waf) as client, client.stream() as stream:
            return await stream.evaluate_all(requests), stream.worker
    verdicts, worker = asyncio.run(run())
    assert worker and [v.blocked for v in verdicts] == [r is ATTACK for r in requests]


def test_stream_item_errors_are_typed_and_leave_the_stream_open(waf):
    with Client(target=waf) as client, client.stream() as stream:
        bad = stream.submit(HttpRequest("GET", "/", application="no-such-app"))
        good = stream.submit(ATTACK)
        with pytest.raises(UnknownApplication) as caught:
            bad.result(5)
        assert good.result(5).blocked
    assert (caught.value.code, caught.value.reason) == ("NOT_FOUND", ErrorReason.UNKNOWN_APPLICATION)


LEAK = HttpResponse(200, headers=[("Content-Type", "text/plain"), ("X-Leak", "1")], body=b"secret")
CLEAN = HttpResponse(200, headers=[("Content-Type", "text/plain")], body=b"fine")


def test_response_inspection_reaches_the_worker_holding_the_transaction(waf):
    # Two workers, two pinned connections: each response must find its own worker.
    with Client(target=waf) as client:
        verdicts = [client.evaluate(BENIGN, inspect_response=True) for _ in range(20)]
        assert all(v.allowed and v.transaction_handle for v in verdicts)
        assert client.evaluate(ATTACK, inspect_response=True).transaction_handle == ""  # blocked: not kept
        outcomes = [client.evaluate_response(v, LEAK if i % 2 else CLEAN) for i, v in enumerate(verdicts)]
        assert [o.blocked for o in outcomes] == [bool(i % 2) for i in range(20)]
        assert outcomes[1].status == 502 and 2001 in outcomes[1].rule_ids
        with pytest.raises(TransactionLost) as used:
            client.evaluate_response(verdicts[0], CLEAN)  # a transaction is used once
        assert used.value.reason is ErrorReason.TRANSACTION_UNKNOWN
    with Client(target=waf) as other, pytest.raises(TransactionLost) as foreign:
        other.evaluate_response(verdicts[0], CLEAN)  # this client has no connection to that worker yet
    assert foreign.value.reason is ErrorReason.TRANSACTION_OTHER_WORKER


def test_response_inspection_on_streams(waf):
    with Client(target=waf) as client, client.stream() as stream:
        kept = stream.evaluate(BENIGN, inspect_response=True)
        assert kept.transaction_handle.startswith(stream.worker + "#")
        assert stream.evaluate_response(kept, LEAK).blocked

    async def run():
        async with AsyncClient(target=waf) as client:
            unary = await client.evaluate(BENIGN, inspect_response=True)
            async with client.stream() as s:
                kept = await s.evaluate(BENIGN, inspect_response=True)
                return await client.evaluate_response(unary, CLEAN), await s.evaluate_response(kept, LEAK)
    clean, leak = asyncio.run(run())
    assert clean.allowed and leak.blocked and leak.rule_ids == (2001,)


def test_nothing_listening_is_unavailable_within_the_deadline():
    with Client(target=f"127.0.0.1:{free_port()}", deadline=2, retries=1) as client:
        with pytest.raises(WafUnavailable) as caught:
            client.evaluate(BENIGN)
    assert caught.value.retryable and isinstance(caught.value, WafError)


def test_a_hung_wafsvc_is_a_timeout(tmp_path):
    stack = start_wafsvc(tmp_path)
    try:
        os.killpg(stack.proc("wafsvc1").pid, signal.SIGSTOP)
        with Client(target=target(stack), deadline=0.5) as client, pytest.raises(WafTimeout):
            client.evaluate(BENIGN)
        with Client(target=target(stack), deadline=0.5) as client, client.stream() as stream:
            with pytest.raises(WafTimeout):
                stream.evaluate(BENIGN)
    finally:
        os.killpg(stack.proc("wafsvc1").pid, signal.SIGCONT)
        stack.stop()


def test_mutual_tls_and_token(tmp_path):
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    env = {"WAF_TLS_CERT": str(pki.server_cert), "WAF_TLS_KEY": str(pki.server_key),
           "WAF_TLS_CLIENT_CA": str(pki.ca), "WAF_TOKEN_FILE": str(token_file)}
    health_env = {"GATEWAY_TLS_CA": str(pki.ca), "GATEWAY_TLS_CERT": str(pki.client_cert),
                  "GATEWAY_TLS_KEY": str(pki.client_key), "GATEWAY_TLS_SERVER_NAME": SERVER_NAME}
    stack = start_wafsvc(tmp_path / "logs", env=env, health_env=health_env)
    tls = TLS(ca=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key), server_name=SERVER_NAME)
    try:
        with Client(target=target(stack), tls=tls, token="s3cret-token") as client:
            assert client.evaluate(ATTACK).blocked
        with Client(target=target(stack), tls=tls, token="wrong") as client, pytest.raises(AuthError):
            client.evaluate(ATTACK)
        # No client certificate: the handshake fails, which gRPC reports as unavailable.
        with Client(target=target(stack), tls=TLS(ca=str(pki.ca), server_name=SERVER_NAME),
                    token="s3cret-token", deadline=2, retries=0) as client, pytest.raises(WafUnavailable):
            client.evaluate(ATTACK)
        # The same settings from the environment, as the CLI reads them.
        env_client = {"MODSEC_SPOA_TARGET": target(stack), "MODSEC_SPOA_TLS_CA": str(pki.ca),
                      "MODSEC_SPOA_TLS_CERT": str(pki.client_cert), "MODSEC_SPOA_TLS_KEY": str(pki.client_key),
                      "MODSEC_SPOA_TLS_SERVER_NAME": SERVER_NAME, "MODSEC_SPOA_TOKEN_FILE": str(token_file)}
        code = subprocess.run([sys.executable, "-c", (
            "from modsec_spoa_client import *\n"
            "with Client(ClientConfig.from_env()) as c: raise SystemExit(1 if c.evaluate(HttpRequest('GET', "
            "'/?q=attack')).blocked else 0)")], env={**os.environ, **env_client}).returncode
        assert code == 1
    finally:
        stack.stop()


# -- a replica dies -----------------------------------------------------------

def _hammer(client_or_stream, stop: threading.Event, outcomes: list, errors: list) -> None:
    while not stop.is_set():
        try:
            outcomes.append(client_or_stream.evaluate(ATTACK).blocked)
        except WafError as exc:
            errors.append(exc)


def test_unary_calls_retry_on_the_other_replica_when_one_is_sigkilled(tmp_path):
    stack = start_wafsvc(tmp_path, replicas=2)
    try:
        with Client(target=target(stack), deadline=5, retries=2) as client:
            stop, outcomes, errors = threading.Event(), [], []
            threads = [threading.Thread(target=_hammer, args=(client, stop, outcomes, errors)) for _ in range(8)]
            for t in threads:
                t.start()
            while len(outcomes) < 400:
                stop.wait(0.01)
            # Stopped first, so that calls are surely in flight on it when it
            # dies (round robin sends every thread there within milliseconds).
            os.killpg(stack.proc("wafsvc1").pid, signal.SIGSTOP)
            stop.wait(0.3)
            stack.kill_wafsvc(0, signal.SIGKILL)
            before = len(outcomes)
            while len(outcomes) < before + 400 and not errors:
                stop.wait(0.01)
            stop.set()
            for t in threads:
                t.join()
            retried = client.retries
    finally:
        stack.stop()
    assert not errors, errors[:3]
    assert all(outcomes)
    # The calls in flight on the killed replica failed and were answered by
    # the other one: without retries they would be errors above.
    assert retried >= 1


def test_stream_resends_unanswered_requests_when_its_replica_is_sigkilled(tmp_path):
    stack = start_wafsvc(tmp_path, replicas=2)
    try:
        with Client(target=target(stack), deadline=5) as client, client.stream() as stream:
            stream.evaluate(BENIGN)
            first_replica = stream.replica
            victim = next(i for i in range(2) if f"/{stack.proc(f'wafsvc{i + 1}').pid}" in first_replica)
            futures = [stream.submit(ATTACK) for _ in range(3000)]
            stack.kill_wafsvc(victim, signal.SIGKILL)
            verdicts = [f.result(10) for f in futures]
            assert stream.restarts >= 1 and stream.replica != first_replica
    finally:
        stack.stop()
    assert len(verdicts) == 3000 and all(v.blocked for v in verdicts)


def _draining(stack, index: int) -> bool:
    """SIGTERMed replica `index` has begun draining: it takes no new connection."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    try:
        with grpc.insecure_channel(f"127.0.0.1:{stack.spec.wafsvc_ports[index]}") as ch:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
    except grpc.RpcError:
        return True
    return False


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stream_on_a_draining_replica_moves_its_requests_and_keeps_its_responses(tmp_path, mode):
    """SIGTERM to the replica holding a stream's transaction: new requests
    get verdicts from the other replica, and the held transaction's response
    is still inspected by the draining worker, which then exits."""
    from tests.e2e.conftest import wait_for
    stack = start_wafsvc(tmp_path, replicas=2)

    def victim_of(replica: str) -> int:
        return next(i for i in range(2) if f"/{stack.proc(f'wafsvc{i + 1}').pid}" in replica)

    def drain(replica: str) -> int:
        victim = victim_of(replica)
        os.killpg(stack.proc(f"wafsvc{victim + 1}").pid, signal.SIGTERM)
        wait_for(lambda: _draining(stack, victim), 10, "the drain")
        return victim

    try:
        if mode == "sync":
            with Client(target=target(stack), deadline=5) as client, client.stream() as stream:
                kept = stream.evaluate(BENIGN, inspect_response=True)
                first = stream.replica
                victim = drain(first)
                after = [stream.evaluate(BENIGN if i % 2 else ATTACK) for i in range(20)]
                moved = stream.replica
                leak = stream.evaluate_response(kept, LEAK)
        else:
            async def run():
                async with AsyncClient(target=target(stack), deadline=5) as client:
                    async with client.stream() as s:
                        kept = await s.evaluate(BENIGN, inspect_response=True)
                        first = s.replica
                        victim = drain(first)
                        after = [await s.evaluate(BENIGN if i % 2 else ATTACK) for i in range(20)]
                        return first, victim, after, s.replica, await s.evaluate_response(kept, LEAK)
            first, victim, after, moved, leak = asyncio.run(run())
        assert [v.blocked for v in after] == [not i % 2 for i in range(20)]
        assert moved != first and leak.blocked and leak.rule_ids == (2001,)
        assert stack.proc(f"wafsvc{victim + 1}").wait(10) == 0
    finally:
        stack.stop()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stream_across_a_reload_loses_nothing_and_serves_on(tmp_path, mode):
    """SIGHUP while a stream is busy: its one worker pauses to parse (it says
    so, then that it serves again). Every request gets its verdict, the
    transaction held before the reload still has its response inspected, and
    the stream serves on afterwards."""
    from tests.e2e.conftest import wait_for
    stack = start_wafsvc(tmp_path)
    log = stack.spec.log_dir / "wafsvc1.log"

    def resumed() -> int:
        return log.read_text(errors="replace").count('"msg": "serving again after a pause"')

    def reload() -> None:
        os.kill(stack.proc("wafsvc1").pid, signal.SIGHUP)
        wait_for(lambda: resumed() >= 1, 20, "the worker's reload")

    try:
        if mode == "sync":
            with Client(target=target(stack), deadline=5) as client, client.stream() as stream:
                kept = stream.evaluate(BENIGN, inspect_response=True)
                reloading = threading.Thread(target=reload)
                reloading.start()
                during = []
                while reloading.is_alive():
                    during += list(stream.evaluate_many([ATTACK, BENIGN] * 5))
                after = [stream.evaluate(BENIGN if i % 2 else ATTACK) for i in range(20)]
                leak = stream.evaluate_response(kept, LEAK)
        else:
            async def run():
                async with AsyncClient(target=target(stack), deadline=5) as client:
                    async with client.stream() as s:
                        kept = await s.evaluate(BENIGN, inspect_response=True)
                        reloading = asyncio.ensure_future(asyncio.to_thread(reload))
                        during = []
                        while not reloading.done():
                            during += await s.evaluate_all([ATTACK, BENIGN] * 5)
                        await reloading
                        after = [await s.evaluate(BENIGN if i % 2 else ATTACK) for i in range(20)]
                        return during, after, await s.evaluate_response(kept, LEAK)
            during, after, leak = asyncio.run(run())
        assert during and [v.blocked for v in during] == [not i % 2 for i in range(len(during))], \
            [v for v in during if isinstance(v, WafError)][:3]
        assert [v.blocked for v in after] == [not i % 2 for i in range(20)]
        assert leak.blocked and leak.rule_ids == (2001,)
    finally:
        stack.stop()
