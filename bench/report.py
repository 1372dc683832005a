"""Headline figures and the Markdown report of a benchmark run (the chart is
bench/chart.py). Every target of issue 17 is a key of the summary, so the
targets table can be computed from latest.json alone."""

from __future__ import annotations

import json
import pathlib

from bench import stats

# key: (comparison, bound). Issue 17's targets, plus issue 6's that still hold.
TARGETS = {
    "throughput_ratio_vs_nginx_modsec": (">=", 1.0),
    "throughput_ratio_vs_nginx_modsec_attack": (">=", 1.0),
    "cpu_ratio_vs_engine": ("<=", 1.15),
    "cpu_ratio_vs_engine_half_load": ("<=", 1.25),
    "p99_half_load_ratio_vs_nginx_trivial": ("<=", 1.0),
    "p99_half_load_ratio_vs_nginx_crs": ("<=", 1.0),
    "p99_added_ms": ("<=", 1.0),
    # One gateway process on a core of its own (the end-to-end figure
    # gateway_evaluations_per_s_trivial is capped by HAProxy and wafsvc).
    "gateway_evaluations_per_cpu_s_isolated": (">=", 15000.0),
    "rss_growth_mib": ("<=", 5.0),
}
OURS = ("gateway", "wafsvc")            # modsec-spoa's own processes
STACK = ("haproxy", "gateway", "wafsvc")  # everything a request passes with modsec-spoa


def _cpu(run: dict, groups=STACK) -> float:
    return sum(run["cpu_us_per_request"].get(name, 0.0) for name in groups)


def _rss_growth_mib(memory: dict) -> float:
    growth = 0
    for key, after in memory["after"].items():
        if key.split(":")[0] in OURS and key in memory["before"]:
            growth += after["rss_kib"] - memory["before"][key]["rss_kib"]
    return growth / 1024


def _same_rate(results: dict, name: str, rules: str) -> dict | None:
    for key, run in results.get("latency", {}).items():
        if key.startswith(f"{name}/{rules}/benign@"):
            return run
    return None


def summarise(results: dict) -> dict:
    """The headline figures; a figure whose runs are missing (a setup left
    out with --setups) is left out too."""
    t = results["throughput"]
    have = lambda *keys: all(k in t for k in keys)  # noqa: E731
    s: dict[str, float] = {}
    engine = t["engine/crs/benign"]["cpu_us_per_request"]["engine"] if have("engine/crs/benign") else 0.0
    if have("spoa/crs/benign", "engine/crs/benign"):
        crs = t["spoa/crs/benign"]
        s["cpu_ratio_vs_engine"] = _cpu(crs) / engine
        s["cpu_ratio_vs_engine_without_haproxy"] = _cpu(crs, OURS) / engine
        s["throughput_ratio_vs_engine_crs"] = crs["rps"] / t["engine/crs/benign"]["rps"]
        s["overhead_us_per_request_crs"] = _cpu(crs, OURS) - engine
        s["wafsvc_overhead_us_per_request_crs"] = crs["cpu_us_per_request"]["wafsvc"] - engine
        half = _same_rate(results, "spoa", "crs")
        if half:
            s["cpu_ratio_vs_engine_half_load"] = _cpu(half) / engine
            s["cpu_ratio_vs_engine_half_load_without_haproxy"] = _cpu(half, OURS) / engine
    if have("spoa/trivial/benign", "engine/trivial/benign"):
        s["wafsvc_overhead_us_per_request_trivial"] = (t["spoa/trivial/benign"]["cpu_us_per_request"]["wafsvc"]
                                                       - t["engine/trivial/benign"]["cpu_us_per_request"]["engine"])
    # Against nginx + ModSecurity at the same load: both engines pay the same
    # for light load (an engine idle between requests runs colder, about
    # +50% with CRS here: bench/results/profile.md), which the hot-loop
    # engine figure above does not.
    if have("spoa/crs/benign", "nginx/crs/benign"):
        s["cpu_ratio_vs_nginx_modsec"] = _cpu(t["spoa/crs/benign"]) / _cpu(t["nginx/crs/benign"], ("nginx",))
    ours_half, nginx_half = _same_rate(results, "spoa", "crs"), _same_rate(results, "nginx", "crs")
    if ours_half and nginx_half:
        s["cpu_ratio_vs_nginx_modsec_half_load"] = _cpu(ours_half) / _cpu(nginx_half, ("nginx",))
    for mix, suffix in (("benign", ""), ("attack", "_attack")):
        if have(f"spoa/crs/{mix}", f"nginx/crs/{mix}"):
            s[f"throughput_ratio_vs_nginx_modsec{suffix}"] = t[f"spoa/crs/{mix}"]["rps"] / t[f"nginx/crs/{mix}"]["rps"]
    if have("spoa/trivial/benign", "haproxy/none/benign"):
        s["throughput_ratio_vs_haproxy_nowaf"] = t["spoa/trivial/benign"]["rps"] / t["haproxy/none/benign"]["rps"]
    spoa_trivial, alone = _same_rate(results, "spoa", "trivial"), _same_rate(results, "haproxy", "trivial")
    if spoa_trivial and alone:
        s["p99_added_ms"] = (spoa_trivial["latency_us"]["p99"] - alone["latency_us"]["p99"]) / 1000
    for rules in ("trivial", "crs"):
        ours, nginx = _same_rate(results, "spoa", rules), _same_rate(results, "nginx", rules)
        if ours and nginx:
            s[f"p99_half_load_ms_spoa_{rules}"] = ours["latency_us"]["p99"] / 1000
            s[f"p99_half_load_ms_nginx_{rules}"] = nginx["latency_us"]["p99"] / 1000
            s[f"p99_half_load_ratio_vs_nginx_{rules}"] = ours["latency_us"]["p99"] / max(1.0, nginx["latency_us"]["p99"])
    if results.get("memory"):
        s["rss_growth_mib"] = _rss_growth_mib(results["memory"])
    if have("spoa/trivial/benign"):
        # One gateway process end to end, and 1 / its CPU per evaluation there.
        gateway_us = t["spoa/trivial/benign"]["cpu_us_per_request"]["gateway"]
        s["gateway_evaluations_per_s_trivial"] = t["spoa/trivial/benign"]["rps"]
        s["gateway_evaluations_per_cpu_s_trivial"] = 1e6 / gateway_us if gateway_us else 0.0
    isolated = results.get("gateway_isolated")
    if isolated:
        s["gateway_evaluations_per_cpu_s_isolated"] = isolated["evaluations_per_gateway_cpu_s"]
        s["gateway_evaluations_per_cpu_s_isolated_half_load"] = (
            isolated["evaluations_per_gateway_cpu_s_at_load"]["50%"])
    from bench.response_setups import summarise as responses_summary  # issue 13's figures
    s.update(responses_summary(t, _cpu))
    summary = {key: round(float(value), 4) for key, value in s.items()}
    summary["targets_met"] = {key: (summary[key] <= bound if op == "<=" else summary[key] >= bound)
                              for key, (op, bound) in TARGETS.items() if key in summary}
    return summary


def spread_of(rounds: list[dict], isolated: dict | None = None) -> dict[str, dict]:
    """min / median / max of each headline figure over the rounds."""
    keys = [k for k in rounds[0] if k != "targets_met"] if rounds else []
    out = {k: stats.spread([r[k] for r in rounds if k in r]) for k in keys}
    if isolated:
        first = next(iter(isolated["points"].values()))
        out["gateway_evaluations_per_cpu_s_isolated"] = first["saturation"]["evaluations_per_gateway_cpu_s"]
        if "50%" in first:
            out["gateway_evaluations_per_cpu_s_isolated_half_load"] = first["50%"]["evaluations_per_gateway_cpu_s"]
    return out


def _range(spread: dict | None, fmt: str = ",.0f", scale: float = 1.0) -> str:
    if not spread:
        return ""
    return f"{spread['min'] * scale:{fmt}}–{spread['max'] * scale:{fmt}}"


def _cpu_text(run: dict) -> str:
    return ", ".join(f"{k} {v:,.0f}" for k, v in run["cpu_us_per_request"].items())


def markdown(results: dict) -> str:
    from bench.gateway_isolated import table as isolated_table

    s, t, settings, machine = results["summary"], results["throughput"], results["settings"], results["machine"]
    spread = results.get("summary_spread", {})
    lines = [f"# Benchmark {results['started']}{' (smoke run: numbers mean nothing)' if results['smoke'] else ''}", "",
             f"{machine['cpus']} CPUs, machine busy {machine['busy_before']:.0%} before and "
             f"{machine.get('busy_after', 0):.0%} after the run (load average {machine['loadavg_before'][0]:.2f} "
             f"before, {machine.get('loadavg_after', [0])[0]:.2f} after), {settings['rounds']} alternating rounds; "
             f"throughput: wrk -t1 -c{settings['connections']}, {settings['seconds']:g} s; latency: open loop "
             f"(bench/openloop.c), {settings['latency_seconds']:g} s after {settings['latency_warmup_s']:g} s, "
             f"{settings['latency_connections']} connections; CRS {results['versions']['crs']} at PL1.", "",
             "## Headline (issue 17's targets)", "",
             "| figure | value | min–max over rounds | target | met |", "|---|---:|---|---|---|"]
    for key, value in s.items():
        if key == "targets_met":
            continue
        op, bound = TARGETS.get(key, ("", None))
        target = f"{op} {bound:g}" if bound is not None else ""
        met = {True: "yes", False: "**no**"}.get(s["targets_met"].get(key), "")
        lines.append(f"| {key} | {value:,.3f} | {_range(spread.get(key), ',.3f')} | {target} | {met} |")
    lines += ["", "## Throughput (requests/s) and CPU per request (µs, per process group)", "",
              "req/s counts verdicts only (a 5xx is a failure); runs = each round; batch = requests per "
              "gateway -> wafsvc stream message; busy = the machine, all processes.", "",
              "| setup | rules | mix | req/s | runs | 5xx | batch | busy | CPU µs/req (median) |",
              "|---|---|---|---:|---|---:|---:|---:|---|"]
    for key, run in t.items():
        name, rules, mix = key.split("/")
        runs = " ".join(f"{x:,.0f}" for x in run.get("rps_all", []))
        batch = f"{run['mean_batch']:.1f}" if "mean_batch" in run else ""
        busy = run.get("spread", {}).get("machine_busy", {}).get("median", 0)
        lines.append(f"| {name} | {rules} | {mix} | {run['rps']:,.0f} | {runs} | {run.get('failed', 0)} | {batch} | "
                     f"{busy:.0%} | {_cpu_text(run)} |")
    lines += ["", "## Latency curves, open loop, benign mix (each setup at fractions of its own peak)", "",
              "Latency counts from each request's intended send time. achieved = the measured window's "
              "requests over the time until the last of them was answered (below offered when the setup "
              "fell behind); slip = how late the generator sent although a connection was free; queued = "
              "requests that found every connection busy (they still count from their intended time). "
              "p99 min–max is over the rounds.", "",
              "| setup | rules | load | offered/s | achieved/s | p50 ms | p99 ms (min–max) | p99.9 ms | "
              "slip p99 ms | queued | 5xx | CPU µs/req |", "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for key, curve in results.get("latency_curves", {}).items():
        name, rules = key.split("/")
        for label, run in curve["points"].items():
            lat = run["latency_us"]
            lines.append(f"| {name} | {rules} | {label} | {run['offered_rate']:,.0f} | {run['rps']:,.0f} | "
                         f"{lat['p50'] / 1000:.2f} | {lat['p99'] / 1000:.2f} "
                         f"({_range(run['spread']['latency_us']['p99'], '.2f', 1e-3)}) | {lat['p999'] / 1000:.2f} | "
                         f"{run['slip_us']['p99'] / 1000:.2f} | {run['queued_for_connection']} | {run['failed']} | "
                         f"{_cpu_text(run)} |")
    lines += ["", "## Latency at the same offered rate (half of modsec-spoa's peak), open loop", "",
              "| setup | rules | offered/s | achieved/s | p50 ms | p99 ms | p99.9 ms | 5xx | CPU µs/req |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for key, run in results.get("latency", {}).items():
        name, rules, _ = key.split("/")
        lat = run["latency_us"]
        lines.append(f"| {name} | {rules} | {run['offered_rate']:,.0f} | {run['rps']:,.0f} | {lat['p50'] / 1000:.2f} | "
                     f"{lat['p99'] / 1000:.2f} | {lat['p999'] / 1000:.2f} | {run['failed']} | {_cpu_text(run)} |")
    if results.get("gateway_isolated"):
        iso = results["gateway_isolated"]["settings"]
        lines += ["", "## The gateway alone (SPOP driver -> gateway -> stub wafsvc)", "",
                  f"`python -m bench.gateway_isolated`: gateway on CPU {iso['cpus']['gateway']}, driver and stub "
                  f"on {iso['cpus']['driver_and_stub']}; {iso['connections']} SPOP connections, closed loop "
                  f"{iso['depth']} NOTIFYs in flight per connection, open loop at a fraction of the median peak "
                  "(latency from the intended send time); min-max over the rounds.", "",
                  isolated_table(results["gateway_isolated"])]
    lines += ["", "## Versions", "", "| component | version |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in results.get("versions", {}).items()]
    mem = results.get("memory")
    if mem:
        lines += ["", f"## Memory (trivial-rules stack, {mem['soak_requests']:,} requests between the columns)", "",
                  "| process | RSS before MiB | RSS after MiB | peak MiB |", "|---|---:|---:|---:|"]
        for key, after in mem["after"].items():
            before = mem["before"].get(key, after)
            lines.append(f"| {key} | {before['rss_kib'] / 1024:.1f} | {after['rss_kib'] / 1024:.1f} | "
                         f"{after['peak_kib'] / 1024:.1f} |")
    return "\n".join(lines) + "\n"


def write(results: dict, out_dir: pathlib.Path) -> None:
    from bench import chart

    # The headline figures also sit at the top level, where issues 6 and 17 name them.
    headline = {k: v for k, v in results["summary"].items() if k != "targets_met"}
    (out_dir / "latest.json").write_text(json.dumps({**headline, **results}, indent=1, sort_keys=False) + "\n")
    (out_dir / "latest.md").write_text(markdown(results))
    chart.draw(results, out_dir / "latest.png")
