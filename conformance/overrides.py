"""conformance/overrides.yaml: tests known to differ through the stack, each
with its reason, in the shape of the CRS project's per-engine overrides
(rule_id, test_ids, reason, optional output)."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import yaml

from conformance.ftw import FormatError, StageOutput, parse_output


@dataclass(frozen=True)
class Override:
    rule_id: int
    test_id: int
    reason: str
    category: str
    output: StageOutput | None  # what the stack does instead, when stated


def load_overrides(path: pathlib.Path, haproxy_version: str = "") -> dict[str, Override]:
    """Entries with `haproxy_versions` (version prefixes, e.g. "3.2") apply
    only when the stack's HAProxy is one of them: HAProxy's parser changes
    between versions, and an override must describe the binary under test."""
    doc = yaml.safe_load(pathlib.Path(path).read_text()) or {}
    found: dict[str, Override] = {}
    for n, entry in enumerate(doc.get("test_overrides") or []):
        where = f"{path} entry {n + 1}"
        reason = str(entry.get("reason") or "").strip()
        if not reason:
            raise FormatError(f"{where}: every override needs a reason")
        category = str(entry.get("category") or "").strip()
        if not category:
            raise FormatError(f"{where}: every override needs a category")
        output = parse_output(entry["output"], where) if entry.get("output") else None
        versions = [str(v) for v in entry.get("haproxy_versions") or []]
        if versions and not any(haproxy_version == v or haproxy_version.startswith(v + ".") for v in versions):
            continue
        for test_id in entry.get("test_ids") or []:
            key = f"{int(entry['rule_id'])}-{int(test_id)}"
            if key in found:
                raise FormatError(f"{where}: test {key} is overridden twice")
            found[key] = Override(int(entry["rule_id"]), int(test_id), reason, category, output)
    return found
