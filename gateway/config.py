"""gateway settings: every flag, its environment variable and its default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from common.options import ConfigError, Option, boolean, check_addresses, check_paths_exist, parse

OPTIONS = (
    Option("listen", "GATEWAY_LISTEN", "127.0.0.1:12345", "SPOP address HAProxy connects to"),
    Option("wafsvc", "GATEWAY_WAFSVC", "ipv4:127.0.0.1:50051",
           "gRPC target of the wafsvc pool: dns:///wafsvc:50051 (every replica the name "
           "resolves to) or ipv4:HOST:PORT,HOST:PORT; balanced round robin"),
    Option("deadline_ms", "GATEWAY_DEADLINE_MS", 400,
           "time allowed for a verdict, retries included; keep it below the SPOE "
           "'timeout processing' so HAProxy never times out first", int),
    Option("failure_policy", "GATEWAY_FAILURE_POLICY", "closed",
           "no verdict in time: closed = intervention (deny), open = pass; both set txn.modsec.failed. "
           "An application with its own failure_policy in wafsvc's applications file follows that "
           "(learned through ListApplications and kept while wafsvc is down)",
           choices=("closed", "open")),
    Option("response_miss_policy", "GATEWAY_RESPONSE_MISS_POLICY", "pass",
           "a response whose held transaction is gone (expired, evicted, its worker died...): "
           "pass = let it through, flagged (txn.modsec.res_miss) and counted; block = deny it (503). "
           "An application with its own response_miss_policy in wafsvc's applications file follows that",
           choices=("pass", "block")),
    Option("hedge_ms", "GATEWAY_HEDGE_MS", 150,
           "re-send an evaluation a worker has not answered within this time to another "
           "worker (a hung replica), and give that worker no new work until it answers; "
           "0 (or not below the deadline) = off", int),
    Option("recycle_ms", "GATEWAY_RECYCLE_MS", 15000,
           "replace one gRPC channel this often, in turn, so that replicas that joined or "
           "came back get streams (and DNS is resolved again); 0 = never", int),
    Option("channels", "GATEWAY_CHANNELS", 4,
           "separate gRPC connections per wafsvc replica; several are needed because one "
           "HTTP/2 connection pins to one SO_REUSEPORT worker", int),
    Option("streams", "GATEWAY_STREAMS", 4, "long-lived evaluation streams per channel", int),
    Option("max_batch", "GATEWAY_MAX_BATCH", 16, "most requests carried by one stream message", int),
    Option("processes", "GATEWAY_PROCESSES", 1,
           "gateway processes sharing the SPOP port (SO_REUSEPORT), each with its own streams to wafsvc; "
           "process i serves metrics on GATEWAY_METRICS's port + i. For hosts with cores to spare", int),
    Option("max_inflight", "GATEWAY_MAX_INFLIGHT", 2048,
           "evaluations in flight before the gateway stops reading from HAProxy", int),
    Option("max_frame_size", "GATEWAY_MAX_FRAME_SIZE", 1048576,
           "largest SPOP frame accepted; the smaller of this and HAProxy's offer is used", int),
    Option("hello_timeout_ms", "GATEWAY_HELLO_TIMEOUT_MS", 5000,
           "close connections that do not say HELLO within this time", int),
    Option("idle_timeout_ms", "GATEWAY_IDLE_TIMEOUT_MS", 600000,
           "close connections that send nothing for this long", int),
    Option("frame_timeout_ms", "GATEWAY_FRAME_TIMEOUT_MS", 5000,
           "a frame HAProxy has started must be complete within this time (slow-loris guard)", int),
    Option("haproxy_bufsize", "GATEWAY_HAPROXY_BUFSIZE", 65536,
           "HAProxy's tune.bufsize: a body without Content-Length (chunked, HTTP/2) that fills "
           "that buffer is treated as truncated (WAF_TRUNCATED_BODY applies); 0 = do not guess", int),
    Option("tls_ca", "GATEWAY_TLS_CA", "",
           "CA bundle (PEM) that signed wafsvc's certificate; setting it (or GATEWAY_TLS_CERT) turns TLS on"),
    Option("tls_cert", "GATEWAY_TLS_CERT", "",
           "client certificate chain (PEM) for mutual TLS with wafsvc"),
    Option("tls_key", "GATEWAY_TLS_KEY", "", "private key (PEM) of GATEWAY_TLS_CERT"),
    Option("tls_server_name", "GATEWAY_TLS_SERVER_NAME", "",
           "name to verify in wafsvc's certificate instead of the target's host name"),
    Option("token_file", "GATEWAY_TOKEN_FILE", "",
           "file holding the bearer token sent to wafsvc (WAF_TOKEN_FILE); empty = none"),
    Option("default_app", "GATEWAY_DEFAULT_APP", "",
           "rule set used when the SPOE message carries no app argument"),
    Option("metrics", "GATEWAY_METRICS", "", "Prometheus listen address, e.g. 127.0.0.1:9101; empty = off"),
    Option("log_request_data", "GATEWAY_LOG_REQUEST_DATA", False,
           "add request-derived data (Host header, the first rule's matched data) to per-request "
           "log lines; off = ids only. Bodies are never logged", boolean),
    Option("log_level", "LOG_LEVEL", "info", "debug, info, warning or error",
           choices=("debug", "info", "warning", "error")),
)


@dataclass(frozen=True)
class GatewayConfig:
    listen: str = "127.0.0.1:12345"
    wafsvc: str = "ipv4:127.0.0.1:50051"
    deadline_ms: int = 400
    failure_policy: str = "closed"
    response_miss_policy: str = "pass"
    hedge_ms: int = 150
    recycle_ms: int = 15000
    channels: int = 4
    streams: int = 4
    max_batch: int = 16
    processes: int = 1
    max_inflight: int = 2048
    max_frame_size: int = 1048576
    hello_timeout_ms: int = 5000
    idle_timeout_ms: int = 600000
    frame_timeout_ms: int = 5000
    haproxy_bufsize: int = 65536
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_server_name: str = ""
    token_file: str = ""
    default_app: str = ""
    metrics: str = ""
    log_request_data: bool = False
    log_level: str = "info"

    def __post_init__(self) -> None:
        check_addresses((("GATEWAY_LISTEN", self.listen), ("GATEWAY_METRICS", self.metrics)))
        for label, value, low in (("GATEWAY_DEADLINE_MS", self.deadline_ms, 1),
                                  ("GATEWAY_CHANNELS", self.channels, 1),
                                  ("GATEWAY_STREAMS", self.streams, 1),
                                  ("GATEWAY_MAX_BATCH", self.max_batch, 1),
                                  ("GATEWAY_PROCESSES", self.processes, 1),
                                  ("GATEWAY_MAX_INFLIGHT", self.max_inflight, 1),
                                  ("GATEWAY_MAX_FRAME_SIZE", self.max_frame_size, 256),
                                  ("GATEWAY_HELLO_TIMEOUT_MS", self.hello_timeout_ms, 1),
                                  ("GATEWAY_IDLE_TIMEOUT_MS", self.idle_timeout_ms, 1),
                                  ("GATEWAY_FRAME_TIMEOUT_MS", self.frame_timeout_ms, 1),
                                  ("GATEWAY_HAPROXY_BUFSIZE", self.haproxy_bufsize, 0)):
            if value < low:
                raise ConfigError(f"{label} must be at least {low}, got {value}")
        for label, value in (("GATEWAY_HEDGE_MS", self.hedge_ms), ("GATEWAY_RECYCLE_MS", self.recycle_ms)):
            if value < 0:
                raise ConfigError(f"{label} must be 0 or more, got {value}")
        check_paths_exist((("GATEWAY_TLS_CA", self.tls_ca), ("GATEWAY_TLS_CERT", self.tls_cert),
                           ("GATEWAY_TLS_KEY", self.tls_key), ("GATEWAY_TOKEN_FILE", self.token_file)))
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("GATEWAY_TLS_CERT and GATEWAY_TLS_KEY go together: set both or neither")
        if self.tls_server_name and not self.tls:
            raise ConfigError("GATEWAY_TLS_SERVER_NAME needs TLS: set GATEWAY_TLS_CA")
        if self.failure_policy not in ("closed", "open"):
            raise ConfigError(f"GATEWAY_FAILURE_POLICY: {self.failure_policy!r} is not closed or open")
        if self.response_miss_policy not in ("pass", "block"):
            raise ConfigError(f"GATEWAY_RESPONSE_MISS_POLICY: {self.response_miss_policy!r} is not pass or block")

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None,
                  environ: Mapping[str, str] | None = None) -> "GatewayConfig":
        return cls(**parse("gateway", "SPOP agent for HAProxy that asks wafsvc for verdicts.",
                           OPTIONS, argv, environ))
