"""Headline figures, the Markdown table and the chart of a benchmark run."""

from __future__ import annotations

import json
import pathlib

TARGETS = {  # key: (comparison, bound) from issue 6
    "cpu_ratio_vs_engine": ("<=", 1.15),
    "throughput_ratio_vs_nginx_modsec": (">=", 1.0),
    # Issue 17: one gateway process on a core of its own (the end-to-end
    # figure gateway_evaluations_per_s_trivial is capped by HAProxy and wafsvc).
    "gateway_evaluations_per_cpu_s_isolated": (">=", 15000.0),
    "p99_added_ms": ("<=", 1.0),
    "rss_growth_mib": ("<=", 5.0),
}
OURS = ("gateway", "wafsvc")


def _ours_cpu(run: dict) -> float:
    return sum(run["cpu_us_per_request"].get(name, 0.0) for name in OURS)


def _rss_growth_mib(memory: dict) -> float:
    growth = 0
    for key, after in memory["after"].items():
        if key.split(":")[0] in OURS and key in memory["before"]:
            growth += after["rss_kib"] - memory["before"][key]["rss_kib"]
    return growth / 1024


def _latency(results: dict, name: str, rules: str) -> dict:
    for key, run in results["latency"].items():
        if key.startswith(f"{name}/{rules}/benign@"):
            return run
    raise KeyError(f"no latency run for {name}/{rules}")


def summarise(results: dict) -> dict:
    t = results["throughput"]
    spoa_crs, spoa_trivial = t["spoa/crs/benign"], t["spoa/trivial/benign"]
    gateway_us = spoa_trivial["cpu_us_per_request"]["gateway"]
    summary = {
        "cpu_ratio_vs_engine": _ours_cpu(spoa_crs) / t["engine/crs/benign"]["cpu_us_per_request"]["engine"],
        "throughput_ratio_vs_nginx_modsec": spoa_crs["rps"] / t["nginx/crs/benign"]["rps"],
        "throughput_ratio_vs_haproxy_nowaf": spoa_trivial["rps"] / t["haproxy/none/benign"]["rps"],
        "p99_added_ms": (_latency(results, "spoa", "trivial")["latency_us"]["p99"]
                         - _latency(results, "haproxy", "trivial")["latency_us"]["p99"]) / 1000,
        "rss_growth_mib": _rss_growth_mib(results["memory"]),
        # One gateway process: what it carried end to end, and what it could
        # carry on a core of its own (1 / its CPU per evaluation).
        "gateway_evaluations_per_s_trivial": spoa_trivial["rps"],
        "gateway_evaluations_per_cpu_s_trivial": 1e6 / gateway_us if gateway_us else 0.0,
        "throughput_ratio_vs_engine_crs": spoa_crs["rps"] / t["engine/crs/benign"]["rps"],
        "overhead_us_per_request_crs": _ours_cpu(spoa_crs) - t["engine/crs/benign"]["cpu_us_per_request"]["engine"],
    }
    isolated = results.get("gateway_isolated")
    if isolated:
        summary["gateway_evaluations_per_cpu_s_isolated"] = isolated["evaluations_per_gateway_cpu_s"]
        summary["gateway_evaluations_per_cpu_s_isolated_half_load"] = (
            isolated["evaluations_per_gateway_cpu_s_at_load"]["50%"])
    summary = {key: round(float(value), 4) for key, value in summary.items()}
    summary["targets_met"] = {key: (summary[key] <= bound if op == "<=" else summary[key] >= bound)
                              for key, (op, bound) in TARGETS.items() if key in summary}
    return summary


def markdown(results: dict) -> str:
    s, t = results["summary"], results["throughput"]
    lines = [f"# Benchmark {results['started']}{' (smoke run: numbers mean nothing)' if results['smoke'] else ''}", "",
             f"{results['machine']['cpus']} CPUs, machine busy {results['machine']['busy_before']:.0%} before and "
             f"{results['machine'].get('busy_after', 0):.0%} after the run (other load), "
             f"{results['settings']['rounds']} alternating rounds of {results['settings']['seconds']:.0f} s, "
             f"medians shown; wrk -t1 -c{results['settings']['connections']}; "
             f"CRS {pathlib.Path(results['settings']['crs_dir']).name} at PL1.", "",
             "## Headline", "", "| figure | value | target | met |", "|---|---:|---|---|"]
    for key, value in s.items():
        if key == "targets_met":
            continue
        op, bound = TARGETS.get(key, ("", None))
        target = f"{op} {bound:g}" if bound is not None else ""
        met = {True: "yes", False: "**no**"}.get(s["targets_met"].get(key), "")
        lines.append(f"| {key} | {value:,.3f} | {target} | {met} |")
    lines += ["", "## Throughput (requests/s) and CPU per request (µs, per process group)", "",
              "req/s counts verdicts only (a 5xx is a failure); batch = requests per gateway -> wafsvc "
              "stream message, from the gateway's metrics.", "",
              "| setup | rules | mix | req/s | runs | 5xx | batch | CPU µs/req |", "|---|---|---|---:|---|---:|---:|---|"]
    for key, run in t.items():
        name, rules, mix = key.split("/")
        cpu = ", ".join(f"{k} {v:,.0f}" for k, v in run["cpu_us_per_request"].items())
        runs = " ".join(f"{x:,.0f}" for x in run.get("rps_all", []))
        batch = f"{run['mean_batch']:.1f}" if "mean_batch" in run else ""
        lines.append(f"| {name} | {rules} | {mix} | {run['rps']:,.0f} | {runs} | {run.get('failed', 0)} | {batch} | {cpu} |")
    lines += ["", "## Latency at a fixed rate (half of modsec-spoa's peak), benign mix", "",
              "| setup | rules | offered/s | achieved/s | p50 ms | p99 ms | 5xx | CPU µs/req |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for key, run in results["latency"].items():
        name, rules, rest = key.split("/")
        cpu = ", ".join(f"{k} {v:,.0f}" for k, v in run["cpu_us_per_request"].items())
        lines.append(f"| {name} | {rules} | {run['offered_rate']:,.0f} | {run['rps']:,.0f} | "
                     f"{run['latency_us']['p50'] / 1000:.2f} | {run['latency_us']['p99'] / 1000:.2f} | {run.get('failed', 0)} | {cpu} |")
    if results.get("gateway_isolated"):
        from bench.gateway_isolated import table
        iso = results["gateway_isolated"]["settings"]
        lines += ["", "## The gateway alone (SPOP driver -> gateway -> stub wafsvc)", "",
                  f"`python -m bench.gateway_isolated`: gateway on CPU {iso['cpus']['gateway']}, driver and stub "
                  f"on {iso['cpus']['driver_and_stub']}; {iso['connections']} SPOP connections, closed loop "
                  f"{iso['depth']} NOTIFYs in flight per connection, open loop at a fraction of the median peak "
                  "(latency from the intended send time); min-max over the rounds.", "", table(results["gateway_isolated"])]
    mem = results["memory"]
    lines += ["", f"## Memory (trivial-rules stack, {mem['soak_requests']:,} requests between the columns)", "",
              "| process | RSS before MiB | RSS after MiB | peak MiB |", "|---|---:|---:|---:|"]
    for key, after in mem["after"].items():
        before = mem["before"].get(key, after)
        lines.append(f"| {key} | {before['rss_kib'] / 1024:.1f} | {after['rss_kib'] / 1024:.1f} | "
                     f"{after['peak_kib'] / 1024:.1f} |")
    return "\n".join(lines) + "\n"


def chart(results: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = results["throughput"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, rules in zip(axes, ("crs", "trivial")):
        names = ["engine", "spoa", "nginx"] + (["haproxy"] if rules == "trivial" else [])
        labels = {"engine": "raw engine\n(in-process)", "spoa": "HAProxy +\nmodsec-spoa",
                  "nginx": "nginx +\nModSecurity", "haproxy": "HAProxy\nno WAF"}
        for offset, mix in ((-0.2, "benign"), (0.2, "attack")):
            values = [t[f"{n}/{'none' if n == 'haproxy' else rules}/{mix}"]["rps"] for n in names]
            bars = ax.bar([i + offset for i in range(len(names))], values, width=0.4, label=f"{mix} mix")
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(names)), [labels[n] for n in names], fontsize=8)
        ax.set_title("CRS v4 paranoia 1" if rules == "crs" else "one trivial rule")
        ax.set_ylabel("requests/s")
        if rules == "trivial":
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle(f"modsec-spoa throughput, {results['machine']['cpus']} CPUs, {results['started']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, out_dir: pathlib.Path) -> None:
    # The headline figures also sit at the top level, where issue 6 names them.
    headline = {k: v for k, v in results["summary"].items() if k != "targets_met"}
    (out_dir / "latest.json").write_text(json.dumps({**headline, **results}, indent=1, sort_keys=False) + "\n")
    (out_dir / "latest.md").write_text(markdown(results))
    chart(results, out_dir / "latest.png")
