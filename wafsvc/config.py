"""wafsvc settings: every flag, its environment variable and its default."""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass
from typing import Mapping, Sequence

from common.options import ConfigError, Option, check_addresses, check_paths_exist, parse

REPO_RULES = pathlib.Path(__file__).resolve().parent.parent / "rules"


def _ignore_lists(text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """'942100;920350 942100;api:931130' -> ((app, ids), ...)."""
    lists = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        app, sep, ids = item.rpartition(":")
        tokens = ids.replace(",", " ").split()
        if not tokens or not all(t.isdigit() and int(t) > 0 for t in tokens):
            raise ValueError(f"expected rule ids like '942100 920350', got {item!r}")
        lists.append((app.strip(), tuple(sorted({int(t) for t in tokens}))))
    return tuple(lists)


def _apps(text: str) -> dict[str, str]:
    """'api=/etc/waf/api.conf,shop=/etc/waf/shop.conf'."""
    apps: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"expected NAME=RULES_FILE, got {item!r}")
        apps[name] = path
    return apps


def _audit_parts(text: str) -> str:
    parts = text.strip().upper()
    if not parts or set(parts) - set("ABCDEFGHIJKZ"):
        raise ValueError(f"audit log parts are letters among ABCDEFGHIJKZ, got {text!r}")
    return parts


OPTIONS = (
    Option("listen", "WAF_LISTEN", "127.0.0.1:50051",
           "gRPC address; every worker binds it with SO_REUSEPORT"),
    Option("workers", "WAF_WORKERS", 0,
           "worker processes (0 = one per CPU this process may use)", int),
    Option("config", "WAF_CONFIG", "",
           "applications file (YAML; README, Several sites): many applications, each with its own rules "
           "and policies; the settings below marked (app) are then the defaults it starts from"),
    Option("unknown_application", "WAF_UNKNOWN_APPLICATION", "default",
           "a request naming an application that is not configured: default = judged by the default "
           "application, refuse = NOT_FOUND (UNKNOWN_APPLICATION), the caller's failure policy applies",
           choices=("default", "refuse")),
    Option("rules", "RULES", "",
           "(app) ModSecurity rules file loaded after CRS (may Include others); as in the original agent"),
    Option("crs_dir", "CRS_DIR", "",
           "(app) OWASP CRS directory holding rules/*.conf (v3 or v4); empty = no CRS"),
    Option("crs_setup", "CRS_SETUP", "",
           "(app) CRS setup file; default CRS_DIR/crs-setup.conf, else crs-setup.conf.example, "
           "else Debian's /etc/modsecurity/crs/crs-setup.conf"),
    Option("paranoia", "PARANOIA", 1, "(app) CRS blocking paranoia level, 1 to 4", int),
    Option("mode", "MODE", "block",
           "(app) block: disruptive rules deny; detect: DetectionOnly, matches are reported only",
           choices=("block", "detect")),
    Option("apps", "WAF_APPS", {},
           "extra applications without WAF_CONFIG, NAME=RULES_FILE[,...]: each is the default application "
           "with another RULES file; requests pick one by name", _apps),
    Option("base_conf", "WAF_BASE_CONF", str(REPO_RULES / "modsecurity.conf"),
           "engine base configuration loaded first (body access, limits, parsers)"),
    Option("extra_directives", "WAF_DIRECTIVES", "",
           "(app) extra ModSecurity directives appended last (e.g. 'SecPcreMatchLimit 100000')"),
    Option("ignore_profiles", "WAF_IGNORE_PROFILES", 32,
           "rule sets kept per distinct ignored-rule list (each costs a rule set's memory)", int),
    Option("ignore_preload", "WAF_IGNORE_PRELOAD", (),
           "ignored-rule lists whose rule sets are built at start and on reload, before workers "
           "fork, instead of on their first request: the txn.ignorerules values of your "
           "frontends, ';' between lists, APP: before a list for a named rule set "
           "(e.g. '942100;920350 942100')", _ignore_lists),
    Option("ignore_new_lists_per_min", "WAF_IGNORE_NEW_LISTS_PER_MIN", 6,
           "ignored-rule lists not in WAF_IGNORE_PRELOAD that one worker compiles on demand per minute "
           "(~70 ms each with CRS, on its server loop); beyond it they are refused (IGNORE_LIST_REFUSED); "
           "0 = preloaded lists only", int),
    Option("max_request_bytes", "WAF_MAX_REQUEST_BYTES", 4 * 1024 * 1024,
           "largest gRPC message accepted", int),
    Option("max_headers", "WAF_MAX_HEADERS", 128,
           "most headers in a request or response (LIMIT_HEADER_COUNT); HAProxy sends at most 101", int),
    Option("max_header_bytes", "WAF_MAX_HEADER_BYTES", 80 * 1024,
           "most bytes of header names and values (LIMIT_HEADER_BYTES); HAProxy's head fits tune.bufsize", int),
    Option("max_uri_bytes", "WAF_MAX_URI_BYTES", 80 * 1024,
           "longest URI (LIMIT_URI_BYTES); HAProxy's fits tune.bufsize", int),
    Option("max_body_bytes", "WAF_MAX_BODY_BYTES", 128 * 1024,
           "largest request body inspected (LIMIT_BODY_BYTES): callers cut longer ones and set body_truncated, as "
           "HAProxy (tune.bufsize, 64 KiB shipped) and the Python client do", int),
    Option("audit_log", "WAF_AUDIT_LOG", "",
           "ModSecurity audit log file: JSON, one line per relevant transaction (a rule with 'log' "
           "matched), keyed by HAProxy's unique-id; shared safely by all workers; empty = off"),
    Option("audit_log_parts", "WAF_AUDIT_LOG_PARTS", "ABHZ",
           "SecAuditLogParts: A B (request headers) H (matches) Z by default; add C to log request "
           "bodies", _audit_parts),
    Option("drain_grace_ms", "WAF_DRAIN_GRACE_MS", 10000,
           "on SIGTERM, longest wait for evaluations in flight and the responses of held transactions; "
           "idle streams end at once", int),
    Option("truncated_body", "WAF_TRUNCATED_BODY", "pass",
           "(app) a request whose body arrived cut short (body_truncated, e.g. longer than HAProxy's "
           "tune.bufsize): pass = inspect what arrived and let it through, flagged; block = deny (403) "
           "after inspecting what arrived; both report rule 99010 (allow = pass)",
           choices=("pass", "block", "allow")),
    Option("min_inspected_body", "WAF_MIN_INSPECTED_BODY", 16384,
           "(app) a truncated body passes only if at least this many bytes of it were inspected; a body "
           "cut shorter was not cut for its size (no 'option http-buffer-request', tiny tune.bufsize) "
           "and is denied (99010)", int),
    Option("truncated_response_body", "WAF_TRUNCATED_RESPONSE_BODY", "pass",
           "(app) a response whose body arrived cut short: pass = inspect what arrived and let it "
           "through, flagged; block = deny after inspecting it; both report rule 99011",
           choices=("pass", "block")),
    Option("transaction_ttl_ms", "WAF_TRANSACTION_TTL_MS", 35000,
           "(app) response inspection: how long a transaction kept by a request (inspect_response) waits for "
           "its response before it ends (EXPIRED); keep it a little above HAProxy's 'timeout server'", int),
    Option("max_held_transactions", "WAF_MAX_HELD_TRANSACTIONS", 2000,
           "response inspection: most transactions one worker keeps for their responses; past it the "
           "oldest ends (EVICTED). Each costs about 60 KB with CRS (README, Response inspection)", int),
    Option("tls_cert", "WAF_TLS_CERT", "",
           "server certificate chain (PEM); with WAF_TLS_KEY, gRPC is TLS only and plaintext is refused"),
    Option("tls_key", "WAF_TLS_KEY", "", "private key (PEM) of WAF_TLS_CERT"),
    Option("tls_client_ca", "WAF_TLS_CLIENT_CA", "",
           "CA bundle (PEM); when set, clients must present a certificate it signed (mutual TLS)"),
    Option("token_file", "WAF_TOKEN_FILE", "",
           "file holding a bearer token that every call except health checks must present "
           "(authorization: Bearer ...); empty = no token"),
    Option("worker_max_rss_mb", "WAF_WORKER_MAX_RSS_MB", 0,
           "a worker whose resident memory grows past this drains and is replaced; 0 = no limit", int),
    Option("metrics", "WAF_METRICS", "",
           "Prometheus listen address, e.g. 127.0.0.1:9102; empty = off"),
    Option("log_level", "LOG_LEVEL", "info", "debug, info, warning or error",
           choices=("debug", "info", "warning", "error")),
)


@dataclass(frozen=True)
class WafConfig:
    listen: str = "127.0.0.1:50051"
    workers: int = 1
    rules: str = ""
    crs_dir: str = ""
    crs_setup: str = ""
    paranoia: int = 1
    mode: str = "block"
    apps: Mapping[str, str] = None  # type: ignore[assignment]
    config: str = ""
    unknown_application: str = "default"
    base_conf: str = str(REPO_RULES / "modsecurity.conf")
    extra_directives: str = ""
    ignore_profiles: int = 32
    ignore_preload: tuple = ()
    ignore_new_lists_per_min: int = 6
    max_request_bytes: int = 4 * 1024 * 1024
    max_headers: int = 128
    max_header_bytes: int = 80 * 1024
    max_uri_bytes: int = 80 * 1024
    max_body_bytes: int = 128 * 1024
    audit_log: str = ""
    audit_log_parts: str = "ABHZ"
    drain_grace_ms: int = 10000
    truncated_body: str = "pass"
    min_inspected_body: int = 16384
    truncated_response_body: str = "pass"
    transaction_ttl_ms: int = 35000
    max_held_transactions: int = 2000
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    token_file: str = ""
    worker_max_rss_mb: int = 0
    metrics: str = ""
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.apps is None:
            object.__setattr__(self, "apps", {})
        self.validate()

    def validate(self) -> None:
        if self.config and self.apps:
            raise ConfigError("WAF_APPS and WAF_CONFIG both list applications: declare them all in "
                              f"{self.config}")
        if not self.config and not self.rules and not self.crs_dir and not self.apps:
            raise ConfigError("no rules configured: set RULES, CRS_DIR, WAF_APPS or WAF_CONFIG")
        if not 1 <= self.paranoia <= 4:
            raise ConfigError(f"PARANOIA must be 1 to 4, got {self.paranoia}")
        if self.workers < 1:
            raise ConfigError(f"WAF_WORKERS must be at least 1, got {self.workers}")
        if self.drain_grace_ms < 0:
            raise ConfigError(f"WAF_DRAIN_GRACE_MS must be 0 or more, got {self.drain_grace_ms}")
        if self.ignore_profiles < 1:
            raise ConfigError("WAF_IGNORE_PROFILES must be at least 1")
        if len(self.ignore_preload) > self.ignore_profiles:
            raise ConfigError("WAF_IGNORE_PRELOAD has more lists than WAF_IGNORE_PROFILES keeps")
        if self.ignore_new_lists_per_min < 0:
            raise ConfigError("WAF_IGNORE_NEW_LISTS_PER_MIN must be 0 (preloaded lists only) or more")
        limits = (("WAF_MAX_HEADERS", self.max_headers), ("WAF_MAX_HEADER_BYTES", self.max_header_bytes),
                  ("WAF_MAX_URI_BYTES", self.max_uri_bytes), ("WAF_MAX_BODY_BYTES", self.max_body_bytes))
        for name, value in limits:
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        # A request within every limit must fit one gRPC message, or it would
        # fail in gRPC (RESOURCE_EXHAUSTED) with no reason instead of a limit.
        largest = self.max_header_bytes + self.max_uri_bytes + self.max_body_bytes + 4 * self.max_headers + 4096
        if largest > self.max_request_bytes:
            raise ConfigError(f"WAF_MAX_REQUEST_BYTES ({self.max_request_bytes}) must hold a request within "
                              f"the limits (about {largest} bytes): raise it with the WAF_MAX_* limits")
        if "default" in self.apps and (self.rules or self.crs_dir):
            raise ConfigError("WAF_APPS: 'default' names the application of RULES and CRS_DIR; pick another name")
        known_apps = {""} | set(self.apps)
        for app, _ in self.ignore_preload:
            if app not in known_apps and not self.config:   # the file's names are checked when it is read
                raise ConfigError(f"WAF_IGNORE_PRELOAD: no rule set named {app!r} (WAF_APPS)")
        check_addresses((("WAF_LISTEN", self.listen), ("WAF_METRICS", self.metrics)))
        if self.audit_log and not os.path.isdir(os.path.dirname(os.path.abspath(self.audit_log))):
            raise ConfigError(f"WAF_AUDIT_LOG: the directory of {self.audit_log} does not exist")
        check_paths_exist((("RULES", self.rules), ("CRS_DIR", self.crs_dir),
                           ("WAF_BASE_CONF", self.base_conf), ("WAF_TLS_CERT", self.tls_cert),
                           ("WAF_TLS_KEY", self.tls_key), ("WAF_TLS_CLIENT_CA", self.tls_client_ca),
                           ("WAF_TOKEN_FILE", self.token_file), ("WAF_CONFIG", self.config),
                           *self.apps.items()))
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("WAF_TLS_CERT and WAF_TLS_KEY go together: set both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("WAF_TLS_CLIENT_CA (mutual TLS) needs WAF_TLS_CERT and WAF_TLS_KEY")
        if self.truncated_body not in ("pass", "block", "allow"):
            raise ConfigError(f"WAF_TRUNCATED_BODY: {self.truncated_body!r} is not pass or block")
        if self.min_inspected_body < 0:
            raise ConfigError(f"WAF_MIN_INSPECTED_BODY must be 0 or more, got {self.min_inspected_body}")
        if not 0 < self.transaction_ttl_ms < 2**32:
            raise ConfigError(f"WAF_TRANSACTION_TTL_MS must be 1 to {2**32 - 1} ms, got {self.transaction_ttl_ms}")
        if self.max_held_transactions < 1:
            raise ConfigError(f"WAF_MAX_HELD_TRANSACTIONS must be at least 1, got {self.max_held_transactions}")
        if self.worker_max_rss_mb < 0:
            raise ConfigError("WAF_WORKER_MAX_RSS_MB must be 0 (off) or a size in MiB")

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None,
                  environ: Mapping[str, str] | None = None) -> "WafConfig":
        values = parse("wafsvc", "ModSecurity evaluation service (gRPC).", OPTIONS, argv, environ)
        if values["workers"] == 0:
            values["workers"] = len(os.sched_getaffinity(0))
        return cls(**values)
