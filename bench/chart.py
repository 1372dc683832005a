"""latest.png: throughput per setup (top) and the open-loop latency curves
(bottom), for CRS and for the trivial rule."""

from __future__ import annotations

import pathlib

LABELS = {"engine": "raw engine\n(in-process)"}


def draw(results: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench import setups

    labels = {**{cls.name: cls.label for cls in setups.SETUPS}, **LABELS}
    colours = {cls.name: f"C{i}" for i, cls in enumerate(setups.SETUPS)}  # one colour per setup, both panels
    t = results["throughput"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.4))
    for col, rules in enumerate(("crs", "trivial")):
        ax = axes[0][col]
        names = [n for n in dict.fromkeys(k.split("/")[0] for k in t)
                 if f"{n}/{rules}/benign" in t or (rules == "trivial" and f"{n}/none/benign" in t)]
        for offset, mix in ((-0.2, "benign"), (0.2, "attack")):
            keys = [f"{n}/{rules}/{mix}" if f"{n}/{rules}/{mix}" in t else f"{n}/none/{mix}" for n in names]
            bars = ax.bar([i + offset for i in range(len(names))], [t[k]["rps"] for k in keys], width=0.4,
                          label=f"{mix} mix")
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(names)), [labels.get(n, n) for n in names], fontsize=8)
        ax.set_title(("CRS v4 paranoia 1" if rules == "crs" else "one trivial rule") + ": throughput (wrk)")
        ax.set_ylabel("requests/s")
        if rules == "trivial":
            ax.set_yscale("log")
        ax.legend(fontsize=8)

        ax = axes[1][col]
        for key, curve in results.get("latency_curves", {}).items():
            name, curve_rules = key.split("/")
            if curve_rules != rules and not (curve_rules == "none" and rules == "trivial"):
                continue
            points = list(curve["points"].values())
            ax.plot([p["offered_rate"] for p in points], [p["latency_us"]["p99"] / 1000 for p in points],
                    marker="o", color=colours.get(name), label=f"{labels.get(name, name).replace(chr(10), ' ')} p99")
            ax.plot([p["offered_rate"] for p in points], [p["latency_us"]["p50"] / 1000 for p in points],
                    linestyle=":", color=colours.get(name))
        ax.set_title("latency, open loop (dotted: p50), 10–90% of each setup's peak", fontsize=9)
        ax.set_xlabel("offered requests/s")
        ax.set_ylabel("ms")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(f"modsec-spoa, {results['machine']['cpus']} CPUs, {results['started']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
