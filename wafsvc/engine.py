"""The ModSecurity engine: rule sets in, typed verdicts out. No gRPC here.

One Engine lives in each worker process. libmodsecurity holds the GIL for
every call, so a worker evaluates one request at a time on one core; the
service scales by processes, never threads.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import libmodsecurity

from wafapi import waf_pb2
from wafsvc.rules import RuleSetSpec, RulesError, compose

log = logging.getLogger("wafsvc.engine")

CONNECTOR = "modsec-spoa wafsvc"
DEFAULT_APP = ""

# A body cut short before inspection (HAProxy hands SPOE at most one buffer)
# is reported as this synthetic match, in ModSecurity's local-use id range,
# so txn.modsec.rules and the logs say why a request was stopped or flagged.
TRUNCATED_BODY_RULE_ID = 99010
TRUNCATED_BODY_MESSAGE = "request body truncated before inspection"
TRUNCATED_BODY_STATUS = 403
TRUNCATED_BODY_POLICIES = ("block", "allow")


class EvaluationFailed(Exception):
    """The request cannot be evaluated; code is a grpc.StatusCode name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class LoadedRules:
    """What one load produced: used for logs, metrics and health."""
    rule_counts: Mapping[str, int]
    loaded_at: float


def _load_rules_set(text: str, what: str) -> tuple[libmodsecurity.RulesSet, int]:
    rules_set = libmodsecurity.RulesSet()
    count = rules_set.load(text)
    if count < 0:
        raise RulesError(f"{what}: {rules_set.get_parser_error().strip()}")
    return rules_set, count


class Engine:
    def __init__(self, specs: Mapping[str, RuleSetSpec], ignore_profiles: int = 32,
                 truncated_body: str = "block",
                 preload: Sequence[tuple[str, tuple[int, ...]]] = ()) -> None:
        if truncated_body not in TRUNCATED_BODY_POLICIES:
            raise ValueError(f"truncated_body must be block or allow, got {truncated_body!r}")
        self.truncated_body = truncated_body
        self._modsec = libmodsecurity.ModSecurity()
        self._modsec.set_connector_information(CONNECTOR)
        # Without a callback libmodsecurity prints every match to stderr;
        # matches reach us through get_rule_messages() instead.
        self._modsec.set_log_callback(_discard)
        self._specs: Mapping[str, RuleSetSpec] = {}
        self._rule_sets: dict[str, libmodsecurity.RulesSet] = {}
        self._profiles: OrderedDict[tuple[str, tuple[int, ...]], libmodsecurity.RulesSet] = OrderedDict()
        self._max_profiles = ignore_profiles
        self._preload = tuple(preload)
        # Reload outcomes (SIGHUP), read by logs and metrics.
        self.reload_successes = 0
        self.reload_failures = 0
        self.last_reload_error = ""
        self.loaded = self.load(specs)

    def load(self, specs: Mapping[str, RuleSetSpec]) -> LoadedRules:
        """Parse every rule set, then swap them in together.

        A parse error raises RulesError and leaves the rules in service
        untouched, so a bad reload never weakens protection.
        """
        fresh, counts = {}, {}
        for app, spec in specs.items():
            fresh[app], counts[app] = _load_rules_set(compose(spec), f"rule set {app or 'default'!r}")
        # Known ignore lists are built here, not on their first request: a
        # CRS rule set takes 50-90 ms to parse, too long inside a verdict's
        # deadline on a busy machine. Built before fork, workers share them.
        profiles: OrderedDict = OrderedDict()
        for app, ids in self._preload:
            if app not in specs:
                raise RulesError(f"ignore list {ids}: no rule set named {app!r}")
            profiles[(app, ids)], _ = _load_rules_set(compose(specs[app], ids), f"ignore list {ids}")
        self._specs, self._rule_sets, self._profiles = dict(specs), fresh, profiles
        self.loaded = LoadedRules(counts, time.time())
        return self.loaded

    @property
    def loaded_at(self) -> float:
        return self.loaded.loaded_at

    def reload(self, specs: Mapping[str, RuleSetSpec]) -> LoadedRules:
        """load(), counted: a failure keeps the old rules and is remembered."""
        try:
            loaded = self.load(specs)
        except RulesError as exc:
            self.reload_failures += 1
            self.last_reload_error = str(exc)
            raise
        self.reload_successes += 1
        self.last_reload_error = ""
        return loaded

    def _rules_for(self, app: str, ignore_ids: Iterable[int]) -> libmodsecurity.RulesSet:
        try:
            base = self._rule_sets[app]
        except KeyError:
            known = ", ".join(repr(name) for name in self._rule_sets)
            raise EvaluationFailed("INVALID_ARGUMENT", f"unknown application {app!r}; configured: {known}") from None
        ids = tuple(sorted(set(ignore_ids)))
        if not ids:
            return base
        # Ignored ids come from per-frontend HAProxy settings, so there are few
        # distinct lists. Each gets its own rule set with SecRuleRemoveById: the
        # removal cannot leak into other requests, and costs nothing per request.
        key = (app, ids)
        profile = self._profiles.get(key)
        if profile is None:
            if 0 in ids:
                raise EvaluationFailed("INVALID_ARGUMENT", "rule id 0 is not a valid rule id")
            try:
                profile, _ = _load_rules_set(compose(self._specs[app], ids), f"ignore list {ids}")
            except RulesError as exc:
                raise EvaluationFailed("INVALID_ARGUMENT", str(exc)) from None
            self._profiles[key] = profile
            if len(self._profiles) > self._max_profiles:
                self._profiles.popitem(last=False)
            log.info("built rule set for app %r without rules %s", app, " ".join(map(str, ids)))
        else:
            self._profiles.move_to_end(key)
        return profile

    def evaluate(self, req: waf_pb2.EvaluateRequest,
                 verdict: waf_pb2.Verdict | None = None) -> waf_pb2.Verdict:
        """Fills `verdict` (a fresh one by default) so that a batch can
        evaluate straight into its response message without a copy."""
        rules = self._rules_for(req.application, req.ignore_rule_ids)
        started = time.perf_counter_ns()
        try:
            tx = libmodsecurity.Transaction(self._modsec, rules, req.transaction_id or None)
            intervention = _run_request_phases(tx, req)
            tx.process_logging()
            messages = tx.get_rule_messages()
        except (RuntimeError, ValueError, TypeError) as exc:
            raise EvaluationFailed("INTERNAL", f"engine error: {exc}") from None
        elapsed_us = (time.perf_counter_ns() - started) // 1000
        if verdict is None:
            verdict = waf_pb2.Verdict()
        verdict.transaction_id = tx.id
        verdict.engine_time_us = elapsed_us
        if intervention is not None and intervention.disruptive:
            verdict.intervention = True
            verdict.status = intervention.status
            verdict.log = intervention.log or ""
            if intervention.url:
                verdict.redirect_url = intervention.url
                verdict.action = waf_pb2.ACTION_REDIRECT
            else:
                verdict.action = waf_pb2.ACTION_DENY
        else:
            verdict.action = waf_pb2.ACTION_PASS
        add = verdict.matches.add
        for msg in messages:
            add(id=msg.rule_id, message=_text(msg, "message"), severity=msg.severity, tags=msg.tags,
                matched_data=_text(msg, "data"), phase=msg.phase)
        if req.body_truncated:
            self._apply_truncation_policy(req, verdict)
        return verdict

    def _apply_truncation_policy(self, req: waf_pb2.EvaluateRequest, verdict: waf_pb2.Verdict) -> None:
        """What arrived was inspected; the rest never will be, so an attack
        could hide past the cut. Always say so; deny unless told to allow
        (and never in detect mode, where nothing is denied)."""
        declared = f"{req.content_length} declared" if req.content_length >= 0 else "no Content-Length"
        verdict.matches.add(id=TRUNCATED_BODY_RULE_ID, message=TRUNCATED_BODY_MESSAGE, severity=2,
                            tags=["modsec-spoa/truncated-body"], phase=2,
                            matched_data=f"{len(req.body)} bytes inspected, {declared}")
        blocking = self._specs.get(req.application, RuleSetSpec("")).mode == "block"
        if self.truncated_body == "block" and blocking and not verdict.intervention:
            verdict.intervention = True
            verdict.status = TRUNCATED_BODY_STATUS
            verdict.action = waf_pb2.ACTION_DENY
            verdict.log = f"[id \"{TRUNCATED_BODY_RULE_ID}\"] {TRUNCATED_BODY_MESSAGE}"


def _run_request_phases(tx: libmodsecurity.Transaction, req: waf_pb2.EvaluateRequest):
    """Phases 1 and 2, stopping at the first disruptive intervention, as the
    nginx connector does. Phase 2 always runs: CRS decides there (949110)."""
    tx.process_connection(req.client_ip or "0.0.0.0", req.client_port,
                          req.server_ip or "0.0.0.0", req.server_port)
    tx.process_uri(req.uri, req.method, req.http_version or "1.1")
    intervention = tx.intervention()
    if intervention is not None and intervention.disruptive:
        return intervention
    add_header = tx.add_request_header
    for header in req.headers:
        add_header(header.name, header.value)
    tx.process_request_headers()
    intervention = tx.intervention()
    if intervention is not None and intervention.disruptive:
        return intervention
    if req.body:
        tx.append_request_body(req.body)
    tx.process_request_body()
    return tx.intervention()


UNDECODABLE = "(not shown: holds bytes that are not UTF-8)"


def _text(msg, field: str) -> str:
    """A rule message's text. The binding decodes std::string strictly, so a
    message or logdata quoting the request's own non-UTF-8 bytes raises: an
    attacker could otherwise turn a match into an engine failure (a pass
    under the open failure policy) just by adding a \\xff next to the attack."""
    try:
        return getattr(msg, field)
    except UnicodeDecodeError:
        return UNDECODABLE


def _discard(_message: str) -> None:
    pass
