"""A second HAProxy in front of a running stack's gateway and backend, with
another haproxy.cfg or SPOE file: one stack serves several configs."""

from __future__ import annotations

import pathlib

from stack import Stack, StackSpec


def start_haproxy(stack: Stack, log_dir: pathlib.Path, haproxy_cfg: pathlib.Path,
                  spoe_conf: pathlib.Path, env: dict[str, str] | None = None) -> Stack:
    """HAProxy alone (fresh frontend ports), sharing `stack`'s gateway and
    backend; stop() it when done. Its log goes to log_dir/haproxy.log."""
    base = stack.spec
    spec = StackSpec(gateway_port=base.gateway_port, backend_port=base.backend_port,
                     haproxy_bin=base.haproxy_bin, haproxy_cfg=haproxy_cfg, spoe_conf=spoe_conf,
                     haproxy_env=dict(env or {}), log_dir=log_dir)
    extra = Stack(spec)
    try:
        extra.start_haproxy()
    except BaseException:
        extra.stop()
        raise
    return extra
