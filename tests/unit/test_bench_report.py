"""bench/report.py: the headline figures are the ratios issue 6 defines."""

from __future__ import annotations

from bench import report, workloads


def _run(rps: float, **cpu: float) -> dict:
    return {"rps": rps, "cpu_us_per_request": cpu}


def _results() -> dict:
    t = {
        "haproxy/none/benign": _run(20000, haproxy=10),
        "spoa/crs/benign": _run(900, haproxy=50, gateway=100, wafsvc=2100),
        "spoa/trivial/benign": _run(4000, haproxy=30, gateway=80, wafsvc=120),
        "nginx/crs/benign": _run(600, nginx=3000),
        "engine/crs/benign": _run(1000, engine=2000),
    }
    latency = {"haproxy/trivial/benign@2000": {"latency_us": {"p99": 1500}},
               "spoa/trivial/benign@2000": {"latency_us": {"p99": 2300}}}
    memory = {"before": {"gateway:1": {"rss_kib": 50_000}, "wafsvc:2": {"rss_kib": 40_000},
                         "haproxy:3": {"rss_kib": 10_000}},
              "after": {"gateway:1": {"rss_kib": 51_024}, "wafsvc:2": {"rss_kib": 41_024},
                        "haproxy:3": {"rss_kib": 90_000}}}
    isolated = {"evaluations_per_gateway_cpu_s": 16000.0, "evaluations_per_gateway_cpu_s_at_load": {"50%": 9000.0}}
    return {"throughput": t, "latency": latency, "memory": memory, "gateway_isolated": isolated}


def test_summary_ratios():
    s = report.summarise(_results())
    # Ours is gateway + wafsvc; HAProxy's CPU is not modsec-spoa's.
    assert s["cpu_ratio_vs_engine"] == 2200 / 2000
    assert s["throughput_ratio_vs_nginx_modsec"] == 1.5
    assert s["throughput_ratio_vs_haproxy_nowaf"] == 0.2
    assert s["p99_added_ms"] == 0.8
    assert s["rss_growth_mib"] == 2.0  # HAProxy's growth is not counted
    assert s["gateway_evaluations_per_s_trivial"] == 4000
    assert s["gateway_evaluations_per_cpu_s_trivial"] == 12500
    # The gateway alone, on a core of its own (bench.gateway_isolated).
    assert s["gateway_evaluations_per_cpu_s_isolated"] == 16000
    assert s["gateway_evaluations_per_cpu_s_isolated_half_load"] == 9000
    assert s["targets_met"] == {"cpu_ratio_vs_engine": True, "throughput_ratio_vs_nginx_modsec": True,
                                "gateway_evaluations_per_cpu_s_isolated": True, "p99_added_ms": True,
                                "rss_growth_mib": True}


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
