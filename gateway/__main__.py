"""gateway entry point.

    python -m gateway --listen 127.0.0.1:12345 --wafsvc ipv4:127.0.0.1:50051

SIGTERM/SIGINT: stop accepting, finish evaluations in flight, then send
AGENT-DISCONNECT on every connection.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from common import logs
from common.options import ConfigError, config_error, host_port
from common.secrets import read_pem, read_secret
from gateway.apps import AppPolicies, keep_fresh
from gateway.config import GatewayConfig
from gateway.pool import WafPool
from gateway.responses import MissPolicy
from gateway.server import Gateway

log = logging.getLogger("gateway")


def hooks(config: GatewayConfig, policies: AppPolicies):
    """Request logs always; metrics too when GATEWAY_METRICS is set. The
    same object observes the server and the pool (gateway.pool.PoolHooks)."""
    if not config.metrics:
        from gateway.requestlog import RequestLog
        return RequestLog(config.log_request_data)
    from prometheus_client import CollectorRegistry, ProcessCollector
    from gateway import metrics
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # CPU and memory of the gateway process
    hooks = metrics.GatewayMetrics(registry, request_data=config.log_request_data, app_label=policies.label)
    try:
        metrics.serve(config.metrics, registry)
    except OSError as exc:  # port taken, address not local: say so, no traceback
        log.error("cannot listen for metrics", extra={"metrics": config.metrics, "error": str(exc)})
        raise SystemExit(1) from None
    return hooks


def channel_security(config: GatewayConfig):
    """(credentials, channel options, call metadata) for the path to wafsvc."""
    import grpc

    credentials, options, metadata = None, (), ()
    if config.tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=read_pem(config.tls_ca), private_key=read_pem(config.tls_key),
            certificate_chain=read_pem(config.tls_cert))
        if config.tls_server_name:
            options = (("grpc.ssl_target_name_override", config.tls_server_name),)
    if config.token_file:
        metadata = (("authorization", f"Bearer {read_secret(config.token_file)}"),)
    return credentials, options, metadata


async def serve(config: GatewayConfig) -> None:
    credentials, options, metadata = channel_security(config)
    # Each application's failure and response-miss policies, learned from
    # wafsvc and kept for when wafsvc cannot answer.
    policies = AppPolicies(config.failure_policy == "closed", MissPolicy(config.response_miss_policy))
    learning = asyncio.create_task(keep_fresh(policies, config.wafsvc, credentials, options, metadata))
    observers = hooks(config, policies)
    pool = WafPool(config.wafsvc, channels=config.channels, streams=config.streams,
                   max_batch=config.max_batch, deadline_s=config.deadline_ms / 1000,
                   hedge_s=config.hedge_ms / 1000, recycle_s=config.recycle_ms / 1000,
                   credentials=credentials, call_metadata=metadata, channel_options=options,
                   hooks=observers)
    if hasattr(observers, "watch_pool"):
        observers.watch_pool(pool)
    await pool.start()
    gateway = Gateway(config, pool, observers, policies)
    host, port = host_port(config.listen)
    await gateway.start(host, port)
    log.info("gateway listening", extra={"listen": config.listen, "wafsvc": config.wafsvc,
                                         "failure_policy": config.failure_policy,
                                         "response_miss_policy": config.response_miss_policy})
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signo in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signo, stopping.set)
    await stopping.wait()
    log.info("stopping: finishing evaluations in flight")
    await gateway.shutdown(grace_s=config.deadline_ms / 1000 + 1)
    await pool.close()
    learning.cancel()
    log.info("gateway stopped")


def main(argv: list[str] | None = None) -> int:
    try:
        config = GatewayConfig.from_args(argv)
    except ConfigError as exc:
        return config_error("gateway", str(exc))
    logs.setup(config.log_level, "gateway")
    if config.token_file:
        try:
            read_secret(config.token_file)
        except (OSError, ValueError) as exc:
            return config_error("gateway", f"GATEWAY_TOKEN_FILE: {exc}")
    import uvloop
    if config.processes == 1:
        uvloop.run(serve(config))
        return 0
    from dataclasses import replace

    from gateway.processes import metrics_address, supervise

    def run(index: int) -> int:
        uvloop.run(serve(replace(config, metrics=metrics_address(config.metrics, index))))
        return 0
    return supervise(config.processes, run)


if __name__ == "__main__":
    sys.exit(main())
