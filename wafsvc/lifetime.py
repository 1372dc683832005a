"""Every process the wafsvc supervisor forks dies with it.

A SIGKILLed supervisor cannot clean up, so each child asks the kernel for a
parent-death signal right after fork. Without it, a child reparented to init
lives on holding the replica's ports (the metrics server holds WAF_METRICS),
and the replica's next start fails with "Address already in use".
"""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, signo: int = signal.SIGTERM) -> None:
    """Called first thing in a forked child: `signo` reaches it when the
    supervisor (pid `parent`) dies. A supervisor that died between fork()
    and this call is caught by the getppid() check."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signo)
    except (OSError, AttributeError):
        return  # not Linux: the supervisor's own SIGTERM still reaches us
    if os.getppid() != parent:
        os.kill(os.getpid(), signo)
