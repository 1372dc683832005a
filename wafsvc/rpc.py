"""The worker's gRPC server: one thread polls gRPC's completion queue, does
the socket I/O and runs the handlers.

Why not grpc.aio (measured; bench/results/profile.md): it hands every
completed read and write from a poller thread to the event loop's thread,
and gRPC's event engine adds its own threads before that, about 13 context
switches per stream message. Here the thread that waits in the completion
queue reads the socket itself (gRPC's own poller: GRPC_EXPERIMENTS=
-event_engine_listener, set in wafsvc/__main__.py) and runs the handler, so
a message that arrives alone costs one wakeup. The engine holds the GIL for
every evaluation anyway: no second thread could ever run beside it.

What a handler sees:
- unary methods are grpcio's own method handlers (the generated
  add_*_to_server functions register them here), run inline:
  handler(request, call) returns the response, or raises Abort;
- a stream method's handler, given the Call, returns a Session; each
  request goes to Session.receive(), and its answers (any number, produced
  lazily) are sent in order before the next message is read;
- grpc.health.v1 (Check, Watch, List) is built in (wafsvc/rpc_health.py),
  open without the token.

Timers (call_later) and signal handlers run between polls. broadcast(): each
stream sends its session's notice() after the answers under way (the state
changed). drain(): no new calls (GOAWAY), health watchers are told
NOT_SERVING, each stream sends its notice and ends once idle, unless its
session still expects work (keeps_open(): held transactions wait for their
responses); what still runs after the grace period is cancelled.

It drives grpcio's Cython layer (grpc._cython.cygrpc) the way grpcio's own
synchronous server does; requirements.txt pins grpcio, and the end-to-end
tests cover every method served.
"""

from __future__ import annotations

import itertools
import logging
import signal
import time
from typing import Callable, Iterable

import grpc
from grpc._common import STATUS_CODE_TO_CYGRPC_STATUS_CODE
from grpc._cython import cygrpc

from wafsvc.timers import Timers

log = logging.getLogger("wafsvc.rpc")

HEALTH = "grpc.health.v1.Health"
_RECV = cygrpc.OperationType.receive_message
_TIMEOUT = cygrpc.CompletionType.queue_timeout
_SHUTDOWN = cygrpc.CompletionType.queue_shutdown
SIGNAL_CHECK_S = 0.2


class Abort(Exception):
    """Ends a call with this status: code is a grpc.StatusCode name."""

    def __init__(self, code: str, details: str, trailing_metadata: tuple = ()) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailing_metadata = tuple(trailing_metadata)


class Call:
    """One call as its handler sees it."""
    __slots__ = ("method", "metadata", "initial_metadata")

    def __init__(self, method: str, metadata: tuple) -> None:
        self.method = method
        self.metadata = metadata
        self.initial_metadata: tuple = ()   # a stream handler may set it before its first answer

    def invocation_metadata(self) -> tuple:
        return self.metadata


class Session:
    """One stream call. receive() answers a request: an iterable whose
    items are sent as they come (a generator may send part of its work
    early); the next request is read when it is exhausted."""
    ended = False   # set: the stream ends (status OK) after the current answers
    drains = True   # ends once idle while the server drains (see keeps_open); else runs until the grace

    def receive(self, request) -> Iterable:
        raise NotImplementedError

    def notice(self) -> Iterable:
        """Sent on broadcast() and drain(), after any answers under way."""
        return ()

    def keeps_open(self) -> bool:
        """While draining, an idle stream stays open while true: work for it may come."""
        return False

    def close(self) -> None:
        """The call is over, however it ended."""


def status_ops(code: str, details: str = "", trailing: tuple = ()) -> tuple:
    return (cygrpc.SendStatusFromServerOperation(trailing, STATUS_CODE_TO_CYGRPC_STATUS_CODE[grpc.StatusCode[code]],
                                                 details.encode(), 0),
            cygrpc.ReceiveCloseOnServerOperation(0))


def message_of(ev) -> bytes | None:
    if not ev.success:
        return None
    for op in ev.batch_operations:
        if op.type() == _RECV:
            return op.message()
    return None


class Server:
    def __init__(self, options: Iterable[tuple] = (),
                 authorize: Callable[[str, tuple], bool] | None = None, timers: Timers | None = None) -> None:
        self._cq = cygrpc.CompletionQueue()
        self._server = cygrpc.Server(tuple(options), False)
        self._server.register_completion_queue(self._cq)
        self._methods: dict[str, grpc.RpcMethodHandler] = {}
        self._authorize = authorize
        self._streams: set[_Stream] = set()
        self.timers = timers or Timers()
        self._soon: list[Callable[[], None]] = []
        self.draining = False
        self.stopped = False   # every call has ended
        from wafsvc.rpc_health import Health   # it builds on this module's helpers
        self.health = Health()

    # -- setup ----------------------------------------------------------
    def add_generic_rpc_handlers(self, handlers) -> None:
        """The generated add_*_to_server functions call both; the
        registered handlers are the ones served."""

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        for name, handler in handlers.items():
            self._methods[f"/{service}/{name}"] = handler

    def add_port(self, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
        if credentials is None:
            return self._server.add_http2_port(address.encode())
        return self._server.add_http2_port(address.encode(), credentials._credentials)

    def start(self) -> None:
        self._server.start()
        self._server.request_call(self._cq, self._cq, self._on_call)

    # -- timers and signals -----------------------------------------------
    def on_signal(self, signo: int, callback: Callable[[], None]) -> None:
        """callback runs on the loop's thread between polls, never inside a
        handler, within SIGNAL_CHECK_S."""
        signal.signal(signo, lambda _signo, _frame: self.soon(callback))

    def soon(self, callback: Callable[[], None]) -> None:
        """From any thread or a signal handler: callback runs on the loop's
        thread after its current poll (within SIGNAL_CHECK_S)."""
        self._soon.append(callback)

    # -- the loop -----------------------------------------------------------
    def run(self) -> None:
        """Serves until the end of a drain (or stop()), then answers what
        is still queued."""
        cq = self._cq
        while True:
            event = cq.poll(self._deadline())
            kind = event.completion_type
            if kind == _SHUTDOWN:
                return
            if kind != _TIMEOUT:
                self._guarded(event.tag, event)
            event = None   # before the next poll: it may hold the last reference to a call
            if self._soon:
                soon, self._soon = self._soon, []
                for callback in soon:
                    self._guarded(callback)
            for callback in self.timers.due():
                self._guarded(callback)
            if self.draining:   # what ran may have been the last work an idle stream waited for
                for stream in list(self._streams):
                    stream.end_if_done()

    def _deadline(self) -> float:
        """Python signal handlers only run when the poll returns: it waits
        at most SIGNAL_CHECK_S (cygrpc itself wakes that often to check)."""
        return time.time() + self.timers.wait_s(SIGNAL_CHECK_S)

    @staticmethod
    def _guarded(callback, *args) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("gRPC server callback failed")

    # -- new calls ------------------------------------------------------------
    def _on_call(self, ev) -> None:
        if not ev.success:   # the server is shutting down
            return
        self._server.request_call(self._cq, self._cq, self._on_call)
        c_call, method = ev.call, ev.call_details.method.decode()
        metadata = tuple(ev.invocation_metadata or ())
        call = Call(method, metadata)
        handler = self._methods.get(method)
        if method.startswith(f"/{HEALTH}/"):   # open without a token: it tells nothing but SERVING
            self.health.serve(c_call, method)
        elif handler is None:
            c_call.start_server_batch((cygrpc.SendInitialMetadataOperation((), 0),
                                       *status_ops("UNIMPLEMENTED", "Method not found!")), ignore)
        elif self._authorize is not None and not self._authorize(method, metadata):
            c_call.start_server_batch((cygrpc.SendInitialMetadataOperation((), 0),
                                       *status_ops("UNAUTHENTICATED", "missing or wrong bearer token")), ignore)
        elif handler.request_streaming and handler.response_streaming:
            _Stream(self, c_call, call, handler).start()
        elif not handler.request_streaming and not handler.response_streaming:
            c_call.start_server_batch((cygrpc.ReceiveMessageOperation(0),),
                                      lambda ev: self._unary(ev, c_call, call, handler))
        else:
            c_call.start_server_batch((cygrpc.SendInitialMetadataOperation((), 0),
                                       *status_ops("UNIMPLEMENTED", "streaming shape not served")), ignore)

    def _unary(self, ev, c_call, call: Call, handler) -> None:
        data = message_of(ev)
        if data is None:
            c_call.start_server_batch((cygrpc.SendInitialMetadataOperation((), 0),
                                       *status_ops("INTERNAL", "no request message")), ignore)
            return
        try:
            request = handler.request_deserializer(data)
        except Exception:
            c_call.start_server_batch((cygrpc.SendInitialMetadataOperation((), 0),
                                       *status_ops("INTERNAL", "Exception deserializing request!")), ignore)
            return
        try:
            response = handler.response_serializer(handler.unary_unary(request, call))
        except Abort as exc:
            ops = status_ops(exc.code, exc.details, exc.trailing_metadata)
        except Exception:
            log.exception("unary handler failed", extra={"method": call.method})
            ops = status_ops("UNKNOWN", "Exception calling application")
        else:
            ops = (cygrpc.SendMessageOperation(response, 0), *status_ops("OK"))
        c_call.start_server_batch((cygrpc.SendInitialMetadataOperation(call.initial_metadata, 0), *ops), ignore)

    def broadcast(self) -> None:
        for stream in list(self._streams):   # each sends its session's notice
            stream.notify()

    # -- stopping ---------------------------------------------------------------
    def drain(self, grace_s: float) -> None:
        """No new calls; streams send their drain notice and end once idle and
        done; after grace_s what is left is cancelled. run() returns when all are."""
        if self.draining:
            return
        self.draining = True
        self.health.enter_shutdown()
        self._server.shutdown(self._cq, self._on_shutdown)
        for stream in list(self._streams):   # idle with nothing to wait for: ends; else notice
            stream.end_if_done() or stream.notify()
        self.timers.call_later(grace_s, self._server.cancel_all_calls)

    def _on_shutdown(self, _ev) -> None:
        """Every call has ended: what they queued is answered, then run() returns."""
        self.stopped = True
        self._cq.shutdown()

    def stop(self) -> None:
        """Ends everything now: every call is cancelled, run() returns."""
        self.drain(0.0)
        self._server.cancel_all_calls()


def ignore(_ev) -> None:
    """The tag of a batch whose completion needs no action."""


class _Stream:
    """A stream call's state: reading, sending answers, or closing."""
    __slots__ = ("server", "c_call", "call", "handler", "session", "answers", "closing", "reading")
    # answers is set exactly while a message is being sent; reading while a
    # read is pending. Both at once: a notice went out on an idle stream.

    def __init__(self, server: Server, c_call, call: Call, handler) -> None:
        self.server = server
        self.c_call = c_call
        self.call = call
        self.handler = handler
        self.session: Session | None = None
        self.answers = None
        self.closing = False
        self.reading = False

    def start(self) -> None:
        try:
            self.session = self.handler.stream_stream(self.call)
        except Abort as exc:
            self._finish(exc.code, exc.details, exc.trailing_metadata)
            return
        self.server._streams.add(self)
        head = cygrpc.SendInitialMetadataOperation(self.call.initial_metadata, 0)
        if self.session.ended or (self.server.draining and self.session.drains):
            self._finish("OK", head=(head,))
            return
        self.reading = True
        self.c_call.start_server_batch((head, cygrpc.ReceiveMessageOperation(0)), self._on_message)

    def _on_message(self, ev) -> None:
        self.reading = False
        if self.closing:
            return
        data = message_of(ev)
        if data is None:   # the client half-closed (or went away)
            self._finish("OK")
            return
        try:
            request = self.handler.request_deserializer(data)
        except Exception:
            self._finish("INTERNAL", "Exception deserializing request!")
            return
        try:
            answers = iter(self.session.receive(request))
        except Abort as exc:
            self._finish(exc.code, exc.details, exc.trailing_metadata)
            return
        except Exception:
            log.exception("stream handler failed", extra={"method": self.call.method})
            self._finish("UNKNOWN", "Exception iterating responses")
            return
        if self.answers is not None:   # a notice is being sent: these follow it
            self.answers = itertools.chain(self.answers, answers)
            return
        self.answers = answers
        self._next()

    def _next(self) -> None:
        try:
            answer = next(self.answers, None)
        except Abort as exc:
            self._finish(exc.code, exc.details, exc.trailing_metadata)
            return
        except Exception:
            log.exception("stream handler failed", extra={"method": self.call.method})
            self._finish("UNKNOWN", "Exception iterating responses")
            return
        if answer is not None:
            data = self.handler.response_serializer(answer)
            self.c_call.start_server_batch((cygrpc.SendMessageOperation(data, 0),), self._on_sent)
            return
        self.answers = None
        if self.reading:   # a notice went out while idle: the read is still pending
            return
        if self._done():
            self._finish("OK")
            return
        self.reading = True
        self.c_call.start_server_batch((cygrpc.ReceiveMessageOperation(0),), self._on_message)

    def _on_sent(self, ev) -> None:
        if not ev.success or self.closing:   # the client is gone: evaluate no more of this message
            self.answers = None
            self._finish("CANCELLED")
            return
        self._next()

    def notify(self) -> None:
        if self.closing or self.session is None:
            return
        notice = iter(self.session.notice())
        if self.answers is not None:   # busy: the notice follows the answers under way
            self.answers = itertools.chain(self.answers, notice)
        elif self.reading:
            self.answers = notice
            self._next()

    def end_if_done(self) -> bool:
        """An idle stream whose session waits for nothing more ends (OK)."""
        done = self.reading and self.answers is None and not self.closing and self._done()
        if done:
            self._finish("OK")
        return done

    def _done(self) -> bool:
        session = self.session
        return session.ended or (self.server.draining and session.drains and not session.keeps_open())

    def _finish(self, code: str, details: str = "", trailing: tuple = (), head: tuple = ()) -> None:
        if self.closing:
            return
        self.closing = True
        self.c_call.start_server_batch((*head, *status_ops(code, details, trailing)), self._on_closed)

    def _on_closed(self, _ev) -> None:
        self.server._streams.discard(self)
        if self.session is not None:
            try:
                self.session.close()
            except Exception:
                log.exception("closing a stream failed", extra={"method": self.call.method})
