"""The whole topology on one machine, without Docker: demo backend, N wafsvc
replicas, the gateway and HAProxy, as real processes. `make up` runs it in
the foreground; the end-to-end tests start the same thing on free ports."""

from stack.processes import Stack, StackSpec, free_port

__all__ = ["Stack", "StackSpec", "free_port"]
