"""`make up`: the whole stack in the foreground; Ctrl-C stops it cleanly.

HAProxy on 127.0.0.1:8080 (and :8081, the frontend with ignored rules), the
gateway on :12345, two wafsvc replicas on :50051 and :50052 running CRS at
paranoia level 1, the demo backend on :8000. Three applications
(deploy/wafsvc/apps.yaml), chosen on :8080 by Host (deploy/haproxy/apps.map):
shop.localhost blocks, blog.localhost only detects, any other Host blocks.
WAF_CONFIG=other.yaml runs another applications file; WAF_CONFIG= (empty)
runs the environment's single application.
"""

from __future__ import annotations

import os
import sys

from stack import foreground
from stack.processes import APPS_MAP, DEMO_APPS, Stack, StackSpec


def main() -> int:
    wafsvc_env = foreground.wafsvc_env()
    apps_file = os.environ.get("WAF_CONFIG", "" if "WAF_APPS" in wafsvc_env else str(DEMO_APPS))
    if apps_file:
        wafsvc_env["WAF_CONFIG"] = apps_file
    replicas = foreground.replicas()
    spec = StackSpec(frontend_port=8080, frontend_alt_port=8081, backend_port=8000, gateway_port=12345,
                     wafsvc_ports=[50051 + i for i in range(replicas)],
                     wafsvc_workers=int(os.environ.get("WAF_WORKERS", "1")),
                     wafsvc_env=wafsvc_env,
                     # Prometheus: gateway on :9101, wafsvc replicas on :9102, :9103...
                     wafsvc_metrics_ports=[9102 + i for i in range(replicas)],
                     gateway_env={"GATEWAY_METRICS": "127.0.0.1:9101"},
                     haproxy_env={"APPS_MAP": str(APPS_MAP)})
    return foreground.run(Stack(spec), "\nmodsec-spoa is up: http://127.0.0.1:8080/ (Ctrl-C stops it)\n"
                          "  try: curl -i 'http://127.0.0.1:8080/?id=1%27%20or%20%271%27%3D%271'  -> 403\n"
                          "       curl -i -H 'Host: blog.localhost' 'http://127.0.0.1:8080/?id=1%27%20or%20%271%27%3D%271'"
                          "  -> 200, matches logged\n")


if __name__ == "__main__":
    sys.exit(main())
