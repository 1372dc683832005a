"""Judging one stage: go-ftw's checks against what was observed. Pure logic.

Every check present in the test must hold (they are ANDed, as in go-ftw).
A mode that cannot observe something a test checks (the in-process engine
has no HTTP server, so no status; the stack has no verdict for a request
HAProxy answered itself)
does not guess: the check is left out and the reason is returned, and a test
with no check left is skipped with that reason, never passed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

PASS, FAIL, SKIP = "passed", "failed", "skipped"


@dataclass
class Observation:
    """What one mode saw for one request."""
    matched_ids: list[int] = field(default_factory=list)
    status: int | None = None        # None: no HTTP status in this mode
    error: str | None = None         # no response (closed, reset, timeout)
    log_text: str | None = None      # None: this mode has no log text
    note: str = ""
    reached_waf: bool = True         # False: HAProxy answered itself, no verdict


@dataclass
class Judgement:
    result: str
    reasons: list[str] = field(default_factory=list)
    unjudged: list[str] = field(default_factory=list)


def judge(output, seen: Observation) -> Judgement:
    problems: list[str] = []
    unjudged: list[str] = []
    judged = 0
    if seen.error is not None:
        if not output.expect_error:
            return Judgement(FAIL, [f"no response: {seen.error}"])
        judged += 1
    elif output.expect_error:
        if seen.status is None:
            unjudged.append("expect_error needs a real server")
        else:
            judged += 1
            problems.append(f"expected a connection error, got status {seen.status}")
    if output.status:
        if seen.status is None and seen.error is None:
            unjudged.append("status needs a real server")
        elif seen.error is None:
            judged += 1
            if seen.status not in output.status:
                problems.append(f"status {seen.status}, expected one of {list(output.status)}")
    ids = set(seen.matched_ids)
    if output.no_expect_ids and not output.expect_ids and not seen.reached_waf:
        # "No rule matched" would hold vacuously: the WAF never saw it.
        unjudged.append("no_expect_ids: the request never reached the WAF (HAProxy answered itself)")
    elif output.expect_ids or output.no_expect_ids:
        judged += 1
        missing = [i for i in output.expect_ids if i not in ids]
        unwanted = [i for i in output.no_expect_ids if i in ids]
        if missing:
            problems.append(f"expected ids not matched: {missing}")
        if unwanted:
            problems.append(f"ids matched that must not: {unwanted}")
    for regex, want in ((output.match_regex, True), (output.no_match_regex, False)):
        if not regex:
            continue
        if seen.log_text is None:
            unjudged.append("log regex needs log text, which this request has none of")
            continue
        judged += 1
        found = re.search(regex, seen.log_text) is not None
        if found != want:
            problems.append(f"log {'does not match' if want else 'matches'} {regex!r}")
    if problems:
        return Judgement(FAIL, problems, unjudged)
    if judged == 0:
        return Judgement(SKIP, ["nothing this mode can observe: " + "; ".join(unjudged or ["no checks"])], unjudged)
    return Judgement(PASS, [], unjudged)


def combine(stages: list[Judgement]) -> Judgement:
    """A multi-stage test passes when every judged stage passes."""
    failed = [j for j in stages if j.result == FAIL]
    if failed:
        return Judgement(FAIL, [r for j in failed for r in j.reasons])
    if all(j.result == SKIP for j in stages):
        return Judgement(SKIP, [r for j in stages for r in j.reasons])
    return Judgement(PASS, [], [u for j in stages for u in j.unjudged])
