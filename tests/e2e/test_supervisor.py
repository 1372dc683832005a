"""wafsvc's supervisor and the processes it forks, run for real: a SIGKILLed
supervisor leaves no child behind, so the replica starts again on the same
ports, and the rules timestamp is right from the first scrape.

No HAProxy is needed: one replica (two workers and the metrics server),
site rules only so that it starts in a second.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stack import free_port
from stack.processes import wait_for_health
from tests.e2e.conftest import wait_for

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKERS = 2


class Replica:
    def __init__(self, log: pathlib.Path, grpc_port: int, metrics_port: int) -> None:
        self.grpc_port, self.metrics_port = grpc_port, metrics_port
        env = {**os.environ, "PYTHONPATH": str(ROOT), "WAF_LISTEN": f"127.0.0.1:{grpc_port}",
               "WAF_METRICS": f"127.0.0.1:{metrics_port}", "WAF_WORKERS": str(WORKERS),
               "RULES": str(ROOT / "deploy" / "rules" / "site.conf")}
        env.pop("CRS_DIR", None)
        with open(log, "ab") as out:
            # Its own process group: the test can find every process it forked.
            self.proc = subprocess.Popen([sys.executable, "-m", "wafsvc"], env=env, cwd=ROOT, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_health(grpc_port, self.proc, "wafsvc")
            wait_for(self.scrape, timeout=10, what="metrics answering")
        except BaseException:
            self.stop()
            raise

    def scrape(self) -> dict[str, float] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        return {sample.name: sample.value for family in text_string_to_metric_families(text)
                for sample in family.samples if not sample.labels}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever the group still holds, e.g. children a failed test left behind
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def live_pids_in_group(pgid: int) -> set[int]:
    """Processes of a process group that still run (zombies do not count:
    they hold no port)."""
    found = set()
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after it.
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            found.add(int(entry.name))
    return found


@pytest.fixture()
def replica(tmp_path):
    r = Replica(tmp_path / "wafsvc.log", free_port(), free_port())
    yield r
    r.stop()


def test_a_killed_supervisor_takes_every_child_with_it(replica, tmp_path):
    supervisor = replica.proc.pid
    children = live_pids_in_group(supervisor) - {supervisor}
    assert len(children) == WORKERS + 1, "two workers and the metrics server"
    os.kill(supervisor, signal.SIGKILL)
    replica.proc.wait(10)
    wait_for(lambda: not live_pids_in_group(supervisor), timeout=20,
             what="every child of the killed supervisor to exit")
    # The same ports are free again: the replica's next start succeeds.
    again = Replica(tmp_path / "wafsvc-again.log", replica.grpc_port, replica.metrics_port)
    try:
        assert again.proc.poll() is None
        assert again.scrape()["modsec_waf_workers"] == WORKERS
    finally:
        again.stop()


def test_rules_timestamp_is_set_before_any_reload(replica):
    started = time.time()
    metrics = replica.scrape()
    loaded_at = metrics["modsec_waf_rules_loaded_timestamp_seconds"]
    # Loaded by this replica, not 0 (the supervisor's unset gauge).
    assert started - 60 < loaded_at <= time.time()
