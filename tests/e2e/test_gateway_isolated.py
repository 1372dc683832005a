"""The isolated gateway benchmark end to end, in a second or two: the real
gateway between the SPOP driver and the stub wafsvc, both HAProxy versions,
closed and open loop. Every NOTIFY must come back as a pass verdict; no
figure is judged (speed is for `make bench`)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from tests.e2e.conftest import ROOT


def test_gateway_isolated_smoke(tmp_path):
    out = tmp_path / "isolated.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gateway_isolated", "--seconds", "0.5", "--warmup", "0.3",
                           "--rounds", "1", "--haproxy", "2.6", "--haproxy", "3.2", "--connections", "8",
                           "--out", str(out)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert math.isfinite(result["evaluations_per_gateway_cpu_s"]) and result["evaluations_per_gateway_cpu_s"] > 0
    for version in ("2.6", "3.2"):
        runs = result["runs"][version]
        assert set(runs) == {"saturation", "50%"}
        for label, (run,) in runs.items():
            assert run["evaluations"] > 0, (version, label)
            assert run["failed"] == run["unexpected"] == 0 and not run["errors"], run
            assert run["mean_batch"] >= 1.0
        open_loop = runs["50%"][0]
        assert open_loop["latency_us"]["samples"] > 0 and open_loop["offered_rate"] > 0
