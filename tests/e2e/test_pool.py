"""The wafsvc pool under faults: balance, replica death and return, failure
policy, reload and drain. Real processes, real HAProxy, real signals.

Light rules (no CRS) keep the engine cheap, so what is measured is the pool.
Evaluations are counted by wafsvc itself: each worker logs how many it
evaluated when it stops.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import time

import pytest

from stack import free_port
from stack.load import Load
from tests.e2e.conftest import http_request, start_stack, wait_for

RULES = ('SecRule REQUEST_HEADERS:x-attack "@streq 1" "id:1001,phase:1,deny,status:403,log,msg:\'attack\'"\n')
RULES_V2 = RULES + 'SecRule REQUEST_HEADERS:x-attack-2 "@streq 1" "id:1002,phase:1,deny,status:403,log"\n'
# libmodsecurity accepts unknown operators; an unknown directive it refuses.
BROKEN = RULES_V2 + "SecNoSuchDirective On\n"


def _stack(tmp_path: pathlib.Path, haproxy_bin: str, replicas: int, workers: int = 1,
           gateway_env=None, wafsvc_env=None, haproxy_env=None, rules: str = RULES):
    rules_file = tmp_path / "rules.conf"
    rules_file.write_text(rules)
    stack = start_stack(tmp_path / "logs", haproxy_bin,
                        wafsvc_ports=[free_port() for _ in range(replicas)], wafsvc_workers=workers,
                        wafsvc_env={"RULES": str(rules_file), **(wafsvc_env or {})},
                        gateway_env=gateway_env or {}, haproxy_env=haproxy_env or {})
    stack.rules_file = rules_file
    return stack


def _log_events(stack, name: str) -> list[dict]:
    events = []
    for line in (stack.spec.log_dir / f"{name}.log").read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    return events


def _served(stack, index: int) -> dict[str, int]:
    """Evaluations per worker of a replica that has stopped (its own count)."""
    return {e["worker"]: e["evaluations"] for e in _log_events(stack, f"wafsvc{index + 1}")
            if e.get("msg") == "worker stopped"}


def _assert_all_verdicts(load: Load) -> None:
    bad = load.bad()
    assert not load.errors, load.errors[:5]
    assert not bad, f"{len(bad)} of {len(load.results)} without a verdict, e.g. {bad[:5]}"
    assert len(load.results) > 100


def test_three_replicas_share_the_load_and_every_worker_is_reached(stacks, tmp_path, haproxy_bin):
    # Two channels for two workers per replica: by hash luck a replica often
    # gets both connections on one worker, so coverage repair must work.
    stack = _stack(tmp_path, haproxy_bin, replicas=3, workers=2, gateway_env={"GATEWAY_CHANNELS": "2"})
    stacks.append(stack)
    wait_for(lambda: len({e["worker"] for e in _log_events(stack, "gateway")
                           if e.get("msg") == "wafsvc worker available"}) >= 6,
              30, "the gateway to reach all 6 workers")
    with Load(stack.spec.frontend_port, clients=8, total=3000) as load:
        load.wait()
    _assert_all_verdicts(load)
    assert len(load.results) == 3000
    for index in range(3):
        stack.kill_wafsvc(index, signal.SIGTERM)
    served = [_served(stack, index) for index in range(3)]
    total = sum(sum(workers.values()) for workers in served)
    # The load and its responses (frontend web inspects responses, each on
    # the worker that judged its request), readiness probes, any re-sent ones.
    assert 6000 <= total < 6600
    shares = [sum(workers.values()) / total for workers in served]
    print("replica shares:", [round(s, 3) for s in shares], "per worker:", served)
    assert all(0.25 <= share <= 0.42 for share in shares), shares
    for workers in served:
        assert len(workers) == 2 and all(count > 0 for count in workers.values()), served


def test_sigkill_of_a_replica_under_load_loses_nothing_and_it_comes_back(stacks, tmp_path, haproxy_bin):
    stack = _stack(tmp_path, haproxy_bin, replicas=2, gateway_env={"GATEWAY_RECYCLE_MS": "300"})
    stacks.append(stack)
    with Load(stack.spec.frontend_port, clients=6) as load:
        time.sleep(1.5)
        stack.kill_wafsvc(0, signal.SIGKILL)
        time.sleep(1.5)
        stack.restart_wafsvc(0)
        time.sleep(3)
    _assert_all_verdicts(load)
    print(f"{len(load.results)} requests, slowest {max(r[4] for r in load.results) * 1000:.0f} ms")
    stack.kill_wafsvc(0, signal.SIGTERM)
    # The restarted replica logs only its own count: it got traffic again.
    assert sum(_served(stack, 0).values()) > 50, _served(stack, 0)


@pytest.mark.parametrize("policy", ["closed", "open"])
def test_all_replicas_down_applies_the_failure_policy(stacks, tmp_path, haproxy_bin, policy):
    stack = _stack(tmp_path, haproxy_bin, replicas=1, gateway_env={"GATEWAY_FAILURE_POLICY": policy},
                   haproxy_env={"WAF_FAILURE_POLICY": policy})
    stacks.append(stack)
    assert http_request(stack.spec.frontend_port, headers=[("X-Attack", "1")]).status == 403
    stack.kill_wafsvc(0, signal.SIGKILL)
    for headers in ([], [("X-Attack", "1")]):
        started = time.perf_counter()
        reply = http_request(stack.spec.frontend_port, headers=headers)
        elapsed = time.perf_counter() - started
        assert reply.failed, reply.headers
        # The gateway answered (its reason, not HAProxy's), so within its deadline.
        assert reply.headers["X-Waf-Error"] in ("no verdict within the deadline",
                                                "wafsvc stream failed and no retry was possible")
        assert reply.status == (503 if policy == "closed" else 200)
        print(f"{policy}, wafsvc down: {reply.status} in {elapsed * 1000:.0f} ms")
    # Gateway gone as well: HAProxy applies the same policy and flags it.
    stack.proc("gateway").kill()
    stack.proc("gateway").wait()
    reply = http_request(stack.spec.frontend_port)
    assert reply.failed and reply.headers["X-Waf-Error"] == "no answer from the WAF agent"
    assert reply.status == (503 if policy == "closed" else 200)


def _blocked(stack, header: str, tries: int = 12) -> bool:
    """Several tries so that every worker's rules are exercised."""
    return all(http_request(stack.spec.frontend_port, headers=[(header, "1")]).status == 403
               for _ in range(tries))


def test_reload_applies_good_rules_and_keeps_serving_on_broken_ones(stacks, tmp_path, haproxy_bin):
    stack = _stack(tmp_path, haproxy_bin, replicas=1, workers=2)
    stacks.append(stack)
    supervisor = stack.proc("wafsvc1")

    def logged(msg: str) -> list:
        return [e for e in _log_events(stack, "wafsvc1") if e.get("msg") == msg]

    with Load(stack.spec.frontend_port, clients=4) as load:
        assert http_request(stack.spec.frontend_port, headers=[("X-Attack-2", "1")]).status == 200
        stack.rules_file.write_text(RULES_V2)
        supervisor.send_signal(signal.SIGHUP)
        wait_for(lambda: len(logged("rules reloaded")) == 3, 20, "supervisor and both workers to reload")
        assert _blocked(stack, "X-Attack-2")

        stack.rules_file.write_text(BROKEN)
        supervisor.send_signal(signal.SIGHUP)
        # The supervisor parses first; what fails there is not sent to the workers.
        failures = wait_for(lambda: logged("rule reload failed; the previous rules stay in service"),
                             20, "the reload failure to be logged")
        time.sleep(0.5)
        assert len(logged("rule reload failed; the previous rules stay in service")) == 1
        assert [e["pid"] for e in failures] == [supervisor.pid]
    assert all("SecNoSuchDirective" in e["error"] and e["reload_failures"] == 1 for e in failures), failures
    assert _blocked(stack, "X-Attack") and _blocked(stack, "X-Attack-2")
    assert http_request(stack.spec.frontend_port).status == 200
    _assert_all_verdicts(load)


def test_sigterm_of_a_replica_under_load_finishes_everything_quickly(stacks, tmp_path, haproxy_bin):
    stack = _stack(tmp_path, haproxy_bin, replicas=2, workers=2, wafsvc_env={"WAF_DRAIN_GRACE_MS": "30000"})
    stacks.append(stack)
    with Load(stack.spec.frontend_port, clients=4) as load:
        time.sleep(1.5)
        started = time.monotonic()
        status = stack.kill_wafsvc(0, signal.SIGTERM)
        drain = time.monotonic() - started
        time.sleep(1)
    _assert_all_verdicts(load)
    assert status == 0
    # Idle streams must not hold the replica for the 30 s grace period.
    assert drain < 10, drain
    stopped = _served(stack, 0)
    assert len(stopped) == 2 and sum(stopped.values()) > 0
    print(f"replica drained in {drain * 1000:.0f} ms, {len(load.results)} requests, all with verdicts")


def test_hung_replica_under_load_is_worked_around_before_the_deadline(stacks, tmp_path, haproxy_bin):
    # SIGSTOP: connections stay open but nothing answers. Requests sent there
    # are re-sent elsewhere after GATEWAY_HEDGE_MS, well inside the deadline.
    stack = _stack(tmp_path, haproxy_bin, replicas=2)
    stacks.append(stack)
    replica = stack.proc("wafsvc1")
    with Load(stack.spec.frontend_port, clients=6) as load:
        time.sleep(1)
        os.killpg(replica.pid, signal.SIGSTOP)
        try:
            time.sleep(2)
        finally:
            os.killpg(replica.pid, signal.SIGCONT)
        time.sleep(1)
    _assert_all_verdicts(load)
    hedged = [e for e in _log_events(stack, "gateway") if e.get("msg", "").startswith("wafsvc worker is not answering")]
    assert hedged, "the hung worker was never noticed"
    print(f"hung replica: {len(load.results)} requests, slowest {max(r[4] for r in load.results) * 1000:.0f} ms")


def test_sigterm_of_the_gateway_answers_what_it_took_then_disconnects(stacks, tmp_path, haproxy_bin):
    stack = _stack(tmp_path, haproxy_bin, replicas=1, workers=2)
    stacks.append(stack)
    gateway = stack.proc("gateway")
    # The frontend without response inspection: a response message HAProxy
    # sends while the gateway leaves is lost with the connection, and HAProxy
    # 2.6 leaves it waiting until its client timeout (docs/response-inspection.md,
    # "Response inspection through HAProxy"); test_response_misses.py covers that.
    with Load(stack.spec.frontend_alt_port, clients=6) as load:
        time.sleep(1.5)
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(10) == 0
        time.sleep(0.5)
    assert not load.errors, load.errors[:5]
    verdicts = [r for r in load.results if r[0] == 200 and r[1] == "pass" and r[2] != "1"]
    # Whatever the gateway took, it answered with a verdict; after it left,
    # HAProxy denies (fail closed) and says why. Nothing else.
    others = [r for r in load.results if r not in verdicts]
    assert all(r[0] == 503 and r[2] == "1" and r[3] == "no answer from the WAF agent" for r in others), others[:5]
    assert len(verdicts) > 100 and others, (len(verdicts), len(others))
    events = _log_events(stack, "gateway")
    closing = [e for e in events if e.get("msg") == "pool closing"]
    assert closing and closing[0]["unanswered"] == 0 and closing[0]["answered"] >= len(verdicts)
    assert not [e for e in events if e.get("msg") == "no verdict; failure policy applied"]
    assert "gateway stopped" in {e.get("msg") for e in events}


def test_each_new_channel_reaches_every_replica_whatever_their_number(stacks, tmp_path, haproxy_bin):
    # Five replicas, one channel of two streams: round_robin gives a new
    # channel's streams to consecutive replicas, so two streams reached two
    # replicas and a restarted one waited for luck. The gateway opens a
    # stream per address, so every rotation reaches all five.
    stack = _stack(tmp_path, haproxy_bin, replicas=5, workers=1,
                   gateway_env={"GATEWAY_CHANNELS": "1", "GATEWAY_STREAMS": "2", "GATEWAY_RECYCLE_MS": "500"})
    stacks.append(stack)

    def reached() -> set[str]:
        """Workers the gateway has a stream to now, from its log."""
        live: set[str] = set()
        for event in _log_events(stack, "gateway"):
            if event.get("msg") == "wafsvc worker available":
                live.add(event["worker"])
            elif event.get("msg") == "wafsvc worker has no lanes":
                live.discard(event["worker"])
        return live

    wait_for(lambda: len(reached()) == 5, 15, "all 5 replicas reached at once")
    before = reached()
    stack.kill_wafsvc(4, signal.SIGKILL)
    wait_for(lambda: len(reached()) == 4, 15, "the killed replica's worker to go")
    stack.restart_wafsvc(4)
    # A new name (new supervisor pid): only a new channel can reach it.
    wait_for(lambda: len(reached()) == 5 and reached() - before, 20, "the restarted replica reached")
    with Load(stack.spec.frontend_port, clients=4, total=400) as load:
        load.wait()
    _assert_all_verdicts(load)
