"""What `make up` and `make up-envoy` share: the wafsvc settings they take
from the environment, and running a stack in the foreground until Ctrl-C."""

from __future__ import annotations

import os
import signal
import sys

from stack.processes import DEBIAN_CRS

# Passed on to wafsvc when set (README, "Configuration").
PASSED_ON = ("RULES", "CRS_SETUP", "WAF_DIRECTIVES", "WAF_APPS", "LOG_LEVEL", "WAF_AUDIT_LOG")


def wafsvc_env() -> dict[str, str]:
    """CRS at paranoia level 1 blocking, unless the environment says otherwise."""
    env = {"CRS_DIR": os.environ.get("CRS_DIR", DEBIAN_CRS), "PARANOIA": os.environ.get("PARANOIA", "1"),
           "MODE": os.environ.get("MODE", "block")}
    for name in PASSED_ON:
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def replicas() -> int:
    return int(os.environ.get("WAFSVC_REPLICAS", "2"))


def _interrupt(signo, frame) -> None:
    raise KeyboardInterrupt


def run(stack, banner: str) -> int:
    """Starts `stack`, prints `banner`, and stops it cleanly on Ctrl-C or SIGTERM."""
    # Explicit handlers: a shell that starts us in the background leaves
    # SIGINT ignored, and Python would then never raise KeyboardInterrupt.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        stack.start()
        print(banner, file=sys.stderr, flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        print("\nstopping...", file=sys.stderr, flush=True)
        codes = stack.stop()
        print("stopped: " + ", ".join(f"{n}={c}" for n, c in codes.items()), file=sys.stderr)
    return 0
