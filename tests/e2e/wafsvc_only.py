"""wafsvc replicas alone (no HAProxy, no gateway), for the tests of the
client, its middleware, the CLI and the API's hardening."""

from __future__ import annotations

import pathlib

from stack import Stack, StackSpec, free_port
from stack.processes import wait_for_health

# Light rules: what is tested is the client and the API, not CRS.
RULES = """\
SecRule ARGS|REQUEST_BODY|REQUEST_HEADERS|REQUEST_URI "@contains attack" \\
    "id:1001,phase:2,deny,status:403,log,msg:'attack marker'"
SecRule REQUEST_HEADERS:x-probe "@contains probe" "id:1002,phase:1,pass,log,msg:'probe seen'"
SecRule RESPONSE_HEADERS:x-leak "@streq 1" "id:2001,phase:3,deny,status:502,log,msg:'response leak'"
"""


def start_wafsvc(log_dir: pathlib.Path, replicas: int = 1, workers: int = 1, rules: str = RULES,
                 env: dict[str, str] | None = None, health_env: dict[str, str] | None = None) -> Stack:
    """Replicas on free ports (stack.spec.wafsvc_ports), SERVING on return."""
    log_dir.mkdir(parents=True, exist_ok=True)
    rules_file = log_dir / "rules.conf"
    rules_file.write_text(rules)
    stack = Stack(StackSpec(log_dir=log_dir, wafsvc_ports=[free_port() for _ in range(replicas)],
                            wafsvc_workers=workers,
                            # Unknown application names refused: the client's UnknownApplication is tested.
                            wafsvc_env={"RULES": str(rules_file), "WAF_UNKNOWN_APPLICATION": "refuse",
                                        **(env or {})}))
    try:
        for index in range(replicas):
            proc = stack.start_wafsvc(index)
            wait_for_health(stack.spec.wafsvc_ports[index], proc, f"wafsvc{index + 1}", gateway_env=health_env)
    except BaseException:
        stack.stop()
        raise
    return stack


def target(stack: Stack) -> str:
    return ",".join(f"127.0.0.1:{port}" for port in stack.spec.wafsvc_ports)
