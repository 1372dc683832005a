"""Runs a test list in one mode, concurrently, and classifies each test.

Which tests a mode can judge follows from the suite's layout and the
tests' own checks, never from test ids:
- RESPONSE-* rule files, and tests whose ids belong to response rules, need
  response inspection: skipped in a mode that does not inspect responses
  (its `inspects_responses` is False).
- checks a mode cannot observe are left out (see judge.py).
Overrides (stack only) come from overrides.yaml, each with its reason.
"""

from __future__ import annotations

import glob
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from conformance import rawhttp
from conformance.ftw import Test
from conformance.judge import FAIL, PASS, SKIP, Judgement, Observation, combine, judge

RESPONSE_REASON = "response phases are not inspected in this mode"


def response_rule_ids(crs_dir: str) -> set[int]:
    """Ids defined in CRS's RESPONSE-*.conf files."""
    ids: set[int] = set()
    for path in glob.glob(os.path.join(crs_dir, "rules", "RESPONSE-*.conf")):
        with open(path, encoding="utf-8", errors="replace") as fh:
            ids.update(int(m) for m in re.findall(r"\bid:(\d+)", fh.read()))
    return ids


def needs_response_phase(test: Test, response_ids: set[int]) -> bool:
    if test.rule_file.startswith("RESPONSE-"):
        return True
    return any(i in response_ids for s in test.stages for i in (*s.output.expect_ids, *s.output.no_expect_ids))


@dataclass
class TestResult:
    result: str
    reasons: list[str] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)
    raw_result: str | None = None       # against the test's own expectations, when overridden
    override: dict | None = None

    def to_json(self) -> dict:
        out = {"result": self.result, "stages": self.stages}
        if self.reasons:
            out["reasons"] = self.reasons
        if self.override is not None:
            out["override"] = self.override
            out["raw_result"] = self.raw_result
        return out


def _stage_record(seen: Observation) -> dict:
    rec = {"matched_ids": seen.matched_ids}
    if seen.status is not None:
        rec["status"] = seen.status
    if seen.error:
        rec["error"] = seen.error
    if seen.note:
        rec["note"] = seen.note
    return rec


def run_test(mode, test: Test, response_ids: set[int], overrides: dict) -> TestResult:
    if test.load_error:
        return TestResult(FAIL, [test.load_error])
    if not getattr(mode, "inspects_responses", False) and needs_response_phase(test, response_ids):
        return TestResult(SKIP, [RESPONSE_REASON])
    observations = [mode.observe(rawhttp.build_request(stage.input),
                                 needs_log=bool(stage.output.match_regex or stage.output.no_match_regex))
                    for stage in test.stages]
    verdict = combine([judge(s.output, o) for s, o in zip(test.stages, observations)])
    records = [_stage_record(o) for o in observations]
    override = overrides.get(test.key) if mode.name == "stack" else None
    if override is None:
        return TestResult(verdict.result, verdict.reasons, records)
    # Overridden: counted as skipped with its reason. When the override says
    # what the stack does instead, that is checked too, so an override can
    # never hide a change in behaviour.
    info = {"reason": override.reason, "category": override.category}
    result, reasons = SKIP, [f"override ({override.category}): {override.reason}"]
    if override.output is not None:
        alt = combine([judge(override.output, observations[-1])])
        info["documented_behaviour"] = alt.result
        if alt.result == FAIL:
            result, reasons = FAIL, ["override no longer describes the stack: " + "; ".join(alt.reasons)]
    if verdict.result == PASS:
        info["stale"] = "passes against its own expectations: remove this override"
    return TestResult(result, reasons, records, raw_result=verdict.result, override=info)


def run_mode(mode, tests: list[Test], response_ids: set[int], overrides: dict, jobs: int = 1,
             progress=None) -> dict[str, TestResult]:
    results: dict[str, TestResult] = {}

    def one(test: Test) -> tuple[str, TestResult]:
        try:
            return test.key, run_test(mode, test, response_ids, overrides)
        except Exception as exc:  # a runner bug must show up as a failure, not vanish
            return test.key, TestResult(FAIL, [f"runner error: {type(exc).__name__}: {exc}"])

    if jobs <= 1:
        for n, test in enumerate(tests, 1):
            key, res = one(test)
            results[key] = res
            if progress:
                progress(n, len(tests))
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for n, (key, res) in enumerate(pool.map(one, tests), 1):
                results[key] = res
                if progress:
                    progress(n, len(tests))
    return results


def counts(results: dict[str, TestResult]) -> dict[str, int]:
    c = {PASS: 0, FAIL: 0, SKIP: 0}
    for r in results.values():
        c[r.result] += 1
    judged = c[PASS] + c[FAIL]
    c["pass_rate"] = round(100.0 * c[PASS] / judged, 2) if judged else 0.0
    return c


def raw_counts(results: dict[str, TestResult]) -> dict[str, int]:
    """The same, judging overridden tests against their own expectations."""
    c = {PASS: 0, FAIL: 0, SKIP: 0}
    for r in results.values():
        c[r.raw_result if r.override is not None and r.raw_result else r.result] += 1
    judged = c[PASS] + c[FAIL]
    c["pass_rate"] = round(100.0 * c[PASS] / judged, 2) if judged else 0.0
    return c


def explain_disagreement(stack: TestResult, engine: TestResult) -> str:
    why = []
    for n, (s, e) in enumerate(zip(stack.stages, engine.stages), 1):
        only_engine = sorted(set(e["matched_ids"]) - set(s["matched_ids"]))
        only_stack = sorted(set(s["matched_ids"]) - set(e["matched_ids"]))
        prefix = f"stage {n}: " if len(stack.stages) > 1 else ""
        if s.get("note"):
            why.append(prefix + s["note"])
        if s.get("error"):
            why.append(prefix + f"stack: no response ({s['error']})")
        if only_engine:
            why.append(prefix + f"matched in-process only: {only_engine}")
        if only_stack:
            why.append(prefix + f"matched through the stack only: {only_stack}")
    if not why:
        why.append("same rule ids in both modes; the difference is in checks only one mode can judge "
                   "(status, connection error, log text) or in skipping")
    if stack.override:
        why.append(f"override ({stack.override['category']}): {stack.override['reason']}")
    return "; ".join(why)
