"""Settings tables, rule-set composition and the configuration reference."""

from __future__ import annotations

import pathlib

import pytest

from common.__main__ import DOCUMENT, document
from common.options import ConfigError
from gateway.config import GatewayConfig
from wafsvc.config import WafConfig
from wafsvc.rules import RuleSetSpec, RulesError, compose, crs_rule_files

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_configuration_reference_is_current():
    """docs/configuration.md is generated: `python -m common --write`."""
    assert DOCUMENT == ROOT / "docs" / "configuration.md"
    assert DOCUMENT.read_text() == document()


def test_flags_beat_environment_which_beats_defaults():
    env = {"RULES": str(ROOT / "rules/block-localhost.conf"), "PARANOIA": "3", "MODE": "detect"}
    config = WafConfig.from_args(["--paranoia", "2"], env)
    assert (config.paranoia, config.mode, config.rules) == (2, "detect", env["RULES"])


@pytest.mark.parametrize("argv,env,message", [
    ([], {}, "no rules configured"),
    (["--rules", "/nonexistent.conf"], {}, "does not exist"),
    (["--rules", "rules/block-localhost.conf", "--paranoia", "5"], {}, "PARANOIA must be 1 to 4"),
    (["--rules", "rules/block-localhost.conf"], {"WAF_WORKERS": "two"}, "WAF_WORKERS"),
    (["--rules", "rules/block-localhost.conf", "--listen", "nowhere"], {}, "WAF_LISTEN"),
    (["--rules", "rules/block-localhost.conf"], {"WAF_APPS": "api"}, "NAME=RULES_FILE"),
])
def test_bad_wafsvc_settings_fail_with_a_clear_message(argv, env, message, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match=message):
        WafConfig.from_args(argv, env)


@pytest.mark.parametrize("env,message", [
    ({"GATEWAY_DEADLINE_MS": "0"}, "GATEWAY_DEADLINE_MS"),
    ({"GATEWAY_LISTEN": "12345"}, "GATEWAY_LISTEN"),
    ({"GATEWAY_MAX_FRAME_SIZE": "100"}, "at least 256"),
])
def test_bad_gateway_settings_fail_with_a_clear_message(env, message):
    with pytest.raises(ConfigError, match=message):
        GatewayConfig.from_args([], env)


def test_invalid_choice_is_rejected():
    with pytest.raises(ConfigError, match="closed, open"):
        GatewayConfig.from_args([], {"GATEWAY_FAILURE_POLICY": "maybe"})


def _crs(tmp_path: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    (tmp_path / "rules").mkdir()
    (tmp_path / "crs-setup.conf.example").write_text("# setup\n")
    for name, text in files.items():
        (tmp_path / "rules" / name).write_text(text)
    return tmp_path


def test_compose_orders_base_crs_rules_removals_then_mode(tmp_path):
    crs = _crs(tmp_path, {"REQUEST-901-INITIALIZATION.conf": "", "REQUEST-949-BLOCKING-EVALUATION.conf": ""})
    text = compose(RuleSetSpec(base_conf="/base.conf", crs_dir=str(crs), paranoia=3,
                               rules_file="/mine.conf", mode="detect"), removed_ids=[942100, 920350, 942100])
    lines = text.splitlines()
    assert lines[0] == 'Include "/base.conf"'
    assert "setvar:tx.blocking_paranoia_level=3" in lines[1] and "setvar:tx.paranoia_level=3" in lines[1]
    assert lines[2].endswith('crs-setup.conf.example"')
    assert [l for l in lines if "REQUEST-9" in l] == [
        f'Include "{crs}/rules/REQUEST-901-INITIALIZATION.conf"',
        f'Include "{crs}/rules/REQUEST-949-BLOCKING-EVALUATION.conf"']
    assert lines[-3:] == ['Include "/mine.conf"', "SecRuleRemoveById 920350 942100", "SecRuleEngine DetectionOnly"]


def test_crs_files_needing_geoip_are_skipped(tmp_path):
    crs = _crs(tmp_path, {"REQUEST-910-IP-REPUTATION.conf": 'SecRule REMOTE_ADDR "@geoLookup" "id:1"',
                          "REQUEST-920-PROTOCOL-ENFORCEMENT.conf": ""})
    assert [pathlib.Path(p).name for p in crs_rule_files(str(crs))] == ["REQUEST-920-PROTOCOL-ENFORCEMENT.conf"]


def test_crs_dir_without_rules_is_an_error(tmp_path):
    with pytest.raises(RulesError, match="no rules"):
        crs_rule_files(str(tmp_path))


def test_ignore_preload_lists_parse_and_validate(monkeypatch):
    monkeypatch.chdir(ROOT)
    env = {"RULES": "rules/block-localhost.conf"}
    config = WafConfig.from_args(["--ignore-preload", "942100; 920350,942100 ;"], env)
    assert config.ignore_preload == (("", (942100,)), ("", (920350, 942100)))
    with pytest.raises(ConfigError, match="rule ids"):
        WafConfig.from_args(["--ignore-preload", "942100 abc"], env)
    with pytest.raises(ConfigError, match="no rule set named 'api'"):
        WafConfig.from_args(["--ignore-preload", "api:942100"], env)


def test_every_deployment_preloads_the_ignore_lists_haproxy_cfg_sets():
    import yaml
    from stack.processes import ignore_lists_in
    lists = ignore_lists_in(ROOT / "deploy/haproxy/haproxy.cfg")
    assert lists  # the shipped config demonstrates txn.ignorerules
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["wafsvc"]["environment"]["WAF_IGNORE_PRELOAD"] == lists
    k8s = [doc for doc in yaml.safe_load_all((ROOT / "deploy/k8s/wafsvc.yaml").read_text())
           if doc and doc.get("kind") == "Deployment"][0]
    env = {e["name"]: e.get("value") for e in k8s["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["WAF_IGNORE_PRELOAD"] == lists
