"""conformance/report.json (every test, both modes) and summary.md (counts,
overrides by category, and every test where the two modes disagree)."""

from __future__ import annotations

import collections
import json
import os
import pathlib
import time

from conformance import runner


def _rel(path) -> str:
    """Paths in the committed report are relative to the repository."""
    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return str(path)


def write_report(report_path: pathlib.Path, summary_path: pathlib.Path, tests, results, info, overrides,
                 environ, tests_dir, response_keys: frozenset = frozenset()) -> dict:
    """response_keys: the tests that need the response phases (RESPONSE-*
    files and response rule ids), counted apart too."""
    modes = list(results)
    # Like with like: the stack's result against the test as written
    # (overrides aside) versus the engine's. Tests judged in one mode only
    # (a check the other cannot observe) are listed apart.
    disagreements, one_mode_only = [], []
    if "stack" in results and "engine" in results:
        for t in tests:
            s, e = results["stack"][t.key], results["engine"][t.key]
            s_result = s.raw_result if s.override is not None and s.raw_result else s.result
            if s_result == e.result:
                continue
            entry = {"test": t.key, "path": t.path, "stack": s_result, "engine": e.result}
            if runner.SKIP in (s_result, e.result):
                skipped = s if s_result == runner.SKIP else e
                entry["why"] = "; ".join(skipped.reasons)
                one_mode_only.append(entry)
            else:
                entry["why"] = runner.explain_disagreement(s, e)
                disagreements.append(entry)
    categories = collections.Counter(o.category for o in overrides.values())
    mode_summary = {}
    for m in modes:
        mode_summary[m] = {"counts": runner.counts(results[m]), **info.get(m, {})}
        if response_keys:
            mode_summary[m]["response_counts"] = runner.counts(
                {k: r for k, r in results[m].items() if k in response_keys})
        if m == "stack":
            mode_summary[m]["counts_without_overrides"] = runner.raw_counts(results[m])
            mode_summary[m]["overrides_used"] = sum(1 for r in results[m].values() if r.override)
            # Passed although HAProxy answered itself and the WAF never saw the
            # request: right for status checks (HAProxy's 400 is the expected
            # answer), vacuous for no_expect_ids. Listed so nobody is misled.
            mode_summary[m]["passed_without_waf_verdict"] = sorted(
                k for k, r in results[m].items()
                if r.result == runner.PASS and any("without a WAF verdict" in st.get("note", "") for st in r.stages))
            mode_summary[m]["stale_overrides"] = sorted(k for k, r in results[m].items()
                                                        if r.override and "stale" in r.override)
    doc = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tests_dir": _rel(tests_dir),
        "setup": {k: (_rel(v) if k in ("CRS_DIR", "CRS_SETUP") else v) for k, v in environ.items()},
        "how_counted": ("passed/failed/skipped per test (all stages). pass_rate = passed / (passed + failed). "
                        "Stack overrides count as skipped; counts_without_overrides judges them against "
                        "the tests' own expectations; response_counts are the tests that need the response "
                        "phases. Skipped: response-phase tests in a mode that does not inspect responses, "
                        "and checks a mode cannot "
                        "observe (engine: HTTP status and connection errors; stack: 'no rule matched' on a "
                        "request HAProxy answered itself, log text without a unique-id)."),
        "modes": mode_summary,
        "overrides": {"total": len(overrides), "by_category": dict(categories)},
        "disagreements": disagreements,
        "judged_in_one_mode_only": one_mode_only,
        "tests": [{"test": t.key, "path": t.path, **{m: results[m][t.key].to_json() for m in modes}}
                  for t in tests],
    }
    # One line per test keeps the committed report small and its diffs readable.
    tests_json = doc.pop("tests")
    head = json.dumps(doc, indent=1)[:-2]
    body = ",\n".join("  " + json.dumps(t, separators=(",", ":")) for t in tests_json)
    report_path.write_text(f'{head},\n "tests": [\n{body}\n ]\n}}\n')

    lines = []
    for m in modes:
        c = mode_summary[m]["counts"]
        lines.append(f"{m:6}: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped "
                     f"({c['pass_rate']}% of judged)")
    for m in modes:
        c = mode_summary[m].get("response_counts")
        if c:
            lines.append(f"{m:6} response-phase tests: {c['passed']} passed, {c['failed']} failed, "
                         f"{c['skipped']} skipped ({c['pass_rate']}% of judged)")
    if "stack" in results:
        c = mode_summary["stack"]["counts_without_overrides"]
        lines.append(f"stack without overrides: {c['passed']} passed, {c['failed']} failed, "
                     f"{c['skipped']} skipped ({c['pass_rate']}%)")
        lines.append(f"stack passes where HAProxy answered itself (no WAF verdict): "
                     f"{len(mode_summary['stack']['passed_without_waf_verdict'])}")
        lines.append(f"overrides: {len(overrides)} ({', '.join(f'{k} {v}' for k, v in categories.most_common())})")
    if "stack" in results and "engine" in results:
        lines.append(f"stack and engine disagree on {len(disagreements)} tests judged by both; "
                     f"{len(one_mode_only)} are judged by one mode only")
    md = ["# CRS conformance summary", "", f"Generated by `make conformance` at {doc['generated_at']}, "
          f"tests from `{doc['tests_dir']}`. Details: `report.json`.", "", "```", *lines, "```", "",
          doc["how_counted"], ""]
    failed = {m: [(k, r) for k, r in results[m].items() if r.result == runner.FAIL] for m in modes}
    for m in modes:
        md += [f"## Failed in mode `{m}` ({len(failed[m])})", ""]
        md += [f"- `{k}`: {'; '.join(r.reasons)}" for k, r in failed[m]] or ["none"]
        md.append("")
    if disagreements:
        md += ["## Where stack and engine disagree", "", "| test | stack | engine | why |", "|---|---|---|---|"]
        md += [f"| `{d['test']}` | {d['stack']} | {d['engine']} | {d['why'].replace('|', '/')} |"
               for d in disagreements]
        md.append("")
    if one_mode_only:
        md += ["## Judged in one mode only", "", "| test | stack | engine | why the other skips |", "|---|---|---|---|"]
        md += [f"| `{d['test']}` | {d['stack']} | {d['engine']} | {d['why'].replace('|', '/')} |"
               for d in one_mode_only]
        md.append("")
    summary_path.write_text("\n".join(md))
    return {"lines": lines}
