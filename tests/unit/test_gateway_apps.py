"""The gateway's cache of each application's failure policy (gateway/apps.py)
and the ACKs it makes of it."""

from __future__ import annotations

from gateway import setvars
from gateway.acks import AckEncoder
from gateway.apps import AppPolicies
from gateway.spop import encode_actions
from wafapi import waf_pb2


def reply(unknown: str = "default") -> waf_pb2.ListApplicationsResponse:
    apps = [waf_pb2.Application(name="shop", is_default=True, failure_policy="closed"),
            waf_pb2.Application(name="blog", failure_policy="open"),
            waf_pb2.Application(name="wiki")]                     # leaves it to the gateway
    return waf_pb2.ListApplicationsResponse(applications=apps, unknown_application=unknown)


def test_before_wafsvc_answers_the_gateways_own_policy_applies():
    policies = AppPolicies(fail_closed=False)
    assert not policies.fails_closed("shop") and not policies.fails_closed("")
    assert policies.label("shop") == "shop" and policies.label("") == "default"


def test_each_application_follows_its_own_policy_and_names_follow_wafsvcs_rules():
    policies = AppPolicies(fail_closed=True)
    assert policies.update(reply()) and not policies.update(reply())     # changed once
    assert policies.fails_closed("shop") and not policies.fails_closed("blog")
    assert policies.fails_closed("wiki")                                  # its own: none, so the gateway's
    assert policies.fails_closed("")                                      # the default: shop
    assert policies.fails_closed("no-such-site")                          # judged by the default
    lenient = AppPolicies(fail_closed=False)
    lenient.update(reply())
    assert not lenient.fails_closed("wiki") and lenient.fails_closed("no-such-site")
    assert policies.label("blog") == "blog" and policies.label("") == "shop"
    assert policies.label("no-such-site") == "shop"


def test_refused_names_have_no_policy_of_their_own_and_one_label():
    policies = AppPolicies(fail_closed=False)
    policies.update(reply(unknown="refuse"))
    assert not policies.fails_closed("no-such-site") and policies.fails_closed("")
    assert policies.label("no-such-site") == policies.label("other") == "_unknown"


def test_failure_acks_follow_the_policy_given():
    acks = AckEncoder(fail_closed=True)
    closed, _ = acks.failure("no verdict within the deadline")
    opened, decision = acks.failure("no verdict within the deadline", fail_closed=False)
    assert closed == encode_actions(setvars.failure_actions("no verdict within the deadline", True))
    assert opened == encode_actions(setvars.failure_actions("no verdict within the deadline", False))
    assert decision == encode_actions(setvars.failure_actions("no verdict within the deadline", False)
                                      [:setvars.DECISION_VARS])
