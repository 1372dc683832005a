"""docker-compose.yml on a real Docker engine: `make test-compose`.

The real Compose file, up with three wafsvc replicas, then faults under a
steady load of benign requests: a replica SIGKILLed, the gateway container
recreated, the replicas scaled 3 -> 5 -> 2; Prometheus' targets, and a clean
`down`. The tests share one project and run in file order, each leaving
it as the next expects.

Not part of `make test`: it needs a Docker engine (started here when none
runs) and takes a few minutes.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from gateway.config import OPTIONS as GATEWAY_OPTIONS
from stack.load import Load
from tests.compose.conftest import REPLICAS, REPORT, evaluations, save_logs, status
from tests.compose.project import env_of, prometheus_json, wait_until

pytestmark = pytest.mark.skipif(not os.environ.get("RUN_COMPOSE_TEST"),
                                reason="needs a Docker engine and minutes: run `make test-compose`")

SQLI = "/?id=1%27%20or%20%271%27%3D%271"
SPREAD_REQUESTS = 2000
SHARE_RANGE = (0.20, 0.45)
# A steady load that leaves the 2 cores room for restarts and builds:
# 4 clients, each pausing 20 ms between requests.
STEADY = dict(clients=4, pause_s=0.02)
# Start-up of a new replica (Python, CRS, first health check) on top of the
# gateway's rotation period.
JOIN_MARGIN_S = 15
RECOVERY_BOUND_S = 30


def running(project, service: str) -> list:
    return [c for c in project.containers(service) if c.running]


def recycle_s(project) -> float:
    default = next(opt.default for opt in GATEWAY_OPTIONS if opt.env == "GATEWAY_RECYCLE_MS")
    return int(env_of(project.services["gateway"]).get("GATEWAY_RECYCLE_MS", default)) / 1000


def settled_evaluations(project, containers) -> dict[str, float]:
    """Workers write their counts every 0.25 s: read until two reads agree."""
    def read():
        return {c.id: evaluations(project, c) for c in containers}
    reads = [read()]

    def agreed():
        reads.append(read())
        return reads[-1] if reads[-1] == reads[-2] and None not in reads[-1].values() else None
    return wait_until(agreed, timeout=30, what="the replicas' evaluation counts to settle", interval=0.6)


def failures(load: Load) -> tuple[list, list]:
    """(replies that are not 200, connection errors)."""
    return [r for r in load.results if r[0] != 200], load.errors


def test_verdicts_on_both_frontends(project):
    http, lenient = project.ports["HTTP_PORT"], project.ports["HTTP_ALT_PORT"]
    assert status(http, "/") == 200
    assert status(http, SQLI) == 403
    assert status(lenient, SQLI) == 200, "the lenient frontend ignores 942100"
    assert status(http, "/", {"X-Waf-Smoke-Test": "deny"}) == 403, "site rules (deploy/rules/site.conf) loaded"


def test_replicas_share_the_load(project):
    replicas = running(project, "wafsvc")
    assert len(replicas) == REPLICAS
    before = settled_evaluations(project, replicas)
    with Load(project.ports["HTTP_PORT"], clients=4, total=SPREAD_REQUESTS) as load:
        load.wait(300)
    assert failures(load) == ([], [])
    assert len(load.results) == SPREAD_REQUESTS
    after = settled_evaluations(project, replicas)
    served = {c.number: after[c.id] - before[c.id] for c in replicas}
    total = sum(served.values())
    assert total >= SPREAD_REQUESTS  # a re-sent request is evaluated twice
    shares = {number: round(count / total, 3) for number, count in served.items()}
    REPORT["spread_over_3_replicas"] = shares
    low, high = SHARE_RANGE
    assert all(low <= share <= high for share in shares.values()), shares


def test_prometheus_scrapes_every_target_up(project):
    assert "prometheus" in project.runnable
    port = project.ports["PROMETHEUS_PORT"]
    expected = {("gateway", c.ip) for c in running(project, "gateway")} | {
        ("wafsvc", c.ip) for c in running(project, "wafsvc")}

    def all_up():
        try:
            targets = prometheus_json(port, "/api/v1/targets")["data"]["activeTargets"]
        except OSError:
            return None
        seen = {(t["labels"]["job"], t["labels"]["instance"].rsplit(":", 1)[0]): t["health"] for t in targets}
        return seen if set(seen) == expected and set(seen.values()) == {"up"} else None
    started = time.monotonic()
    wait_until(all_up, timeout=120, what=f"Prometheus to scrape {sorted(expected)}, all up", interval=2)
    REPORT["prometheus_all_targets_up_after_seconds"] = round(time.monotonic() - started, 1)
    # Each replica's rule set age is real from its start (it once read 0).
    result = prometheus_json(port, "/api/v1/query?query=modsec_waf_rules_loaded_timestamp_seconds")
    loaded = [float(r["value"][1]) for r in result["data"]["result"]]
    assert len(loaded) == REPLICAS
    assert all(time.time() - 3600 < at <= time.time() for at in loaded), loaded


def test_a_killed_replica_restarts_by_itself_and_gets_traffic_again(project):
    victim = running(project, "wafsvc")[0]
    with Load(project.ports["HTTP_PORT"], **STEADY) as load:
        time.sleep(2)
        os.kill(victim.pid, signal.SIGKILL)  # from the host, as the OOM killer would
        killed = time.monotonic()
        back = wait_until(lambda: (lambda c: c if c and c.running and c.restarts > victim.restarts else None)(
            project.container(victim.id)), timeout=60, what="the killed replica to be restarted by Docker")
        restarted = time.monotonic()
        wait_until(lambda: (evaluations(project, back) or 0) > 0, timeout=recycle_s(project) + JOIN_MARGIN_S,
                   what="traffic to the restarted replica")
        served = time.monotonic()
        time.sleep(2)
    bad, errors = failures(load)
    REPORT["replica_kill"] = {"requests": len(load.results), "failed": len(bad) + len(errors),
                              "restarted_after_seconds": round(restarted - killed, 1),
                              "traffic_again_after_seconds": round(served - killed, 1)}
    assert (bad, errors) == ([], [])
    assert len(running(project, "wafsvc")) == REPLICAS


def test_haproxy_follows_a_recreated_gateway(project):
    """The gateway container is replaced and comes back at another address,
    as on a busy host where its old one was taken meanwhile. Docker hands
    the lowest free address out again, so a placeholder container takes the
    old one while the gateway is away."""
    old = running(project, "gateway")[0]
    port = project.ports["HTTP_PORT"]
    placeholder = None
    with Load(port, **STEADY) as load:
        time.sleep(2)
        started = time.monotonic()
        try:
            project.compose("stop", "gateway")
            placeholder = project.placeholder(network=old.network)
            project.compose("up", "-d", "--no-deps", "--force-recreate", "gateway")
            new = running(project, "gateway")[0]
            up = time.monotonic()
            # Recovered: answers come back without anyone restarting HAProxy.
            wait_until(lambda: status(port, "/") == 200, timeout=RECOVERY_BOUND_S,
                       what="HAProxy to reach the recreated gateway by itself", interval=0.1)
            recovered = time.monotonic()
            time.sleep(3)
        finally:
            if placeholder is not None:
                project.remove(placeholder)
    bad, errors = failures(load)
    REPORT["gateway_recreate"] = {
        "requests": len(load.results), "5xx": sum(1 for r in bad if r[0] >= 500),
        "connection_errors": len(errors), "gateway_away_seconds": round(up - started, 1),
        "recovered_after_new_gateway_started_seconds": round(recovered - up, 1),
        "address": f"{old.ip} -> {new.ip}"}
    assert new.id != old.id
    assert new.ip != old.ip, "the new gateway got the old address: this run proves nothing about resolvers"
    assert not errors
    assert all(code == 503 for code, *_ in bad), "fail closed while no gateway answers: 503, nothing else"
    assert not [r for r in load.results if r[5] > recovered and r[0] != 200], "5xx after recovery"


def test_scaling_under_load_loses_nothing_and_new_replicas_get_traffic(project):
    old = {c.id for c in running(project, "wafsvc")}
    bound = recycle_s(project) + JOIN_MARGIN_S
    with Load(project.ports["HTTP_PORT"], **STEADY) as load:
        time.sleep(2)
        project.compose("up", "-d", "--no-deps", "--no-recreate", "--scale", "wafsvc=5", "wafsvc")
        scaled = time.monotonic()
        new = [c for c in running(project, "wafsvc") if c.id not in old]
        assert len(new) == 2
        joined = {}
        for replica in new:
            wait_until(lambda: (evaluations(project, replica) or 0) > 0, timeout=bound - (time.monotonic() - scaled),
                       what=f"traffic to new replica {replica.number}")
            joined[replica.number] = round(time.monotonic() - scaled, 1)
        project.compose("up", "-d", "--no-deps", "--no-recreate", "--scale", "wafsvc=2", "wafsvc")
        assert len(running(project, "wafsvc")) == 2
        time.sleep(5)
    bad, errors = failures(load)
    REPORT["scale_3_5_2"] = {"requests": len(load.results), "failed": len(bad) + len(errors),
                             "new_replicas_traffic_after_seconds": joined,
                             "bound_seconds": bound}
    assert (bad, errors) == ([], [])


def test_down_leaves_nothing_behind(project):
    save_logs(project)
    project.down()
    assert project.containers() == []
    assert project.networks() == []
