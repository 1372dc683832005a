"""One configuration value for Client and AsyncClient: where wafsvc is, how
to reach it securely, and how long and how often to try.

    ClientConfig(target="dns:///wafsvc:50051", deadline=0.5, retries=2)
    ClientConfig.from_env()          # MODSEC_SPOA_TARGET, MODSEC_SPOA_TLS_CA, ...
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import grpc

DEFAULT_TARGET = "127.0.0.1:50051"
# wafsvc's own default limit (WAF_MAX_BODY_BYTES): bodies past it are cut
# here and flagged body_truncated, as HAProxy does, so the application's
# truncated-body policy decides instead of a refusal.
DEFAULT_MAX_BODY_BYTES = 128 * 1024


@dataclass(frozen=True)
class TLS:
    """PEM files. `ca` verifies wafsvc; `cert` and `key` are this client's
    identity for mutual TLS; `server_name` overrides the name checked in
    wafsvc's certificate."""
    ca: str = ""
    cert: str = ""
    key: str = ""
    server_name: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise ValueError("TLS cert and key go together: set both or neither")
        return grpc.ssl_channel_credentials(_read(self.ca), _read(self.key), _read(self.cert))


def _read(path: str) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


@dataclass(frozen=True)
class ClientConfig:
    """`target` is a gRPC target: "host:port", "dns:///name:port" (every
    address the name resolves to), "ipv4:a:p,b:p", or a list of
    "ip:port" addresses. Calls are spread round robin over them, and a
    retry goes to another replica when there is one.

    `deadline` (seconds) bounds one evaluate, retries included. `retries`
    is how many more attempts a retryable failure (unavailable, draining,
    engine error) gets."""
    target: str | Sequence[str] = DEFAULT_TARGET
    tls: TLS | None = None
    token: str = ""
    deadline: float = 1.0
    retries: int = 2
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # 0: send whole bodies
    max_batch: int = 16  # stream mode: most requests per message
    response_channels: int = 2  # pinned connections for response inspection
    max_message_bytes: int = 4 * 1024 * 1024
    channel_options: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", grpc_target(self.target))
        if self.deadline <= 0:
            raise ValueError(f"deadline must be positive, got {self.deadline}")
        if self.retries < 0 or self.max_body_bytes < 0 or self.max_batch < 1 or self.response_channels < 1:
            raise ValueError("retries and max_body_bytes must be >= 0, max_batch and response_channels >= 1")
        if self.token and (any(c.isspace() for c in self.token) or not self.token.isprintable()):
            raise ValueError("a token is one line of printable characters without spaces")

    def replace(self, **changes) -> "ClientConfig":
        return replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "ClientConfig":
        """The MODSEC_SPOA_* variables (see ENVIRONMENT); keyword arguments win."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        tls: dict[str, str] = {}
        for opt in ENVIRONMENT:
            raw = environ.get(opt.env)
            if raw is None or raw == "":
                continue
            try:
                value = opt.type(raw)
            except ValueError as exc:
                raise ValueError(f"{opt.env}: {exc}") from None
            if opt.dest.startswith("tls_"):
                tls[opt.dest[4:]] = value
            elif opt.dest == "token_file":
                values["token"] = token_from(value)
            elif opt.dest == "deadline_ms":
                values["deadline"] = value / 1000
            else:
                values[opt.dest] = value
        if tls:
            values["tls"] = TLS(**tls)
        values.update(overrides)
        return cls(**values)

    # -- what the channels need ---------------------------------------------
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def options(self, balanced: bool = True) -> list[tuple[str, Any]]:
        """balanced: round robin over every address; otherwise one connection
        (pick_first), which reaches one worker and keeps reaching it."""
        # Pinned connections start at a random address, so that several
        # spread over the replicas.
        policy = {"round_robin": {}} if balanced else {"pick_first": {"shuffleAddressList": True}}
        options = [
            ("grpc.service_config", json.dumps({"loadBalancingConfig": [policy]})),
            # Separate connections per channel: a pinned channel must not
            # share its connection (and so its worker) with another channel.
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.enable_retries", 0),  # ours, so they go to another replica and count against the deadline
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1_000),
            ("grpc.dns_min_time_between_resolutions_ms", 1_000),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ]
        if self.tls is not None and self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        return options + list(self.channel_options)

    def credentials(self) -> grpc.ChannelCredentials | None:
        return self.tls.credentials() if self.tls is not None else None


def grpc_target(target: str | Sequence[str]) -> str:
    """A gRPC target from a target string or a list of "ip:port"."""
    if isinstance(target, str):
        if not target.strip():
            raise ValueError("target is empty")
        if "," in target and ":" in target.split(",")[0] and not target.startswith(("ipv4:", "ipv6:")):
            return grpc_target([part.strip() for part in target.split(",")])
        return target.strip()
    addresses = list(target)
    if not addresses:
        raise ValueError("target is an empty list")
    if len(addresses) == 1:
        return addresses[0]
    families = set()
    for address in addresses:
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"expected IP:PORT in a target list, got {address!r}")
        try:
            families.add(ipaddress.ip_address(host.strip("[]")).version)
        except ValueError:
            raise ValueError(f"a target list holds IP addresses; for names use dns:///NAME:PORT, "
                             f"got {address!r}") from None
    if len(families) > 1:
        raise ValueError("a target list is all IPv4 or all IPv6")
    return ("ipv4:" if families == {4} else "ipv6:") + ",".join(addresses)


def token_from(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"{path} is empty")
    return token


@dataclass(frozen=True)
class EnvOption:
    """Same shape as common.options.Option, so the configuration reference
    (docs/configuration.md) renders the client's variables with the services' ones."""
    dest: str
    env: str
    default: Any
    help: str
    type: Callable[[str], Any] = str

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")


ENVIRONMENT = (
    EnvOption("target", "MODSEC_SPOA_TARGET", DEFAULT_TARGET,
              "wafsvc gRPC target: HOST:PORT, dns:///NAME:PORT or ipv4:IP:PORT,IP:PORT"),
    EnvOption("tls_ca", "MODSEC_SPOA_TLS_CA", "", "CA bundle (PEM) that signed wafsvc's certificate; turns TLS on"),
    EnvOption("tls_cert", "MODSEC_SPOA_TLS_CERT", "", "client certificate chain (PEM) for mutual TLS"),
    EnvOption("tls_key", "MODSEC_SPOA_TLS_KEY", "", "private key (PEM) of MODSEC_SPOA_TLS_CERT"),
    EnvOption("tls_server_name", "MODSEC_SPOA_TLS_SERVER_NAME", "",
              "name to verify in wafsvc's certificate instead of the target's host"),
    EnvOption("token_file", "MODSEC_SPOA_TOKEN_FILE", "", "file holding wafsvc's bearer token (WAF_TOKEN_FILE)"),
    EnvOption("deadline_ms", "MODSEC_SPOA_DEADLINE_MS", 1000, "time allowed for one verdict, retries included (ms)",
              int),
    EnvOption("retries", "MODSEC_SPOA_RETRIES", 2, "more attempts after a retryable failure, on another replica",
              int),
    EnvOption("max_body_bytes", "MODSEC_SPOA_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES,
              "bodies past this are cut and flagged body_truncated (wafsvc's WAF_MAX_BODY_BYTES); 0 = whole",
              int),
)
