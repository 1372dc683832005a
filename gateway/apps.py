"""Each application's failure policy and response-miss policy, learned from
wafsvc and cached.

wafsvc's applications file (README, "Several sites") may give an application
its own failure policy: what to do when no verdict comes (wafsvc down, too
slow). The gateway is the one who must follow it, precisely when wafsvc
cannot be asked. So it asks while it can: ListApplications at start and
every REFRESH_S, and keeps the last answer. wafsvc down: the cache is what
counts. An application the cache does not know, or one that sets no policy,
gets GATEWAY_FAILURE_POLICY; its response-miss policy (what a response
whose held transaction is gone gets: pass, flagged, or block),
GATEWAY_RESPONSE_MISS_POLICY.

Names follow wafsvc's rules: "" is the default application, and an unknown
name is judged by the default one (unknown_application: default) or
refused (refuse: then it has no policy of its own).

Also the bounded `app` label of metrics and logs: a configured name, or
"_unknown" for a name wafsvc does not serve.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from gateway.responses import MissPolicy
from wafapi import waf_pb2, waf_pb2_grpc

log = logging.getLogger("gateway.apps")

REFRESH_S = 30.0
RETRY_S = 2.0          # until the first answer
CALL_TIMEOUT_S = 5.0
UNKNOWN = "_unknown"


class AppPolicies:
    def __init__(self, fail_closed: bool, miss: MissPolicy = MissPolicy.PASS) -> None:
        self.fallback_closed = fail_closed
        self.fallback_miss = miss
        self._closed: dict[str, bool] = {}    # application -> fails closed (only those that set a policy)
        self._miss: dict[str, MissPolicy] = {}  # application -> its response-miss policy, likewise
        self._known: frozenset[str] = frozenset()
        self._default = ""
        self._unknown_to_default = True
        self.learned = False

    def update(self, reply: waf_pb2.ListApplicationsResponse) -> bool:
        """Takes wafsvc's answer; True when anything changed."""
        closed = {app.name: app.failure_policy == "closed" for app in reply.applications
                  if app.failure_policy in ("closed", "open")}
        miss = {app.name: MissPolicy(app.response_miss_policy) for app in reply.applications
                if app.response_miss_policy in ("pass", "block")}
        known = frozenset(app.name for app in reply.applications)
        default = next((app.name for app in reply.applications if app.is_default), "")
        unknown_to_default = reply.unknown_application != "refuse"
        changed = (closed, miss, known, default, unknown_to_default) != (
            self._closed, self._miss, self._known, self._default, self._unknown_to_default)
        self._closed, self._miss, self._known, self._default = closed, miss, known, default
        self._unknown_to_default = unknown_to_default
        self.learned = True
        return changed

    def resolve(self, name: str) -> str:
        """The configured application that judges `name`, or "" when the
        cache cannot tell (nothing learned yet, or refused)."""
        if name in self._known:
            return name
        if not name or self._unknown_to_default:
            return self._default
        return ""

    def fails_closed(self, name: str) -> bool:
        return self._closed.get(self.resolve(name), self.fallback_closed)

    def miss(self, name: str) -> MissPolicy:
        """The response-miss policy of the application that judges `name`."""
        if not self._miss:
            return self.fallback_miss
        return self._miss.get(self.resolve(name), self.fallback_miss)

    def label(self, name: str) -> str:
        """A bounded label: a configured application's name, or _unknown."""
        if not self.learned:
            return name or "default"
        return self.resolve(name) or UNKNOWN

    @property
    def default(self) -> str:
        return self._default

    def describe(self) -> dict[str, str]:
        return {name: ("closed" if self._closed[name] else "open") if name in self._closed else "gateway's"
                for name in sorted(self._known)}


async def keep_fresh(policies: AppPolicies, target: str, credentials, options, metadata,
                     refresh_s: float = REFRESH_S) -> None:
    """Runs until cancelled: asks wafsvc for its applications now and then,
    on a channel of its own (one unary call per interval)."""
    options = [*options, ("grpc.enable_retries", 0)]
    channel = (grpc.aio.secure_channel(target, credentials, options=options) if credentials is not None
               else grpc.aio.insecure_channel(target, options=options))
    stub = waf_pb2_grpc.WafStub(channel)
    try:
        while True:
            try:
                reply = await stub.ListApplications(waf_pb2.ListApplicationsRequest(), timeout=CALL_TIMEOUT_S,
                                                    metadata=metadata)
            except grpc.RpcError as exc:
                # wafsvc unreachable (or too old to answer): keep what we know.
                log.debug("cannot list wafsvc's applications", extra={"code": exc.code().name})
            else:
                if policies.update(reply):
                    log.info("applications learned from wafsvc", extra={
                        "failure_policies": policies.describe(), "default": policies.default,
                        "unknown_application": reply.unknown_application})
            await asyncio.sleep(refresh_s if policies.learned else RETRY_S)
    finally:
        await channel.close()
