"""Builds the SecLanguage text of a rule set from the service settings.

Everything goes into ONE load() call: libmodsecurity keeps the engine
settings of the first load only, so a second load could not change the mode.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from typing import Iterable

log = logging.getLogger("wafsvc.rules")

DEBIAN_CRS_SETUP = "/etc/modsecurity/crs/crs-setup.conf"
# Internal rule ids live in ModSecurity's "local use" range (1-99,999).
PARANOIA_RULE_ID = 99001


class RulesError(Exception):
    """A rule set failed to load; the message carries the parser's error."""


@dataclass(frozen=True)
class RuleSetSpec:
    base_conf: str
    mode: str = "block"
    crs_dir: str = ""
    crs_setup: str = ""
    paranoia: int = 1
    rules_file: str = ""
    extra_directives: str = ""
    audit_log: str = ""
    audit_log_parts: str = "ABHZ"


def find_crs_setup(crs_dir: str, explicit: str = "") -> str:
    candidates = [explicit] if explicit else [
        os.path.join(crs_dir, "crs-setup.conf"),
        os.path.join(crs_dir, "crs-setup.conf.example"),
        DEBIAN_CRS_SETUP,
    ]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise RulesError(f"no CRS setup file found (tried {', '.join(candidates)}); set CRS_SETUP")


def crs_rule_files(crs_dir: str) -> list[str]:
    """rules/*.conf in order, minus files this engine cannot parse.

    The wheel's libmodsecurity has no GeoIP, so CRS 3.x's IP reputation file
    (rule 910100, @geoLookup) would fail the whole load. Skipping it keeps the
    installed files untouched; that file only works with a GeoIP database.
    """
    files = sorted(glob.glob(os.path.join(crs_dir, "rules", "*.conf")))
    if not files:
        raise RulesError(f"CRS_DIR {crs_dir}: no rules/*.conf found")
    usable = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as fh:
            if "@geoLookup" in fh.read():
                log.warning("skipping %s: it needs @geoLookup, which this engine lacks", path)
                continue
        usable.append(path)
    return usable


def _include(path: str) -> str:
    return f'Include "{os.path.abspath(path)}"'


def _crs_lines(spec: RuleSetSpec) -> Iterable[str]:
    setup = find_crs_setup(spec.crs_dir, spec.crs_setup)
    # Set before crs-setup and the 901 rules, which only default it when unset.
    # tx.paranoia_level is CRS 3's name, tx.blocking_paranoia_level CRS 4's.
    yield (f'SecAction "id:{PARANOIA_RULE_ID},phase:1,pass,nolog,'
           f'setvar:tx.paranoia_level={spec.paranoia},'
           f'setvar:tx.blocking_paranoia_level={spec.paranoia}"')
    yield _include(setup)
    setup_dir = os.path.dirname(os.path.abspath(setup))
    before = os.path.join(setup_dir, "REQUEST-900-EXCLUSION-RULES-BEFORE-CRS.conf")
    after = os.path.join(setup_dir, "RESPONSE-999-EXCLUSION-RULES-AFTER-CRS.conf")
    if os.path.isfile(before):
        yield _include(before)
    yield from (_include(path) for path in crs_rule_files(spec.crs_dir))
    if os.path.isfile(after):
        yield _include(after)


def _audit_lines(spec: RuleSetSpec) -> Iterable[str]:
    """The audit log, set in the first (only) load, where engine settings
    count. Serial: every process appends to one file; libmodsecurity takes
    an fcntl lock around each entry and flushes it, so entries from several
    workers never interleave and none waits in a buffer at SIGTERM. The file
    is opened once per path and never reopened, even by a reload: rotate
    with copytruncate (it is opened O_APPEND)."""
    if not spec.audit_log:
        return
    yield "SecAuditEngine RelevantOnly"
    yield "SecAuditLogFormat JSON"
    yield "SecAuditLogType Serial"
    yield f"SecAuditLogParts {spec.audit_log_parts}"
    yield f'SecAuditLog "{os.path.abspath(spec.audit_log)}"'


def compose(spec: RuleSetSpec, removed_ids: Iterable[int] = ()) -> str:
    # Audit settings right after the base config (which turns it off), before
    # the rules, so that WAF_DIRECTIVES can still override them.
    lines = [_include(spec.base_conf), *_audit_lines(spec)]
    if spec.crs_dir:
        lines.extend(_crs_lines(spec))
    if spec.rules_file:
        lines.append(_include(spec.rules_file))
    if spec.extra_directives:
        lines.append(spec.extra_directives)
    ids = sorted(set(removed_ids))
    if ids:
        lines.append("SecRuleRemoveById " + " ".join(map(str, ids)))
    # Last, so that MODE wins over any SecRuleEngine in the included files.
    lines.append("SecRuleEngine " + ("On" if spec.mode == "block" else "DetectionOnly"))
    return "\n".join(lines) + "\n"
