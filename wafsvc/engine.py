"""The ModSecurity engine: rule sets in, transactions and typed verdicts out.
No gRPC here.

One Engine lives in each worker process. libmodsecurity holds the GIL for
every call, so a worker evaluates one request at a time on one core; the
service scales by processes, never threads.

The engine API, for the gRPC service and other front ends (Envoy):

- ``Engine.evaluate(req: EvaluateRequest, verdict=None) -> Verdict``: a
  whole request, phases 1-2 and logging, in one call (the hot path).
- ``Engine.begin(app="", ignore_rule_ids=(), transaction_id="") ->
  Transaction``: a transaction to feed step by step: request headers, body
  chunks, end of request, then response headers, body chunks, end of
  response, close (wafsvc/transaction.py documents each step).
- ``Engine.reload(apps)``: new applications and rule sets (wafsvc/apps.py);
  transactions already begun finish on the rules they began with
  (``Engine.generation`` counts loads).
- ``Engine.applications()``: the ListApplications answer.

Each application has its rule set and its policies (wafsvc/phases.py
Policy); a request names one (``EvaluateRequest.application``), "" being
the default. Applications whose rule text is the same share one rule set.

Kept transactions and their handles live in wafsvc/responses.py (one store
per worker, wafsvc/held.py); verdicts are built in wafsvc/phases.py.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Mapping, Sequence

import libmodsecurity

from wafapi import waf_pb2
from wafsvc.apps import Application, Applications, from_specs
from wafsvc.errors import EvaluationFailed, engine_error
from wafsvc.limits import IgnoreListBudget
from wafsvc.phases import (TRUNCATED_BODY_MESSAGE, TRUNCATED_BODY_POLICIES, TRUNCATED_BODY_RULE_ID,  # noqa: F401
                           TRUNCATED_BODY_STATUS, TRUNCATED_RESPONSE_BODY_RULE_ID, UNDECODABLE, Policy)
from wafsvc.rules import RuleSetSpec, RulesError, compose, locate_error, request_body_limit
from wafsvc.transaction import Transaction

log = logging.getLogger("wafsvc.engine")

CONNECTOR = "modsec-spoa wafsvc"
DEFAULT_APP = ""


@dataclass(frozen=True)
class LoadedRules:
    """What one load produced: used for logs, metrics and health."""
    rule_counts: Mapping[str, int]      # rules per application
    loaded_at: float
    rule_sets: int = 0                  # distinct rule sets (applications with the same text share one)


def _load_rules_set(text: str, what: str, spec: RuleSetSpec | None = None) -> tuple[libmodsecurity.RulesSet, int]:
    rules_set = libmodsecurity.RulesSet()
    count = rules_set.load(text)
    if count < 0:
        error = rules_set.get_parser_error().strip()
        raise RulesError(f"{what}: {locate_error(spec, error) if spec is not None else error}")
    return rules_set, count


def policy_of(app: Application) -> Policy:
    return Policy(app.rules.mode == "block", app.truncated_body, app.min_inspected, app.truncated_response_body,
                  app.response_inspection, app.transaction_ttl_ms)


class Engine:
    """`apps`: the applications to serve (wafsvc/apps.py), or, as tools and
    tests pass them, rule-set specs keyed by name ("" = the default) with
    one `truncated_body` policy for all."""

    def __init__(self, apps: Applications | Mapping[str, RuleSetSpec], ignore_profiles: int = 32,
                 truncated_body: str = "pass",
                 preload: Sequence[tuple[str, tuple[int, ...]]] = (),
                 server_log: Callable[[str], None] | None = None,
                 ignore_budget: IgnoreListBudget | None = None) -> None:
        if truncated_body not in (*TRUNCATED_BODY_POLICIES, "allow"):
            raise ValueError(f"truncated_body must be pass or block, got {truncated_body!r}")
        self._truncated_body = truncated_body
        self._modsec = libmodsecurity.ModSecurity()
        self._modsec.set_connector_information(CONNECTOR)
        # Without a callback libmodsecurity prints every match to stderr;
        # matches reach us through get_rule_messages() instead. `server_log`
        # gets the lines a web server would write to its error log: they
        # include matches of rules marked noauditlog (CRS's 980170 report),
        # which get_rule_messages() leaves out.
        self._modsec.set_log_callback(server_log or _discard)
        self.apps: Applications | None = None
        self._rule_sets: dict[str, libmodsecurity.RulesSet] = {}   # application -> its rule set
        self._texts: dict[str, str] = {}                           # application -> composed rule text
        self._policies: dict[str, Policy] = {}
        # Ignore lists: (rule text, ids) -> rule set, so applications that
        # share a rule set share these too.
        self._profiles: OrderedDict[tuple[str, tuple[int, ...]], libmodsecurity.RulesSet] = OrderedDict()
        self._max_profiles = ignore_profiles
        self._preload = tuple(preload)
        self._preloaded: set[tuple[str, tuple[int, ...]]] = set()
        # Lists that are not preloaded are compiled on demand (~70 ms with CRS,
        # on the event loop) only within this budget; None: no limit (in-process use).
        self._ignore_budget = ignore_budget
        self.generation = 0  # successful loads so far; a transaction remembers its own
        # Reload outcomes (SIGHUP), read by logs and metrics.
        self.reload_successes = 0
        self.reload_failures = 0
        self.last_reload_error = ""
        self.loaded = self.load(apps)

    def _applications(self, apps: Applications | Mapping[str, RuleSetSpec]) -> Applications:
        if not isinstance(apps, Applications):
            apps = from_specs(apps, self._truncated_body)
        if self._preload:
            apps = replace(apps, extra_preload=apps.extra_preload + self._preload)
        return apps

    def load(self, apps: Applications | Mapping[str, RuleSetSpec]) -> LoadedRules:
        """Parse every application's rule set, then swap them in together.

        Applications whose composed rule text is the same share one rule
        set (and its ignore lists): they may differ by any policy kept
        outside the text, not by mode or rules. A parse error raises
        RulesError and leaves the rules in service untouched, so a bad
        reload never weakens protection.
        """
        apps = self._applications(apps)
        by_text: dict[str, tuple[libmodsecurity.RulesSet, int]] = {}
        by_spec: dict[RuleSetSpec, str] = {}    # many applications often have the very same spec
        texts, counts = {}, {}
        for name, app in apps.apps.items():
            text = by_spec.get(app.rules)
            if text is None:
                text = by_spec[app.rules] = compose(app.rules)
            texts[name] = text
            if text not in by_text:
                by_text[text] = _load_rules_set(text, _what(app), app.rules)
            counts[name] = by_text[text][1]
        # Known ignore lists are built here, not on their first request: a
        # CRS rule set takes 50-90 ms to parse, too long inside a verdict's
        # deadline on a busy machine. Built before fork, workers share them.
        profiles: OrderedDict = OrderedDict()
        for name, ids in apps.preload():
            app = apps.apps.get(name)
            if app is None:
                raise RulesError(f"ignore list {ids}: no application named {name!r}")
            key = (texts[name], ids)
            if key not in profiles:
                profiles[key], _ = _load_rules_set(compose(app.rules, ids), f"{_what(app)}, ignore list {ids}")
        self.apps, self._texts, self._profiles = apps, texts, profiles
        # A preloaded list pushed out of the cache is built again without the budget.
        self._preloaded = set(apps.preload())
        self._rule_sets = {name: by_text[text][0] for name, text in texts.items()}
        self._policies = {name: policy_of(app) for name, app in apps.apps.items()}
        self.generation += 1
        self.loaded = LoadedRules(counts, time.time(), len(by_text))
        return self.loaded

    @property
    def loaded_at(self) -> float:
        return self.loaded.loaded_at

    def reload(self, apps: Applications | Mapping[str, RuleSetSpec]) -> LoadedRules:
        """load(), counted: a failure keeps the old rules and is remembered."""
        try:
            loaded = self.load(apps)
        except RulesError as exc:
            self.reload_failures += 1
            self.last_reload_error = str(exc)
            raise
        self.reload_successes += 1
        self.last_reload_error = ""
        return loaded

    def resolve(self, name: str) -> str:
        """The configured application that judges a request naming `name`;
        raises EvaluationFailed (NOT_FOUND, UNKNOWN_APPLICATION) when
        unknown names are refused."""
        app = self.apps.resolve(name)
        if app is None:
            known = ", ".join(repr(n) for n in self.apps.apps)
            raise EvaluationFailed("NOT_FOUND", f"unknown application {name!r}; configured: {known}",
                                   waf_pb2.UNKNOWN_APPLICATION)
        return app.name

    def _rules_for(self, app: str, ignore_ids: Iterable[int]) -> libmodsecurity.RulesSet:
        base = self._rule_sets[app]
        ids = tuple(sorted(set(ignore_ids)))
        if not ids:
            return base
        # Ignored ids come from per-frontend HAProxy settings, so there are few
        # distinct lists. Each gets its own rule set with SecRuleRemoveById: the
        # removal cannot leak into other requests, and costs nothing per request.
        key = (self._texts[app], ids)
        profile = self._profiles.get(key)
        if profile is None:
            if 0 in ids:
                raise EvaluationFailed("INVALID_ARGUMENT", "rule id 0 is not a valid rule id",
                                       waf_pb2.IGNORE_LIST_REFUSED)
            if (self._ignore_budget is not None and (app, ids) not in self._preloaded
                    and not self._ignore_budget.take()):
                raise EvaluationFailed("RESOURCE_EXHAUSTED", f"ignore list {ids} is not preloaded "
                                       "(WAF_IGNORE_PRELOAD) and this worker's budget of new lists "
                                       "(WAF_IGNORE_NEW_LISTS_PER_MIN) is spent", waf_pb2.IGNORE_LIST_REFUSED)
            try:
                profile, _ = _load_rules_set(compose(self.apps.apps[app].rules, ids), f"ignore list {ids}")
            except RulesError as exc:
                raise EvaluationFailed("INVALID_ARGUMENT", str(exc), waf_pb2.IGNORE_LIST_REFUSED) from None
            self._profiles[key] = profile
            if len(self._profiles) > self._max_profiles:
                self._profiles.popitem(last=False)
            log.info("built rule set for app %r without rules %s", app, " ".join(map(str, ids)))
        else:
            self._profiles.move_to_end(key)
        return profile

    def begin(self, app: str = DEFAULT_APP, ignore_rule_ids: Iterable[int] = (),
              transaction_id: str = "") -> Transaction:
        """A new transaction on the application's rule set (minus the
        ignored rule ids), to be fed step by step. Raises EvaluationFailed
        (UNKNOWN_APPLICATION, IGNORE_LIST_REFUSED, ENGINE_ERROR)."""
        name = self.resolve(app)
        rules = self._rules_for(name, ignore_rule_ids)
        try:
            return Transaction(self._modsec, rules, self._policies[name], transaction_id, name, self.generation)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise engine_error(exc) from None

    def evaluate(self, req: waf_pb2.EvaluateRequest,
                 verdict: waf_pb2.Verdict | None = None) -> waf_pb2.Verdict:
        """A whole request: phases 1-2 and logging. Fills `verdict` (a fresh
        one by default) so that a batch can evaluate straight into its
        response message without a copy."""
        return self.begin(req.application, req.ignore_rule_ids, req.transaction_id).run_request(req, verdict)

    def applications(self) -> waf_pb2.ListApplicationsResponse:
        """What ListApplications answers: every application and its policies."""
        apps = self.apps
        reply = waf_pb2.ListApplicationsResponse(unknown_application=apps.unknown)
        preloaded: dict[str, list[str]] = {}
        for name, ids in apps.preload():
            preloaded.setdefault(name, []).append(" ".join(map(str, ids)))
        for name, app in apps.apps.items():
            reply.applications.add(
                name=name, is_default=name == apps.default, mode=app.mode, failure_policy=app.failure_policy,
                truncated_body=app.truncated_body, response_inspection=app.response_inspection,
                transaction_ttl_ms=app.transaction_ttl_ms, response_miss_policy=app.response_miss_policy,
                rules=self.loaded.rule_counts[name], preloaded_ignore_lists=preloaded.get(name, []),
                request_body_limit=request_body_limit(app.rules), truncated_response_body=app.truncated_response_body,
                min_inspected_body=app.min_inspected)
        return reply


def _what(app: Application) -> str:
    return f"application {app.name!r}" + (f" ({app.origin})" if app.origin and app.origin != "environment" else "")


def _discard(_message: str) -> None:
    pass
