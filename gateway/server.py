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

from gateway import mapping
from gateway.config import GatewayConfig
from gateway.pool import WafPool
from gateway.spop import (AgentConnection, ConnectionClosed, ConnectionState, DisconnectReceived,
                          HelloReceived, NotifyReceived, SpopError, Status)

log = logging.getLogger("gateway.server")


class GatewayHooks:
    """Observation points; the metrics module overrides them. No-ops here so
    the server runs, and is tested, the same with metrics on or off."""

    def connection_opened(self) -> None: ...
    def connection_closed(self, status: str) -> None: ...
    def frame(self, kind: str) -> None: ...
    def protocol_error(self, status: str) -> None: ...
    def invalid_message(self, error: mapping.InvalidMessage) -> None: ...
    def ignored(self, message: str, argument: str) -> None: ...
    def verdict(self, context: mapping.RequestContext, verdict, seconds: float) -> None: ...
    def failure(self, context: mapping.RequestContext | None, reason: str, seconds: float) -> None: ...


class Gateway:
    """State shared by all connections: settings, the pool, the hooks."""

    def __init__(self, config: GatewayConfig, pool: WafPool, hooks: GatewayHooks | None = None) -> None:
        self.config = config
        self.pool = pool
        self.hooks = hooks or GatewayHooks()
        self.fail_closed = config.failure_policy == "closed"
        self.connections: set[SpopProtocol] = set()
        self.paused: set[SpopProtocol] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: SpopProtocol(self), host, port, reuse_address=True)

    @property
    def sockets(self):
        return self._server.sockets if self._server else ()

    async def shutdown(self, grace_s: float) -> None:
        """Stop accepting, let evaluations in flight finish, then say goodbye
        on every connection with AGENT-DISCONNECT."""
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + grace_s
        while self.pool.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for proto in list(self.connections):
            proto.disconnect(Status.NORMAL, "agent shutting down")
        await asyncio.sleep(0)

    def resume_if_room(self) -> None:
        if self.paused and self.pool.inflight < self.config.max_inflight // 2:
            for proto in self.paused:
                proto.resume()
            self.paused.clear()


class SpopProtocol(asyncio.Protocol):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        config = gateway.config
        self.conn = AgentConnection(max_frame_size=config.max_frame_size)
        self.transport: asyncio.Transport | None = None
        self._flush_scheduled = False
        self._loop = asyncio.get_event_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._frame_timer: asyncio.TimerHandle | None = None
        self._last_data = 0.0
        self._writing_paused = False

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
    def _on_notify(self, notify) -> None:
        gateway = self.gateway
        hooks = gateway.hooks
        started = time.perf_counter()
        schema = message = None
        for candidate in notify.messages:
            if schema is None:
                schema = mapping.MESSAGES.get(candidate.name)
                message = candidate
            else:
                hooks.ignored(candidate.name, "")  # another message beside ours
        try:
            if schema is None:
                names = ", ".join(m.name for m in notify.messages) or "(none)"
                raise mapping.InvalidMessage(
                    mapping.Problem.UNKNOWN_MESSAGE,
                    f"no message the gateway knows in this NOTIFY, only {names}",
                    message=notify.messages[0].name if notify.messages else "",
                    hint="name the message check-request (deploy/haproxy/spoe-modsecurity.conf), or "
                         "modsecurity as the original agent did, in spoe-agent 'messages' and 'spoe-message'")
            request, context, unknown = mapping.map_message(message.args, schema, gateway.config.default_app,
                                                            gateway.config.haproxy_bufsize)
        except mapping.InvalidMessage as exc:
            # Never evaluated as an empty request: the failure policy answers.
            for name in exc.unknown:
                hooks.ignored(exc.message, name)
            hooks.invalid_message(exc)
            self._fail(notify.stream_id, notify.frame_id, None, f"invalid SPOE message: {exc}", 0.0)
            return
        except Exception:  # a bug; answer this request and keep the connection's others alive
            log.exception("cannot map a request message")
            self._fail(notify.stream_id, notify.frame_id, None, "internal error mapping the request", 0.0)
            return
        for name in unknown:
            hooks.ignored(message.name, name)
        gateway.pool.submit(request, partial(self._on_result, notify.stream_id, notify.frame_id,
                                             context, started))
        if gateway.pool.inflight >= gateway.config.max_inflight and self.transport is not None:
            # Backpressure: stop reading NOTIFYs until wafsvc catches up.
            self.transport.pause_reading()
            gateway.paused.add(self)

    def _on_result(self, stream_id: int, frame_id: int, context: mapping.RequestContext,
                   started: float, verdict, error: str | None) -> None:
        gateway = self.gateway
        elapsed = time.perf_counter() - started
        if verdict is not None:
            gateway.hooks.verdict(context, verdict, elapsed)
            self.ack(stream_id, frame_id, mapping.verdict_actions(verdict))
        else:
            log.warning("no verdict; failure policy applied", extra={
                "unique_id": context.unique_id, "reason": error,
                "policy": gateway.config.failure_policy})
            self._fail(stream_id, frame_id, context, error or "no verdict", elapsed)
        gateway.resume_if_room()

    def _fail(self, stream_id: int, frame_id: int, context: mapping.RequestContext | None,
              reason: str, elapsed: float) -> None:
        """No verdict for this request: count it and answer with the policy."""
        self.gateway.hooks.failure(context, reason, elapsed)
        self.ack(stream_id, frame_id, mapping.failure_actions(reason, self.gateway.fail_closed))

    # -- output ------------------------------------------------------------
    def ack(self, stream_id: int, frame_id: int, actions: list) -> None:
        if self.transport is None:
            return  # HAProxy went away; the verdict has no one to go to
        try:
            self.conn.send_ack(stream_id, frame_id, actions)
        except SpopError:
            # Too big for the frame: keep the decision, drop the details.
            self.conn.send_ack(stream_id, frame_id, actions[:mapping.DECISION_VARS])
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self.conn.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def disconnect(self, status: Status, message: str) -> None:
        self.conn.disconnect(status, message)
        self._flush()
        if self.transport is not None:
            self.transport.close()

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
