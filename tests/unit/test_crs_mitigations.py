"""rules/crs-mitigations.conf: loaded after CRS, for the rules the loaded CRS
version has, and every mitigated rule still catches its attacks when they
are written with long whitespace runs. Real libmodsecurity and CRS; no
timing here (scripts/costly_runs.py measures the cost)."""

from __future__ import annotations

import os
import urllib.parse

import pytest

from tests.unit.test_response_inspection import crs_dir
from wafapi import waf_pb2
from wafsvc.apps import Application, Applications
from wafsvc.config import REPO_RULES
from wafsvc.engine import Engine
from wafsvc.rules import CRS_MITIGATIONS, RuleSetSpec, RulesError, compose, crs_mitigations, crs_rule_files

DEBIAN_CRS = "/usr/share/modsecurity-crs"
BASE = str(REPO_RULES / "modsecurity.conf")

# Per mitigated rule: attacks the rule catches, with whitespace runs inside.
ATTACKS = {
    942190: ["1'   exec    master..xp_cmdshell 'dir'",
             "exec \t\n  master.dbo.x",
             "1' execute" + " " * 300 + "xp_cmdshell 'dir'",
             "1 union\t\t\tselect\t\t\t@@version"],
    941170: ['<a href="javascript:' + " " * 300 + 'alert(1)">x</a>',
             "<style>@   import \t\n 'http://evil.example/x.css';</style>",
             "<div style=\"-moz-binding    :   url(http://evil.example/x.xml#xss)\">"],
}


def crs_dirs() -> list[str]:
    dirs = [crs_dir()]
    if os.path.isdir(os.path.join(DEBIAN_CRS, "rules")):
        dirs.append(DEBIAN_CRS)
    return dirs


def mitigated_ids(path=CRS_MITIGATIONS) -> set[int]:
    return {int(line.split()[1]) for line in path.read_text().splitlines() if line.startswith("SecRule")}


def test_every_mitigated_rule_has_attacks_to_prove_it():
    assert mitigated_ids() == set(ATTACKS)


@pytest.fixture(scope="module", params=crs_dirs(), ids=os.path.basename)
def engine(request):
    spec = RuleSetSpec(base_conf=BASE, crs_dir=request.param, paranoia=1)
    return Engine(Applications({"site": Application("site", spec, min_inspected=0)}, "site"))


def form(value: str) -> waf_pb2.EvaluateRequest:
    body = b"a=" + urllib.parse.quote(value).encode()
    headers = [(b"host", b"shop.example"), (b"user-agent", b"Mozilla/5.0"), (b"accept", b"*/*"),
               (b"content-type", b"application/x-www-form-urlencoded"),
               (b"content-length", str(len(body)).encode())]
    return waf_pb2.EvaluateRequest(method="POST", uri=b"/form", client_ip="10.0.0.1", body=body,
                                   headers=[waf_pb2.Header(name=n, value=v) for n, v in headers],
                                   content_length=len(body))


@pytest.mark.parametrize("rule,attack", [(rule, attack) for rule, attacks in ATTACKS.items() for attack in attacks])
def test_mitigated_rule_still_catches_its_attack_with_whitespace_runs(engine, rule, attack):
    verdict = engine.evaluate(form(attack))
    assert rule in [m.id for m in verdict.matches]


def test_the_update_takes_effect(engine):
    """The engine ignores an update it cannot apply (unknown id, or written
    before the rule), so check that 942190 really compresses: its logdata
    shows the transformed value, one space where the request had four."""
    verdict = engine.evaluate(form("1 exec    master.dbo.x"))
    data = next(m.matched_data for m in verdict.matches if m.id == 942190)
    assert "exec master." in data and "exec    master" not in data


@pytest.mark.parametrize("directory", crs_dirs(), ids=os.path.basename)
def test_mitigations_load_after_the_crs_rules_for_crs_applications_only(directory):
    lines = compose(RuleSetSpec(base_conf=BASE, crs_dir=directory)).splitlines()
    update = lines.index('SecRuleUpdateActionById 942190 "t:compressWhitespace"')
    last_crs_rule = max(i for i, line in enumerate(lines) if "/rules/REQUEST-9" in line or "/rules/RESPONSE-9" in line
                        and "EXCLUSION" not in line)
    assert update > last_crs_rule
    plain = compose(RuleSetSpec(base_conf=BASE, rules_file=str(REPO_RULES / "block-localhost.conf")))
    assert "SecRuleUpdateActionById" not in plain


def test_lines_for_rules_the_crs_version_lacks_are_left_out(tmp_path):
    mitigations = tmp_path / "mitigations.conf"
    mitigations.write_text('# comment\n\nSecRuleUpdateActionById 942190 "t:compressWhitespace"\n'
                           'SecRuleUpdateActionById 999999 "t:compressWhitespace"\n')
    kept = crs_mitigations(crs_rule_files(crs_dir()), str(mitigations))
    assert kept == ['SecRuleUpdateActionById 942190 "t:compressWhitespace"']


def test_a_line_of_another_kind_is_refused(tmp_path):
    mitigations = tmp_path / "mitigations.conf"
    mitigations.write_text("SecRuleRemoveById 942190\n")
    with pytest.raises(RulesError, match=r"mitigations.conf:1: expected SecRuleUpdateActionById"):
        crs_mitigations(crs_rule_files(crs_dir()), str(mitigations))


def test_an_empty_path_loads_no_mitigations():
    spec = RuleSetSpec(base_conf=BASE, crs_dir=crs_dir(), crs_mitigations="")
    assert "SecRuleUpdateActionById" not in compose(spec)


def test_a_missing_mitigations_file_is_a_clear_error(tmp_path):
    with pytest.raises(RulesError, match="CRS mitigations .*missing.conf: No such file"):
        crs_mitigations(crs_rule_files(crs_dir()), str(tmp_path / "missing.conf"))
