"""Applications: what wafsvc serves. Each one is a rule set plus the
policies around it; a request names its application (EvaluateRequest.
application, HAProxy's txn.modsec.app), and one application is the default.

They come from one of two places (wafsvc/config.py):

- the environment alone (RULES, CRS_DIR, MODE, ...): one application named
  "default", plus one per WAF_APPS entry, which differ only by rules file;
- a YAML file (WAF_CONFIG, wafsvc/appfile.py): any number of them. The
  environment's settings are then the defaults every application starts
  from, and each key the file sets wins.

Pure values, no engine: the engine (wafsvc/engine.py) builds rule sets from
them, sharing one rule set between applications whose rule text is the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

from common.options import ConfigError
from wafsvc.rules import RuleSetSpec

DEFAULT_NAME = "default"            # the default application's name without a file
PASS, BLOCK = "pass", "block"
TRUNCATED_POLICIES = (PASS, BLOCK)
MISS_POLICIES = (PASS, BLOCK)
FAILURE_POLICIES = ("closed", "open")
UNKNOWN_POLICIES = ("default", "refuse")
# A truncated body passes only if at least this much of it was inspected:
# less means it was not cut for its size (HAProxy had not read it: no
# `option http-buffer-request`; or tune.bufsize is tiny), and it is denied.
MIN_INSPECTED_BODY = 16384


@dataclass(frozen=True)
class Application:
    name: str
    rules: RuleSetSpec
    # What a caller does when it gets no verdict (wafsvc down, too slow):
    # closed (deny) or open (pass, flagged); "" leaves it to the caller's own
    # setting (the gateway's GATEWAY_FAILURE_POLICY).
    failure_policy: str = ""
    # A request body cut short before inspection: pass (flagged) or block,
    # after what arrived was inspected; pass needs min_inspected bytes.
    truncated_body: str = PASS
    min_inspected: int = MIN_INSPECTED_BODY
    # A response body cut short: pass (flagged) or block.
    truncated_response_body: str = PASS
    # Response inspection: kept transactions (inspect_response), how long
    # they wait, and what a caller should do when one is gone: pass
    # (flagged) or block; "" leaves it to the caller's own setting (the
    # gateway's GATEWAY_RESPONSE_MISS_POLICY), as failure_policy does.
    response_inspection: bool = True
    transaction_ttl_ms: int = 0          # 0: the worker's own (WAF_TRANSACTION_TTL_MS)
    response_miss_policy: str = ""
    # Ignored-rule lists whose rule sets are built at load, before fork.
    ignore_lists: tuple[tuple[int, ...], ...] = ()
    # Where it was declared ("apps.yaml:12"), for messages.
    origin: str = ""

    @property
    def mode(self) -> str:
        return self.rules.mode


@dataclass(frozen=True)
class Applications:
    apps: Mapping[str, Application]
    default: str
    # An application name nobody configured: "default" judges it with the
    # default application, "refuse" answers NOT_FOUND (UNKNOWN_APPLICATION).
    unknown: str = "default"
    source: str = "environment"      # or the YAML file's path
    extra_preload: tuple = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.default not in self.apps:
            raise ConfigError(f"{self.source}: the default application {self.default!r} is not configured")
        if self.unknown not in UNKNOWN_POLICIES:
            raise ConfigError(f"{self.source}: unknown_application must be default or refuse, "
                              f"got {self.unknown!r}")

    def resolve(self, name: str) -> Application | None:
        """The application that judges a request naming `name`: the default
        for "" (and for unknown names unless refused); None when refused."""
        if not name:
            return self.apps[self.default]
        app = self.apps.get(name)
        if app is None and self.unknown == "default":
            return self.apps[self.default]
        return app

    def preload(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """(application, ids) pairs to build at load: every application's
        ignore_lists, then WAF_IGNORE_PRELOAD's ("" = the default)."""
        pairs = [(name, ids) for name, app in self.apps.items() for ids in app.ignore_lists]
        pairs += [(app or self.default, ids) for app, ids in self.extra_preload]
        return tuple(dict.fromkeys(pairs))


def check(app: Application, where: str) -> None:
    """What no application may be: every mistake here would weaken it quietly."""
    spec = app.rules
    if not (spec.crs_dir or spec.rules_file or spec.rules_files or spec.extra_directives.strip()):
        raise ConfigError(f"{where}: application {app.name!r} has no rules (crs_dir, files or directives)")
    if spec.mode not in ("block", "detect"):
        raise ConfigError(f"{where}: mode must be block or detect, got {spec.mode!r}")
    if not 1 <= spec.paranoia <= 4:
        raise ConfigError(f"{where}: paranoia must be 1 to 4, got {spec.paranoia}")
    for label, value, allowed in (("failure_policy", app.failure_policy, ("", *FAILURE_POLICIES)),
                                  ("truncated_body", app.truncated_body, TRUNCATED_POLICIES),
                                  ("truncated_response_body", app.truncated_response_body, TRUNCATED_POLICIES),
                                  ("response_miss_policy", app.response_miss_policy, ("", *MISS_POLICIES))):
        if value not in allowed:
            raise ConfigError(f"{where}: {label} must be {' or '.join(a for a in allowed if a)}, got {value!r}")
    if app.min_inspected < 0:
        raise ConfigError(f"{where}: min_inspected must be 0 or more bytes, got {app.min_inspected}")
    if not 0 <= app.transaction_ttl_ms < 2**32:    # 0: the worker's WAF_TRANSACTION_TTL_MS
        raise ConfigError(f"{where}: transaction_ttl_ms must be 1 to {2**32 - 1}, got {app.transaction_ttl_ms}")
    for label in ("request_body_limit", "request_body_no_files_limit", "response_body_limit"):
        if getattr(spec, label) < 0:
            raise ConfigError(f"{where}: {label} must be a size in bytes, got {getattr(spec, label)}")
    for ids in app.ignore_lists:
        if not ids or any(i <= 0 for i in ids):
            raise ConfigError(f"{where}: ignore_lists holds lists of rule ids above 0, got {list(ids)}")


def from_specs(specs: Mapping[str, RuleSetSpec], truncated_body: str = PASS) -> Applications:
    """Applications from rule-set specs keyed by name, "" being the default
    (the engine's older constructor, tests and tools)."""
    policy = {"allow": PASS}.get(truncated_body, truncated_body)
    apps = {(name or DEFAULT_NAME): Application(name or DEFAULT_NAME, spec, truncated_body=policy)
            for name, spec in specs.items()}
    if not apps:
        raise ConfigError("no rule sets given")
    default = DEFAULT_NAME if "" in specs or DEFAULT_NAME in specs else next(iter(apps))
    for app in apps.values():
        if app.truncated_body not in TRUNCATED_POLICIES:
            raise ValueError(f"truncated_body must be pass (allow) or block, got {truncated_body!r}")
    return Applications(apps, default, unknown="refuse", source="rule-set specs")


def with_rules(app: Application, **changes) -> Application:
    return replace(app, rules=replace(app.rules, **changes))


def template(config) -> Application:
    """The application the environment describes (wafsvc.config.WafConfig):
    the default one without a file, every one's defaults with it."""
    spec = RuleSetSpec(base_conf=config.base_conf, mode=config.mode, crs_dir=config.crs_dir,
                       crs_setup=config.crs_setup, paranoia=config.paranoia, rules_file=config.rules,
                       extra_directives=config.extra_directives, audit_log=config.audit_log,
                       audit_log_parts=config.audit_log_parts)
    return Application(DEFAULT_NAME, spec, truncated_body={"allow": PASS}.get(config.truncated_body,
                                                                           config.truncated_body),
                       min_inspected=config.min_inspected_body,
                       truncated_response_body=config.truncated_response_body,
                       transaction_ttl_ms=config.transaction_ttl_ms, origin="environment")


def from_config(config) -> Applications:
    """Every application wafsvc serves, from WAF_CONFIG's file or from the
    environment alone. Raises ConfigError (AppFileError: file and line)."""
    base = template(config)
    if config.config:
        from wafsvc import appfile
        return appfile.load(config.config, base, config.unknown_application, config.ignore_preload)
    apps: dict[str, Application] = {}
    if config.rules or config.crs_dir:
        apps[DEFAULT_NAME] = base
    for name, path in config.apps.items():
        apps[name] = replace(base, name=name, rules=replace(base.rules, rules_file=path), origin="WAF_APPS")
    # Without RULES or CRS_DIR, the first WAF_APPS entry is the default.
    default = DEFAULT_NAME if DEFAULT_NAME in apps else next(iter(apps))
    for app in apps.values():
        check(app, app.origin)
    return Applications(apps, default, config.unknown_application, extra_preload=config.ignore_preload)
