"""Applications: the YAML file, the environment's defaults, the engine that
serves several of them (shared rule sets, unknown names, ListApplications)
and validation messages that name a file and a line."""

from __future__ import annotations

import pathlib
import textwrap

import pytest

from common.options import ConfigError
from wafapi import waf_pb2
from wafsvc import appfile
from wafsvc.__main__ import main as wafsvc_main
from wafsvc.apps import Application, Applications, from_config, template
from wafsvc.config import REPO_RULES, WafConfig
from wafsvc.engine import Engine
from wafsvc.errors import EvaluationFailed
from wafsvc.rules import RuleSetSpec, RulesError

ROOT = pathlib.Path(__file__).resolve().parents[2]
BASE = str(REPO_RULES / "modsecurity.conf")
MARKER = 'SecRule ARGS "@contains attack" "id:1001,phase:2,deny,status:403,log,msg:\'attack marker\'"'


@pytest.fixture()
def rules(tmp_path) -> pathlib.Path:
    path = tmp_path / "site.conf"
    path.write_text(MARKER + "\n")
    return path


def env_config(tmp_path, text: str | None = None, **env) -> WafConfig:
    environ = {k: str(v) for k, v in env.items()}
    if text is not None:
        path = tmp_path / "apps.yaml"
        path.write_text(textwrap.dedent(text))
        environ["WAF_CONFIG"] = str(path)
    return WafConfig.from_args([], environ)


def read(tmp_path, text: str, **env) -> Applications:
    return from_config(env_config(tmp_path, text, **env))


TWO = """\
    default_application: shop
    defaults:
      rules:
        files: [site.conf]
    applications:
      - name: shop
        mode: block
      - name: blog
        mode: detect
        failure_policy: open
        request_body: {truncated: block, min_inspected: 0}
        response_inspection: {enabled: false, transaction_ttl_ms: 5000, miss_policy: block}
        ignore_lists: ["1001", [1001, 1002]]
"""


# -- the file ------------------------------------------------------------------

def test_a_file_declares_applications_over_the_environments_defaults(tmp_path, rules):
    apps = read(tmp_path, TWO, PARANOIA=3, WAF_TRUNCATED_RESPONSE_BODY="block")
    assert list(apps.apps) == ["shop", "blog"] and apps.default == "shop" and apps.unknown == "default"
    shop, blog = apps.apps["shop"], apps.apps["blog"]
    assert shop.rules.rules_files == (str(rules),) and shop.rules.paranoia == 3      # file, then environment
    assert (shop.mode, blog.mode) == ("block", "detect")
    assert shop.truncated_body == "pass" and shop.min_inspected == 16384 and shop.failure_policy == ""
    assert blog.truncated_body == "block" and blog.min_inspected == 0 and blog.failure_policy == "open"
    assert shop.truncated_response_body == blog.truncated_response_body == "block"   # WAF_TRUNCATED_RESPONSE_BODY
    assert not blog.response_inspection and blog.transaction_ttl_ms == 5000 and blog.response_miss_policy == "block"
    assert shop.transaction_ttl_ms == 35000                                           # WAF_TRANSACTION_TTL_MS
    assert blog.ignore_lists == ((1001,), (1001, 1002))
    assert blog.origin == f"{tmp_path / 'apps.yaml'}:8"


@pytest.mark.parametrize("text,line,message", [
    ("applications:\n  - name: a\n    mdoe: block\n", 3, "unknown key 'mdoe' (did you mean 'mode'?)"),
    ("applications:\n  - name: a\n    mode: blocking\n", 3, "mode must be block or detect, got 'blocking'"),
    ("applications:\n  - name: a\n    rules: {paranoia: 5}\n", 3, "rules.paranoia must be 1 to 4"),
    ("applications:\n  - name: a\n  - name: a\n", 3, "application 'a' is declared twice"),
    ("applications:\n  - name: a\n  - name: b\n", 1, "name the default one with default_application"),
    ("default_application: c\napplications:\n  - name: a\n", 1, "default_application 'c' is not among"),
    ("applications:\n  - mode: block\n", 2, "every application needs a name"),
    ("applications:\n  - name: 'a b'\n", 2, "application names are letters"),
    ("applications:\n  - name: a\n    rules: {files: [nowhere.conf]}\n", 3, "nowhere.conf does not exist"),
    ("applications:\n  - name: a\n    request_body: {truncated: allow}\n", 3, "must be pass or block"),
    ("applications:\n  - name: a\n    ignore_lists: ['942100 x']\n", 3, "rule ids are whole numbers"),
    ("applications:\n  - name: a\n    mode: block\n    mode: detect\n", 4, "'mode' is given twice"),
    ("unknown_application: maybe\napplications:\n  - name: a\n", 1, "must be default or refuse"),
    ("applications: [\n", 2, "not valid YAML"),
    ("apps:\n  - name: a\n", 1, "unknown key 'apps'"),
    ("applications:\n  - name: a\n    rules: {crs_dir: '', files: []}\n", 2, "has no rules"),
])
def test_every_mistake_names_its_file_and_line(tmp_path, rules, text, line, message):
    with pytest.raises(appfile.AppFileError) as caught:
        read(tmp_path, text, RULES=rules)
    assert str(caught.value).startswith(f"{tmp_path / 'apps.yaml'}:{line}: "), str(caught.value)
    assert message in str(caught.value)


def test_the_environment_alone_describes_one_default_application_plus_waf_apps(tmp_path, rules):
    apps = read(tmp_path, None, RULES=rules, WAF_APPS=f"api={rules}", MODE="detect")
    assert list(apps.apps) == ["default", "api"] and apps.default == "default"
    assert apps.apps["api"].rules.rules_file == str(rules) and apps.apps["api"].mode == "detect"
    only_apps = read(tmp_path, None, WAF_APPS=f"api={rules}")
    assert only_apps.default == "api"


def test_waf_apps_and_a_file_are_not_mixed(tmp_path, rules):
    with pytest.raises(ConfigError, match="WAF_APPS and WAF_CONFIG"):
        env_config(tmp_path, TWO, WAF_APPS=f"api={rules}")


def test_resolve_follows_the_unknown_application_setting(tmp_path, rules):
    apps = read(tmp_path, TWO)
    assert apps.resolve("").name == "shop" and apps.resolve("blog").name == "blog"
    assert apps.resolve("nope").name == "shop"
    refusing = read(tmp_path, "unknown_application: refuse\n" + textwrap.dedent(TWO))
    assert refusing.resolve("nope") is None and refusing.resolve("").name == "shop"


# -- the engine ------------------------------------------------------------------

def request(app: str, query: bytes = b"") -> waf_pb2.EvaluateRequest:
    return waf_pb2.EvaluateRequest(method="GET", uri=b"/?q=" + query, client_ip="10.0.0.1", application=app)


def test_applications_share_a_rule_set_when_their_rule_text_is_the_same(tmp_path, rules):
    text = textwrap.dedent(TWO) + "  - name: shop-eu\n    mode: block\n    failure_policy: closed\n"
    engine = Engine(read(tmp_path, text))
    # shop and shop-eu differ only by a policy kept outside the rule text.
    assert engine.loaded.rule_sets == 2 and set(engine.loaded.rule_counts) == {"shop", "blog", "shop-eu"}
    assert engine._rule_sets["shop"] is engine._rule_sets["shop-eu"]
    assert engine._rule_sets["shop"] is not engine._rule_sets["blog"]
    blocked, logged = engine.evaluate(request("shop", b"attack")), engine.evaluate(request("blog", b"attack"))
    assert blocked.intervention and blocked.application == "shop"
    assert not logged.intervention and [m.id for m in logged.matches] == [1001] and logged.application == "blog"
    assert engine.evaluate(request("", b"attack")).application == "shop"
    assert engine.evaluate(request("no-such-site", b"attack")).application == "shop"


def test_an_unknown_application_is_refused_when_so_configured(tmp_path, rules):
    engine = Engine(read(tmp_path, "unknown_application: refuse\n" + textwrap.dedent(TWO)))
    with pytest.raises(EvaluationFailed) as caught:
        engine.evaluate(request("no-such-site"))
    assert (caught.value.code, caught.value.reason) == ("NOT_FOUND", waf_pb2.UNKNOWN_APPLICATION)


def test_list_applications_describes_every_application(tmp_path, rules):
    engine = Engine(read(tmp_path, TWO))
    reply = engine.applications()
    assert reply.unknown_application == "default"
    shop, blog = reply.applications
    assert (shop.name, shop.is_default, shop.mode, shop.failure_policy, shop.truncated_body) == \
        ("shop", True, "block", "", "pass")
    assert (blog.name, blog.is_default, blog.mode, blog.failure_policy, blog.truncated_body) == \
        ("blog", False, "detect", "open", "block")
    assert shop.rules == blog.rules == 1 + engine.loaded.rule_counts["shop"] - 1
    assert shop.request_body_limit == 13107200 and shop.min_inspected_body == 16384
    assert shop.truncated_response_body == "pass" and shop.response_inspection and shop.transaction_ttl_ms == 35000
    assert not blog.response_inspection and blog.response_miss_policy == "block"
    assert list(blog.preloaded_ignore_lists) == ["1001", "1001 1002"] and not shop.preloaded_ignore_lists


def test_a_reload_adds_and_removes_applications(tmp_path, rules):
    engine = Engine(read(tmp_path, TWO))
    engine.reload(read(tmp_path, "applications:\n  - name: api\n    rules: {files: [site.conf]}\n"))
    assert list(engine.loaded.rule_counts) == ["api"] and engine.apps.default == "api"
    assert engine.evaluate(request("shop")).application == "api"


def test_a_broken_inline_directive_names_the_yaml_file_and_line(tmp_path, rules):
    text = """\
        applications:
          - name: shop
            rules:
              files: [site.conf]
              directives: |
                SecRule ARGS "@contains x" "id:2001,phase:2,deny"
                SecRule ARGS "@contains y" "id:2002,phase:2,deny,nosuchaction"
        """
    with pytest.raises(RulesError) as caught:
        Engine(read(tmp_path, text))
    message = str(caught.value)
    assert message.startswith(f"application 'shop' ({tmp_path / 'apps.yaml'}:2): ")
    assert f"File: {tmp_path / 'apps.yaml'}. Line: 7." in message and "nosuchaction" in message


def test_validate_exits_0_1_2_and_names_the_broken_file_and_line(tmp_path, rules, capsys):
    good = tmp_path / "apps.yaml"
    good.write_text(textwrap.dedent(TWO))
    assert wafsvc_main(["--validate", str(good)]) == 0
    out = capsys.readouterr().out
    assert "valid; 2 application(s), 2 distinct rule set(s)" in out and "shop (default): block" in out
    broken = tmp_path / "broken.conf"
    broken.write_text("# fine\n" + MARKER + "\nSecRule ARGS \"@rx x\" \"id:3,phase:2,deny,nosuchaction\"\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications:\n  - name: shop\n    rules: {files: [broken.conf]}\n")
    assert wafsvc_main(["--validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"application 'shop' ({bad}:2)" in err and f"File: {broken}. Line: 3." in err
    assert wafsvc_main(["--validate"]) == 2
    assert wafsvc_main(["--validate", str(tmp_path / "missing.yaml")]) == 2


def test_engine_from_specs_keeps_the_old_shape(rules):
    engine = Engine({"": RuleSetSpec(base_conf=BASE, rules_file=str(rules)),
                     "api": RuleSetSpec(base_conf=BASE, rules_file=str(rules), mode="detect")})
    assert engine.apps.default == "default" and engine.loaded.rule_sets == 2
    assert engine.evaluate(request("")).application == "default"
    with pytest.raises(EvaluationFailed):
        engine.evaluate(request("nope"))


def test_template_translates_the_environment(tmp_path, rules):
    app = template(env_config(tmp_path, None, RULES=rules, WAF_TRUNCATED_BODY="allow", WAF_MIN_INSPECTED_BODY=100))
    assert isinstance(app, Application) and app.truncated_body == "pass" and app.min_inspected == 100
