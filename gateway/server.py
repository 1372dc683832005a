"""The thin asyncio transport around the sans-IO SPOP codec.

Each HAProxy connection gets one AgentConnection. Every NOTIFY becomes one
evaluation in the pool; its ACK goes back on the connection the NOTIFY came
from (HAProxy drops ACKs that arrive elsewhere). ACKs produced in the same
loop iteration leave in one write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial

from gateway.acks import AckEncoder
from gateway.apps import AppPolicies
from gateway.config import GatewayConfig
from gateway.failures import NO_HANDLE, Failure, NoVerdict
from gateway.mapping import CHECK_RESPONSE, ORIGINAL, InvalidMessage, RequestContext
from gateway.notify import Decoded, NotifyDecoder
from gateway.pool import PoolHooks
from gateway.responses import MissPolicy
from gateway.spop import (AgentConnection, ConnectionClosed, ConnectionState, DisconnectReceived,
                          HelloReceived, NotifyReceived, SpopError, Status)

log = logging.getLogger("gateway.server")

# At shutdown: a connection says goodbye once HAProxy has been quiet on it
# this long, then waits this long at most for HAProxy to close it
# (SpopProtocol.disconnect).
QUIET_S = 0.02
LINGER_S = 1.0


class GatewayHooks(PoolHooks):
    """Observation points of the server (and, inherited, of the pool); the
    metrics module overrides them. No-ops here so the gateway runs, and is
    tested, the same with metrics on or off."""

    def connection_opened(self) -> None: ...
    def connection_closed(self, status: str) -> None: ...
    def frame(self, kind: str) -> None: ...
    def protocol_error(self, status: str) -> None: ...
    def invalid_message(self, error: InvalidMessage) -> None: ...
    def ignored(self, message: str, argument: str) -> None: ...
    def verdict(self, context: RequestContext, verdict, seconds: float) -> None: ...
    def failure(self, context: RequestContext | None, failure: NoVerdict, seconds: float) -> None: ...
    # A response (check-response): its verdict, a miss (the miss policy
    # answered), or no verdict for another reason (the failure policy).
    def response_verdict(self, context: RequestContext, verdict, seconds: float) -> None: ...
    def response_miss(self, context: RequestContext, failure: NoVerdict, policy: MissPolicy,
                      seconds: float) -> None: ...
    def response_failure(self, context: RequestContext | None, failure: NoVerdict, seconds: float) -> None: ...


class Gateway:
    """State shared by all connections: settings, the pool, the hooks."""

    def __init__(self, config: GatewayConfig, pool, hooks: GatewayHooks | None = None,
                 policies: AppPolicies | None = None) -> None:
        self.config = config
        self.pool = pool
        self.hooks = hooks or GatewayHooks()
        self.fail_closed = config.failure_policy == "closed"
        # Each application's failure and response-miss policies, as wafsvc
        # last told them (gateway/apps.py); the gateway's options otherwise.
        self.policies = policies or AppPolicies(self.fail_closed, MissPolicy(config.response_miss_policy))
        self.acks = AckEncoder(self.fail_closed)
        self.decoder = NotifyDecoder(config.default_app, config.haproxy_bufsize)
        self.connections: set[SpopProtocol] = set()
        self.paused: set[SpopProtocol] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        # reuse_port: with GATEWAY_PROCESSES > 1 every process binds the port.
        self._server = await loop.create_server(lambda: SpopProtocol(self), host, port, reuse_address=True,
                                                reuse_port=self.config.processes > 1)

    @property
    def sockets(self):
        return self._server.sockets if self._server else ()

    async def shutdown(self, grace_s: float) -> None:
        """Stop accepting, let evaluations in flight finish, then say goodbye
        on every connection with AGENT-DISCONNECT: each as soon as it owes
        no answer and HAProxy has sent nothing on it for QUIET_S (a frame
        HAProxy sent just before the goodbye is lost with the connection,
        and HAProxy 2.6 leaves a lost response message waiting), the rest
        when grace_s runs out."""
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + grace_s
        while self.connections and time.monotonic() < deadline:
            for proto in list(self.connections):
                if proto.quiet(QUIET_S):
                    proto.disconnect(Status.NORMAL, "agent shutting down", linger_s=LINGER_S)
            await asyncio.sleep(QUIET_S / 2)
        for proto in list(self.connections):
            proto.disconnect(Status.NORMAL, "agent shutting down", linger_s=LINGER_S)
        deadline = time.monotonic() + LINGER_S
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def resume_if_room(self) -> None:
        if self.paused and self.pool.inflight < self.config.max_inflight // 2:
            for proto in self.paused:
                proto.resume()
            self.paused.clear()


class SpopProtocol(asyncio.Protocol):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        config = gateway.config
        self.conn = AgentConnection(max_frame_size=config.max_frame_size, notify_decoder=gateway.decoder)
        self.transport: asyncio.Transport | None = None
        self._flush_scheduled = False
        self._loop = asyncio.get_event_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._frame_timer: asyncio.TimerHandle | None = None
        self._last_data = 0.0
        self._writing_paused = False
        self._lingering = False
        self.owed = 0  # NOTIFYs taken and not answered yet

    # -- asyncio.Protocol --------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.gateway.connections.add(self)
        self.gateway.hooks.connection_opened()
        self._last_data = self._loop.time()
        # Until HELLO, a short timeout: slow or silent peers do not hold sockets.
        self._timer = self._loop.call_later(self.gateway.config.hello_timeout_ms / 1000, self._on_timer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gateway.connections.discard(self)
        self.gateway.paused.discard(self)
        for timer in (self._timer, self._frame_timer):
            if timer is not None:
                timer.cancel()
        self.transport = None
        self.gateway.hooks.connection_closed("io" if exc else "closed")

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # said goodbye: HAProxy is closing; frames sent meanwhile are refused by the DISCONNECT
        self._last_data = self._loop.time()
        events = self.conn.receive_data(data)
        hooks = self.gateway.hooks
        for event in events:
            if isinstance(event, NotifyReceived):
                hooks.frame("notify")
                self._on_notify(event.notify)
            elif isinstance(event, HelloReceived):
                hooks.frame("hello")
                self._arm_idle_timer()
            elif isinstance(event, DisconnectReceived):
                hooks.frame("disconnect")
            elif isinstance(event, ConnectionClosed):
                hooks.protocol_error(event.status.name.lower())
                log.warning("SPOP protocol error; disconnecting",
                            extra={"status": event.status.name, "reason": event.message})
        self._flush()
        if self.conn.state is ConnectionState.CLOSED and self.transport is not None:
            self.transport.close()
        else:
            self._time_partial_frame(started_new=bool(events))

    def pause_writing(self) -> None:
        # The peer does not read its ACKs: stop reading its NOTIFYs too, or
        # ACKs would pile up here without bound.
        self._writing_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self not in self.gateway.paused:
            self.resume()

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        return False

    # -- evaluation --------------------------------------------------------
    def _on_notify(self, decoded: Decoded) -> None:
        gateway = self.gateway
        hooks = gateway.hooks
        for message, argument in decoded.ignored:
            hooks.ignored(message, argument)
        error = decoded.error
        if error is not None:
            # Never evaluated as an empty request: the failure policy answers.
            hooks.invalid_message(error)
            failure = NoVerdict(Failure.INVALID_MESSAGE, f"invalid SPOE message: {error}")
            if error.message == CHECK_RESPONSE.name:
                self._fail_response(decoded.stream_id, decoded.frame_id, None, failure, 0.0)
            else:
                self._fail(decoded.stream_id, decoded.frame_id, None, failure, 0.0,
                           original_agent=error.message == ORIGINAL.name)
            return
        worker = decoded.worker
        self.owed += 1
        if worker is None:
            gateway.pool.submit(decoded.request, partial(self._on_result, decoded.stream_id, decoded.frame_id,
                                                         decoded.context, time.perf_counter()))
        else:
            callback = partial(self._on_response, decoded.stream_id, decoded.frame_id, decoded.context,
                               time.perf_counter())
            if worker:
                gateway.pool.submit_response(worker, decoded.request, callback)
            else:
                callback(None, NO_HANDLE)
        if gateway.pool.inflight >= gateway.config.max_inflight and self.transport is not None:
            # Backpressure: stop reading NOTIFYs until wafsvc catches up.
            self.transport.pause_reading()
            gateway.paused.add(self)

    def _on_result(self, stream_id: int, frame_id: int, context: RequestContext,
                   started: float, verdict, failure: NoVerdict | None) -> None:
        gateway = self.gateway
        elapsed = time.perf_counter() - started
        self.owed -= 1
        if verdict is not None:
            gateway.hooks.verdict(context, verdict, elapsed)
            if self.transport is not None:
                acks = gateway.acks
                original = context.original_agent
                try:
                    self.conn.send_encoded_ack(stream_id, frame_id, acks.verdict(verdict, original))
                except SpopError:  # too big for the frame: keep the decision (and handle), drop the details
                    self.conn.send_encoded_ack(stream_id, frame_id, acks.short(verdict, original))
                self._schedule_flush()
        else:
            closed = _failure_policy(gateway, "no verdict; failure policy applied", context, failure)
            self._fail(stream_id, frame_id, context, failure, elapsed, closed)
        if gateway.paused:
            gateway.resume_if_room()

    def _on_response(self, stream_id: int, frame_id: int, context: RequestContext,
                     started: float, verdict, failure: NoVerdict | None) -> None:
        gateway = self.gateway
        elapsed = time.perf_counter() - started
        self.owed -= 1
        if verdict is not None:
            gateway.hooks.response_verdict(context, verdict, elapsed)
            if self.transport is not None:
                acks = gateway.acks
                try:
                    self.conn.send_encoded_ack(stream_id, frame_id, acks.response_verdict(verdict))
                except SpopError:  # too big for the frame: keep the decision, drop the details
                    self.conn.send_encoded_ack(stream_id, frame_id, acks.response_short(verdict))
                self._schedule_flush()
        elif failure.is_miss:
            # The transaction is gone: the miss policy answers at once.
            policy = gateway.policies.miss(context.app)
            gateway.hooks.response_miss(context, failure, policy, elapsed)
            if self.transport is not None:
                acks = gateway.acks
                self.conn.send_encoded_ack(stream_id, frame_id, acks.response_miss(failure.miss, policy)
                                           + acks.response_truncation(context.body_truncated))
                self._schedule_flush()
        else:
            closed = _failure_policy(gateway, "no verdict for a response; failure policy applied", context, failure)
            self._fail_response(stream_id, frame_id, context, failure, elapsed, closed)
        if gateway.paused:
            gateway.resume_if_room()

    def _fail_response(self, stream_id: int, frame_id: int, context: RequestContext | None,
                       failure: NoVerdict, elapsed: float, fail_closed: bool | None = None) -> None:
        self.gateway.hooks.response_failure(context, failure, elapsed)
        if self.transport is None:
            return
        acks = self.gateway.acks
        actions, decision = acks.response_failure(str(failure), fail_closed)
        if context is not None and context.body_truncated:  # no verdict: the gateway's detection
            flag = acks.response_truncation(True)
            actions, decision = actions + flag, decision + flag
        try:
            self.conn.send_encoded_ack(stream_id, frame_id, actions)
        except SpopError:
            self.conn.send_encoded_ack(stream_id, frame_id, decision)
        self._schedule_flush()

    def _fail(self, stream_id: int, frame_id: int, context: RequestContext | None,
              failure: NoVerdict, elapsed: float, fail_closed: bool | None = None,
              original_agent: bool = False) -> None:
        """No verdict for this request: count it and answer with the policy
        (the application's, else the gateway's), and the body_truncated flag
        as the gateway detected it."""
        self.gateway.hooks.failure(context, failure, elapsed)
        if self.transport is None:
            return  # HAProxy went away; the answer has no one to go to
        acks = self.gateway.acks
        actions, decision = acks.failure(str(failure), fail_closed)
        if context is not None:
            original_agent = context.original_agent
        flag = acks.truncation(context is not None and context.body_truncated, original_agent)
        if flag:
            actions, decision = actions + flag, decision + flag
        try:
            self.conn.send_encoded_ack(stream_id, frame_id, actions)
        except SpopError:
            self.conn.send_encoded_ack(stream_id, frame_id, decision)
        self._schedule_flush()

    # -- output ------------------------------------------------------------
    def _schedule_flush(self) -> None:
        """ACKs produced in the same loop iteration leave in one write."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self.conn.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def disconnect(self, status: Status, message: str, linger_s: float = 0.0) -> None:
        """AGENT-DISCONNECT, then close. With linger_s, half-close instead
        and let HAProxy close: closing a socket that holds unread NOTIFYs
        makes the kernel send a reset, which can destroy the DISCONNECT
        before HAProxy reads it; HAProxy 2.6 then leaves a response message
        (send-spoe-group) waiting until its 'timeout server'."""
        self.conn.disconnect(status, message)
        self._flush()
        transport = self.transport
        if transport is None:
            return
        if linger_s > 0 and transport.can_write_eof():
            transport.write_eof()
            self._lingering = True
            self._loop.call_later(linger_s, transport.close)
        else:
            transport.close()

    def quiet(self, for_s: float) -> bool:
        """Owes no answer, and HAProxy has sent nothing for for_s."""
        return not self.owed and self._loop.time() - self._last_data >= for_s

    def resume(self) -> None:
        if self.transport is not None and not self._writing_paused:
            self.transport.resume_reading()

    # -- timeouts ----------------------------------------------------------
    def _arm_idle_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(self.gateway.config.idle_timeout_ms / 1000, self._on_timer)

    def _time_partial_frame(self, started_new: bool) -> None:
        """A frame must complete within frame_timeout_ms: without this, a peer
        trickling one byte at a time keeps the idle timer happy forever."""
        if not self.conn.receiving_frame:
            if self._frame_timer is not None:
                self._frame_timer.cancel()
                self._frame_timer = None
        elif self._frame_timer is None or started_new:  # a frame completed, the next one began
            if self._frame_timer is not None:
                self._frame_timer.cancel()
            self._frame_timer = self._loop.call_later(self.gateway.config.frame_timeout_ms / 1000,
                                                      self._on_frame_timeout)

    def _on_frame_timeout(self) -> None:
        self._frame_timer = None
        if self.transport is None or not self.conn.receiving_frame:
            return
        if self in self.gateway.paused:  # we stopped reading (backpressure): not the peer's fault
            self._time_partial_frame(started_new=True)
            return
        self.gateway.hooks.protocol_error("timeout")
        log.warning("SPOP frame not completed in time; disconnecting",
                    extra={"timeout_ms": self.gateway.config.frame_timeout_ms})
        self.disconnect(Status.TIMEOUT, "frame not completed in time")

    def _on_timer(self) -> None:
        if self.transport is None:
            return
        config = self.gateway.config
        if self.conn.state is not ConnectionState.ESTABLISHED:
            self.disconnect(Status.TIMEOUT, "no HELLO in time")
            return
        idle = self._loop.time() - self._last_data
        limit = config.idle_timeout_ms / 1000
        if idle >= limit:
            self.disconnect(Status.TIMEOUT, "idle")
        else:
            self._timer = self._loop.call_later(limit - idle, self._on_timer)


def _failure_policy(gateway, what: str, context: RequestContext, failure: NoVerdict) -> bool:
    """Logs a request or response left without a verdict; True when its
    application's failure policy is closed."""
    closed = gateway.policies.fails_closed(context.app)
    log.warning(what, extra={"unique_id": context.unique_id, "reason": str(failure), "failure": failure.label,
                             "app": context.app, "policy": "closed" if closed else "open"})
    return closed
