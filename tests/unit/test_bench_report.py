"""bench/report.py: the headline figures are the ratios issues 6 and 17
define, computed from the runs of latest.json."""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

import pytest

from bench import phases, report, workloads
from bench.rulesets import TRIVIAL_RULES


def _run(rps: float, **cpu: float) -> dict:
    return {"rps": rps, "cpu_us_per_request": cpu}


def _lat(p99_us: float, **cpu: float) -> dict:
    return {"latency_us": {"p50": p99_us / 2, "p99": p99_us, "p999": p99_us}, "cpu_us_per_request": cpu}


def _results() -> dict:
    t = {
        "haproxy/none/benign": _run(20000, haproxy=10),
        "spoa/crs/benign": _run(900, haproxy=50, gateway=100, wafsvc=2100),
        "spoa/crs/attack": _run(700, haproxy=50, gateway=100, wafsvc=2500),
        "spoa/trivial/benign": _run(4000, haproxy=30, gateway=80, wafsvc=120),
        "nginx/crs/benign": _run(600, nginx=3000),
        "nginx/crs/attack": _run(1000, nginx=2000),
        "engine/crs/benign": _run(1000, engine=2000),
        "engine/trivial/benign": _run(20000, engine=70),
    }
    latency = {"haproxy/trivial/benign@2000": _lat(1500, haproxy=10),
               "spoa/trivial/benign@2000": _lat(2300, haproxy=30, gateway=200, wafsvc=150),
               "nginx/trivial/benign@2000": _lat(4600, nginx=150),
               "spoa/crs/benign@450": _lat(30000, haproxy=60, gateway=300, wafsvc=2200),
               "nginx/crs/benign@450": _lat(20000, nginx=3200)}
    memory = {"before": {"gateway:1": {"rss_kib": 50_000}, "wafsvc:2": {"rss_kib": 40_000},
                         "haproxy:3": {"rss_kib": 10_000}},
              "after": {"gateway:1": {"rss_kib": 51_024}, "wafsvc:2": {"rss_kib": 41_024},
                        "haproxy:3": {"rss_kib": 90_000}}}
    isolated = {"evaluations_per_gateway_cpu_s": 16000.0, "evaluations_per_gateway_cpu_s_at_load": {"50%": 9000.0}}
    return {"throughput": t, "latency": latency, "memory": memory, "gateway_isolated": isolated}


def test_summary_ratios():
    s = report.summarise(_results())
    # CPU over the raw engine counts HAProxy too; the issue-6 figure without it stays beside it.
    assert s["cpu_ratio_vs_engine"] == 2250 / 2000
    assert s["cpu_ratio_vs_engine_without_haproxy"] == 2200 / 2000
    # At half load: the open-loop run of modsec-spoa at half its peak.
    assert s["cpu_ratio_vs_engine_half_load"] == 2560 / 2000
    assert s["cpu_ratio_vs_engine_half_load_without_haproxy"] == 2500 / 2000
    # CPU against nginx + ModSecurity's, at saturation and at the same half-load rate.
    assert s["cpu_ratio_vs_nginx_modsec"] == 2250 / 3000
    assert s["cpu_ratio_vs_nginx_modsec_half_load"] == 2560 / 3200
    assert s["wafsvc_overhead_us_per_request_crs"] == 100
    assert s["wafsvc_overhead_us_per_request_trivial"] == 50
    assert s["throughput_ratio_vs_nginx_modsec"] == 1.5
    assert s["throughput_ratio_vs_nginx_modsec_attack"] == 0.7
    assert s["throughput_ratio_vs_haproxy_nowaf"] == 0.2
    assert s["p99_added_ms"] == 0.8
    assert s["p99_half_load_ratio_vs_nginx_trivial"] == 0.5
    assert s["p99_half_load_ratio_vs_nginx_crs"] == 1.5
    assert (s["p99_half_load_ms_spoa_crs"], s["p99_half_load_ms_nginx_crs"]) == (30.0, 20.0)
    assert s["rss_growth_mib"] == 2.0  # HAProxy's growth is not counted
    assert s["gateway_evaluations_per_s_trivial"] == 4000
    assert s["gateway_evaluations_per_cpu_s_trivial"] == 12500
    # The gateway alone, on a core of its own (bench.gateway_isolated).
    assert s["gateway_evaluations_per_cpu_s_isolated"] == 16000
    assert s["gateway_evaluations_per_cpu_s_isolated_half_load"] == 9000
    assert s["targets_met"] == {
        "throughput_ratio_vs_nginx_modsec": True, "throughput_ratio_vs_nginx_modsec_attack": False,
        "cpu_ratio_vs_engine": True, "cpu_ratio_vs_engine_half_load": False,
        "p99_half_load_ratio_vs_nginx_trivial": True, "p99_half_load_ratio_vs_nginx_crs": False,
        "p99_added_ms": True, "gateway_evaluations_per_cpu_s_isolated": True, "rss_growth_mib": True}


def test_every_target_of_issue_17_is_a_summary_key():
    s = report.summarise(_results())
    assert set(report.TARGETS) <= set(s)


def test_a_setup_left_out_leaves_its_figures_out():
    results = _results()
    results["throughput"] = {k: v for k, v in results["throughput"].items() if not k.startswith("nginx/")}
    results["latency"] = {k: v for k, v in results["latency"].items() if not k.startswith("nginx/")}
    s = report.summarise(results)
    assert "throughput_ratio_vs_nginx_modsec" not in s and "p99_half_load_ratio_vs_nginx_crs" not in s
    assert s["cpu_ratio_vs_engine"] == 2250 / 2000


def test_spread_over_rounds():
    rounds = [{"a": 1.0, "targets_met": {}}, {"a": 3.0, "targets_met": {}}, {"a": 2.0, "targets_met": {}}]
    assert report.spread_of(rounds) == {"a": {"min": 1.0, "median": 2.0, "max": 3.0}}


def test_combine_keeps_each_round_and_the_median():
    runs = [{"rps": r, "cpu_us_per_request": {"nginx": c}, "machine_busy": 0.5,
             "latency_us": {"p50": l, "p99": 2 * l, "p999": 3 * l}, "slip_us": {"p50": 1, "p99": 2, "p999": 3}}
            for r, c, l in ((100, 30, 5), (300, 10, 1), (200, 20, 3))]
    out = phases.combine(runs)
    assert out["rps"] == 200 and out["rps_all"] == [100, 300, 200]
    assert out["cpu_us_per_request"] == {"nginx": 20}
    assert out["latency_us"]["p99"] == 6
    assert out["spread"]["latency_us"]["p99"] == {"min": 2, "median": 6, "max": 10}
    assert out["spread"]["rps"] == {"min": 100, "median": 200, "max": 300}


def test_attack_posts_carry_their_attack_in_the_body_only():
    """The verdict check relies on it: a setup that skips phase 2 (nginx's
    `return 200`) lets these through and fails before it is timed."""
    pattern = re.search(r'"@rx ([^"]+)"', TRIVIAL_RULES.read_text()).group(1)
    posts = [req for req in workloads.ATTACK if req.method == "POST"]
    assert posts
    for req in posts:
        assert not re.search(pattern, req.path)
        assert re.search(pattern, unquote_plus(req.body.decode()))


@pytest.mark.parametrize("fraction,label", [(0.1, "10%"), (0.25, "25%"), (0.5, "50%"), (0.9, "90%")])
def test_fraction_labels(fraction, label):
    assert phases.fraction_label(fraction) == label


def test_lua_table_escapes_every_request_byte_exactly():
    for req in workloads.BENIGN + workloads.ATTACK:
        raw = workloads.raw_request(req)
        lua = workloads._lua_string(raw)
        # Decode Lua's \ddd escapes back: the same bytes must come out.
        out, body = bytearray(), lua[1:-1]
        i = 0
        while i < len(body):
            if body[i] == "\\":
                out.append(int(body[i + 1:i + 4]))
                i += 4
            else:
                out.append(ord(body[i]))
                i += 1
        assert bytes(out) == raw
        assert raw.split(b"\r\n\r\n", 1)[1] == req.body


def test_engine_run_batches_cycle_the_set_whole():
    """The stream handler's work in-process (scripts/wafsvc_cost.py): every
    request of the set, in order, each ref once."""
    from bench import engine_run
    from wafapi import waf_pb2

    varied = engine_run.request_set("benign", "varied")
    assert len(varied) == 40 * len(workloads.BENIGN) and len({(r.path, r.body) for r in varied}) == len(varied)
    requests = engine_run.mapped(engine_run.request_set("benign", "mix"))
    encoded = engine_run.batches(requests, 4)
    items = [item for data in encoded for item in waf_pb2.EvaluateBatch.FromString(data).requests]
    assert all(len(waf_pb2.EvaluateBatch.FromString(d).requests) == 4 for d in encoded)
    assert len(items) == 20 and len({i.ref for i in items}) == 20
    assert [i.request.uri for i in items] == [r.uri for r in requests] * 2
