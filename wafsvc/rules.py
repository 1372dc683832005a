"""Builds the SecLanguage text of a rule set from the service settings.

Everything goes into ONE load() call: libmodsecurity keeps the engine
settings of the first load only, so a second load could not change the mode.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import pathlib
import re
from dataclasses import dataclass
from typing import Iterable

log = logging.getLogger("wafsvc.rules")

DEBIAN_CRS_SETUP = "/etc/modsecurity/crs/crs-setup.conf"
# Internal rule ids live in ModSecurity's "local use" range (1-99,999).
PARANOIA_RULE_ID = 99001
# Directives that make costly CRS rules cheap on long runs without losing
# detection (docs/SECURITY.md "Costly bodies"), loaded after the CRS rules.
CRS_MITIGATIONS = pathlib.Path(__file__).resolve().parent.parent / "rules" / "crs-mitigations.conf"


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
    # More rule files, loaded after rules_file (an application's `files`).
    rules_files: tuple[str, ...] = ()
    # The engine's body limits (bytes); 0 keeps the base configuration's.
    request_body_limit: int = 0
    request_body_no_files_limit: int = 0
    response_body_limit: int = 0
    # Where extra_directives were written ("apps.yaml:14"), so that a parse
    # error in them names that file and line instead of the composed text's.
    directives_origin: tuple[str, int] = ("", 0)
    # Loaded after the CRS rules (CRS applications only); "" loads none, as
    # scripts/costly_runs.py does to measure the cost without them.
    crs_mitigations: str = str(CRS_MITIGATIONS)


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
        if _scan(path).needs_geoip:
            log.warning("skipping %s: it needs @geoLookup, which this engine lacks", path)
            continue
        usable.append(path)
    return usable


@dataclass(frozen=True)
class _RuleFile:
    needs_geoip: bool
    rule_ids: frozenset[int]


_RULE_ID = re.compile(r"\bid:(\d+)")


def _scan(path: str) -> _RuleFile:
    stat = os.stat(path)
    return _scan_version(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1024)
def _scan_version(path: str, mtime_ns: int, size: int) -> _RuleFile:
    """Read once per version of the file: many applications use one CRS."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    return _RuleFile("@geoLookup" in text, frozenset(int(i) for i in _RULE_ID.findall(text)))


_MITIGATION = re.compile(r'SecRuleUpdateActionById (\d+) "[^"]+"')


def crs_mitigations(rule_files: Iterable[str], path: str = str(CRS_MITIGATIONS)) -> list[str]:
    """The directives of `path` whose rule is in `rule_files`: CRS versions
    differ in their rules, and an update naming a missing rule would be
    silently ignored by the engine, so it is left out instead."""
    ids = frozenset().union(*(_scan(f).rule_ids for f in rule_files))
    kept = []
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise RulesError(f"CRS mitigations {path}: {exc.strerror}") from exc
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _MITIGATION.fullmatch(line)
        if m is None:
            raise RulesError(f"{path}:{number}: expected SecRuleUpdateActionById <id> \"<actions>\", got {line!r}")
        if int(m.group(1)) in ids:
            kept.append(line)
    return kept


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
    rule_files = crs_rule_files(spec.crs_dir)
    yield from (_include(path) for path in rule_files)
    # Before the operator's after-CRS file, which keeps the last word.
    if spec.crs_mitigations:
        yield from crs_mitigations(rule_files, spec.crs_mitigations)
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


def _limit_lines(spec: RuleSetSpec) -> Iterable[str]:
    for directive, value in (("SecRequestBodyLimit", spec.request_body_limit),
                             ("SecRequestBodyNoFilesLimit", spec.request_body_no_files_limit),
                             ("SecResponseBodyLimit", spec.response_body_limit)):
        if value:
            yield f"{directive} {value}"


def _head(spec: RuleSetSpec) -> list[str]:
    """Every line before the inline directives."""
    # Audit settings and limits right after the base config (which sets
    # them), before the rules, so that the directives can still override them.
    lines = [_include(spec.base_conf), *_audit_lines(spec), *_limit_lines(spec)]
    if spec.crs_dir:
        lines.extend(_crs_lines(spec))
    lines.extend(_include(path) for path in (spec.rules_file, *spec.rules_files) if path)
    return lines


def compose(spec: RuleSetSpec, removed_ids: Iterable[int] = ()) -> str:
    lines = _head(spec)
    if spec.extra_directives:
        lines.append(spec.extra_directives)
    ids = sorted(set(removed_ids))
    if ids:
        lines.append("SecRuleRemoveById " + " ".join(map(str, ids)))
    # Last, so that MODE wins over any SecRuleEngine in the included files.
    lines.append("SecRuleEngine " + ("On" if spec.mode == "block" else "DetectionOnly"))
    return "\n".join(lines) + "\n"


_BODY_LIMIT = re.compile(r"^\s*SecRequestBodyLimit\s+(\d+)\s*$", re.M)


def request_body_limit(spec: RuleSetSpec) -> int:
    """The SecRequestBodyLimit in force: the spec's own, else the last one
    written in the base configuration (0 when it sets none)."""
    if spec.request_body_limit:
        return spec.request_body_limit
    try:
        with open(spec.base_conf, encoding="utf-8", errors="replace") as fh:
            found = _BODY_LIMIT.findall(fh.read())
    except OSError:
        return 0
    return int(found[-1]) if found else 0


_INLINE_ERROR = re.compile(r"File: <<reference missing or not informed>>\. Line: (\d+)\.")


def locate_error(spec: RuleSetSpec, message: str) -> str:
    """A parser error in the inline directives names the composed text's
    line; point it at the file and line the directives were written in."""
    m = _INLINE_ERROR.search(message)
    path, first_line = spec.directives_origin
    if m is None or not path or not spec.extra_directives:
        return message
    start = len(_head(spec)) + 1                 # composed line of the first directive
    offset = int(m.group(1)) - start
    if not 0 <= offset < spec.extra_directives.count("\n") + 1:
        return message
    return message[:m.start()] + f"File: {path}. Line: {first_line + offset}." + message[m.end():]
