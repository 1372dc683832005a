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
- ``Engine.reload(specs)``: new rule sets; transactions already begun
  finish on the rules they began with (``Engine.generation`` counts loads).

Kept transactions and their handles live in wafsvc/responses.py (one store
per worker, wafsvc/held.py); verdicts are built in wafsvc/phases.py.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import libmodsecurity

from wafapi import waf_pb2
from wafsvc.errors import EvaluationFailed, engine_error
from wafsvc.limits import IgnoreListBudget
from wafsvc.phases import (TRUNCATED_BODY_MESSAGE, TRUNCATED_BODY_POLICIES, TRUNCATED_BODY_RULE_ID,  # noqa: F401
                           TRUNCATED_BODY_STATUS, TRUNCATED_RESPONSE_BODY_RULE_ID, UNDECODABLE, Policy)
from wafsvc.rules import RuleSetSpec, RulesError, compose
from wafsvc.transaction import Transaction

log = logging.getLogger("wafsvc.engine")

CONNECTOR = "modsec-spoa wafsvc"
DEFAULT_APP = ""


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
                 preload: Sequence[tuple[str, tuple[int, ...]]] = (),
                 server_log: Callable[[str], None] | None = None,
                 ignore_budget: IgnoreListBudget | None = None) -> None:
        if truncated_body not in TRUNCATED_BODY_POLICIES:
            raise ValueError(f"truncated_body must be block or allow, got {truncated_body!r}")
        self.truncated_body = truncated_body
        self._modsec = libmodsecurity.ModSecurity()
        self._modsec.set_connector_information(CONNECTOR)
        # Without a callback libmodsecurity prints every match to stderr;
        # matches reach us through get_rule_messages() instead. `server_log`
        # gets the lines a web server would write to its error log: they
        # include matches of rules marked noauditlog (CRS's 980170 report),
        # which get_rule_messages() leaves out.
        self._modsec.set_log_callback(server_log or _discard)
        self._specs: Mapping[str, RuleSetSpec] = {}
        self._rule_sets: dict[str, libmodsecurity.RulesSet] = {}
        self._policies: dict[str, Policy] = {}
        self._profiles: OrderedDict[tuple[str, tuple[int, ...]], libmodsecurity.RulesSet] = OrderedDict()
        self._max_profiles = ignore_profiles
        self._preload = tuple(preload)
        # Lists that are not preloaded are compiled on demand (~70 ms with CRS,
        # on the event loop) only within this budget; None: no limit (in-process use).
        self._ignore_budget = ignore_budget
        self.generation = 0  # successful loads so far; a transaction remembers its own
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
        self._policies = {app: Policy(spec.mode == "block", self.truncated_body) for app, spec in specs.items()}
        self.generation += 1
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
            raise EvaluationFailed("NOT_FOUND", f"unknown application {app!r}; configured: {known}",
                                   waf_pb2.UNKNOWN_APPLICATION) from None
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
                raise EvaluationFailed("INVALID_ARGUMENT", "rule id 0 is not a valid rule id",
                                       waf_pb2.IGNORE_LIST_REFUSED)
            if (self._ignore_budget is not None and (app, ids) not in self._preload
                    and not self._ignore_budget.take()):
                raise EvaluationFailed("RESOURCE_EXHAUSTED", f"ignore list {ids} is not preloaded "
                                       "(WAF_IGNORE_PRELOAD) and this worker's budget of new lists "
                                       "(WAF_IGNORE_NEW_LISTS_PER_MIN) is spent", waf_pb2.IGNORE_LIST_REFUSED)
            try:
                profile, _ = _load_rules_set(compose(self._specs[app], ids), f"ignore list {ids}")
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
        rules = self._rules_for(app, ignore_rule_ids)
        try:
            return Transaction(self._modsec, rules, self._policies[app], transaction_id, app, self.generation)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise engine_error(exc) from None

    def evaluate(self, req: waf_pb2.EvaluateRequest,
                 verdict: waf_pb2.Verdict | None = None) -> waf_pb2.Verdict:
        """A whole request: phases 1-2 and logging. Fills `verdict` (a fresh
        one by default) so that a batch can evaluate straight into its
        response message without a copy."""
        return self.begin(req.application, req.ignore_rule_ids, req.transaction_id).run_request(req, verdict)


def _discard(_message: str) -> None:
    pass
