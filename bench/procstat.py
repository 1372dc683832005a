"""CPU time and memory of processes, straight from /proc (Linux only)."""

from __future__ import annotations

import os

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, all its threads included."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out.extend(int(x) for x in fh.read().split())
    except FileNotFoundError:
        pass
    return out


def with_children(pid: int) -> list[int]:
    return [pid, *children(pid)]


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return {"rss_kib": out.get("VmRSS", 0), "peak_kib": out.get("VmHWM", 0)}


def total_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def cpu_times() -> list[int]:
    """The machine's CPU time counters (the "cpu" line of /proc/stat)."""
    with open("/proc/stat") as fh:
        return [int(x) for x in fh.readline().split()[1:]]


def busy_between(before: list[int], after: list[int]) -> float:
    """Share of all CPUs busy between two cpu_times() readings."""
    delta = [a - b for a, b in zip(after, before)]
    return round(1.0 - (delta[3] + delta[4]) / max(1, sum(delta)), 3)


class CpuWindow:
    """CPU seconds of each process group (name -> pids) and the machine's
    busy share over a `with` block: what a load run costs."""

    def __init__(self, groups: dict[str, list[int]] | None) -> None:
        self.groups = groups or {}
        self.cpu_s: dict[str, float] = {}
        self.machine_busy = 0.0

    def __enter__(self) -> "CpuWindow":
        self._before = {name: total_cpu(pids) for name, pids in self.groups.items()}
        self._machine = cpu_times()
        return self

    def __exit__(self, *exc) -> None:
        self.cpu_s = {name: total_cpu(pids) - self._before[name] for name, pids in self.groups.items()}
        self.machine_busy = busy_between(self._machine, cpu_times())

    def us_per(self, count: int) -> dict[str, float]:
        """CPU µs per request (or verdict), `count` of them."""
        return {name: seconds * 1e6 / max(1, count) for name, seconds in self.cpu_s.items()}


def failed(statuses: dict[str, int]) -> int:
    """Answers without a verdict: a 5xx is the gateway's deadline run out
    (fail closed), a failure, not throughput."""
    return sum(n for code, n in statuses.items() if code.startswith("5"))


def busy_fraction(interval_s: float = 1.0) -> float:
    """Share of all CPUs that were busy over interval_s (machine-wide)."""
    import time

    def sample():
        with open("/proc/stat") as fh:
            values = [int(x) for x in fh.readline().split()[1:]]
        idle = values[3] + values[4]
        return sum(values), idle

    total0, idle0 = sample()
    time.sleep(interval_s)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)
