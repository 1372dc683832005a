"""Where the CPU goes: py-spy profiles of the gateway and one wafsvc worker
while the benchmark's trivial-rule stack is under wrk load.

    python -m bench.profile            # writes bench/results/profile-trivial.md

py-spy samples with native frames; each process's samples are split by
thread and by component (gRPC core, event loop, syscalls, our code...), so
the per-message cost of gRPC in Python shows beside our own code.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading

from bench import loadgen, procstat
from bench.setups import HaproxyStack

ROOT = pathlib.Path(__file__).resolve().parent.parent

# First match wins: a sample is charged to the component of its innermost
# frame that names one (the leaf alone is often an anonymous libc address).
COMPONENTS = (
    ("modsecurity engine", ("libmodsecurity", "_libmodsecurity", "wafsvc/engine.py")),
    ("protobuf (upb)", ("_message.abi3", "upb_", "PyUpb")),
    ("SPOP codec", ("gateway/spop/",)),
    ("gateway mapping/server/pool", ("gateway/mapping.py", "gateway/server.py", "gateway/pool.py")),
    ("metrics and logs", ("metrics.py", "prometheus_client", "logging/", "common/logs.py")),
    ("wafsvc service", ("wafsvc/service.py",)),
    ("gRPC core and its Cython layer", ("cygrpc", "libgrpc", "grpc_core", "grpc/aio", "grpc/_", "absl::")),
    ("event loop (uvloop/asyncio)", ("uvloop", "asyncio/", "loop.cpython")),
    ("syscalls: epoll (waiting)", ("epoll_wait", "epoll_pwait")),
    ("syscalls: socket I/O", ("sendmsg", "recvmsg", "write (libc", "read (libc", "recv (libc", "send (libc")),
)


def component(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, needles in COMPONENTS:
            if any(needle in frame for needle in needles):
                return name
    return "other (interpreter, libc)"


def summarise(raw: pathlib.Path) -> tuple[int, collections.Counter, collections.Counter]:
    total, by_component, by_thread = 0, collections.Counter(), collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        n = int(count)
        total += n
        by_component[component(frames)] += n
        # py-spy puts the thread first; name it by what it runs.
        by_thread["gRPC poller thread" if not any("run_module" in f or "_run_module_as_main" in f for f in frames)
                  else "main thread (event loop)"] += n
    return total, by_component, by_thread


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "results" / "profile-trivial.md")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(pathlib.Path(sys.executable).with_name("py-spy"))
    haproxy = shutil.which("haproxy")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = pathlib.Path(tmp)
        setup = HaproxyStack(run_dir, haproxy, rules="trivial", workers=2)
        try:
            groups = setup.groups()
            worker = procstat.children(setup.stack.proc("wafsvc1").pid)[0]
            targets = {"gateway": groups["gateway"][0], "wafsvc worker": worker}
            load = {}
            wrk = threading.Thread(target=lambda: load.update(loadgen.run(
                setup.port, "benign", args.seconds + 4, run_dir, groups=groups)))
            wrk.start()
            spies = {name: subprocess.Popen([py_spy, "record", "--native", "-r", "200",
                                             "-d", str(int(args.seconds)), "--format", "raw",
                                             "-o", str(run_dir / f"{pid}.raw"), "-p", str(pid)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for name, pid in targets.items()}
            for spy in spies.values():
                spy.wait()
            wrk.join()
        finally:
            setup.stop()
        lines = ["# Profile: trivial rule, benign mix, wrk -c32",
                 "",
                 f"Load during the profile: {load.get('rps', 0):,.0f} verdicts/s (py-spy slows the "
                 f"sampled processes); CPU per request: "
                 + ", ".join(f"{k} {v:,.0f} µs" for k, v in load.get("cpu_us_per_request", {}).items()) + ".",
                 "Share of samples (py-spy --native, 200 Hz; waiting in epoll is idle time).", ""]
        for name, pid in targets.items():
            total, by_component, by_thread = summarise(run_dir / f"{pid}.raw")
            lines += [f"## {name}", "", "| component | share |", "|---|---:|"]
            lines += [f"| {comp} | {n / total:.1%} |" for comp, n in by_component.most_common()]
            lines += ["", "| thread | share |", "|---|---:|"]
            lines += [f"| {thread} | {n / total:.1%} |" for thread, n in by_thread.most_common()]
            lines.append("")
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
