"""grpc.health.v1 on wafsvc/rpc.py's server, as grpcio-health-checking
serves it: Check (NOT_FOUND for an unknown service), Watch (the status now,
then every change; SERVICE_UNKNOWN for an unknown service) and List. When
the server drains, every service turns NOT_SERVING for good and each
watcher hears it, then its stream ends."""

from __future__ import annotations

from grpc._cython import cygrpc
from grpc_health.v1 import health_pb2

from wafsvc.rpc import ignore, message_of, status_ops


class Health:
    Status = health_pb2.HealthCheckResponse

    def __init__(self) -> None:
        self._statuses: dict[str, int] = {}
        self._watchers: set[_Watch] = set()
        self._frozen = False

    def set(self, service: str, status: int) -> None:
        if self._frozen:
            return
        self._statuses[service] = status
        for watch in list(self._watchers):
            if watch.service == service:
                watch.push()

    def status(self, service: str) -> int:
        return self._statuses.get(service, self.Status.SERVICE_UNKNOWN)

    def enter_shutdown(self) -> None:
        """Every service NOT_SERVING for good; watchers hear it, then end."""
        for service in self._statuses:
            self._statuses[service] = self.Status.NOT_SERVING
        self._frozen = True
        for watch in list(self._watchers):
            watch.push(last=True)

    def serve(self, c_call, method: str) -> None:
        name = method.rpartition("/")[2]
        if name == "Watch":
            c_call.start_server_batch((cygrpc.ReceiveMessageOperation(0),),
                                      lambda ev: _Watch(self, c_call).start(ev))
        elif name in ("Check", "List"):
            c_call.start_server_batch((cygrpc.ReceiveMessageOperation(0),),
                                      lambda ev: self._unary(ev, c_call, name))
        else:
            c_call.start_server_batch((cygrpc.SendInitialMetadataOperation((), 0),
                                       *status_ops("UNIMPLEMENTED", "Method not found!")), ignore)

    def _unary(self, ev, c_call, name: str) -> None:
        data = message_of(ev)
        head = cygrpc.SendInitialMetadataOperation((), 0)
        if name == "List":
            reply = health_pb2.HealthListResponse()
            for service, status in self._statuses.items():
                reply.statuses[service].status = status
            ops = (cygrpc.SendMessageOperation(reply.SerializeToString(), 0), *status_ops("OK"))
        else:
            service = health_pb2.HealthCheckRequest.FromString(data or b"").service
            if service in self._statuses:
                reply = self.Status(status=self._statuses[service]).SerializeToString()
                ops = (cygrpc.SendMessageOperation(reply, 0), *status_ops("OK"))
            else:
                ops = status_ops("NOT_FOUND", "Unknown service")
        c_call.start_server_batch((head, *ops), ignore)


class _Watch:
    __slots__ = ("health", "c_call", "service", "sent", "sending", "ending", "over", "head")

    def __init__(self, health: Health, c_call) -> None:
        self.health = health
        self.c_call = c_call
        self.service = ""
        self.sent = None
        self.sending = self.ending = self.over = False
        self.head = (cygrpc.SendInitialMetadataOperation((), 0),)   # goes with the first message

    def start(self, ev) -> None:
        data = message_of(ev)
        if data is None:
            self.c_call.start_server_batch((cygrpc.SendInitialMetadataOperation((), 0),
                                            *status_ops("INTERNAL", "no request message")), ignore)
            return
        self.service = health_pb2.HealthCheckRequest.FromString(data).service
        self.health._watchers.add(self)
        # Completes when the client cancels or the call ends.
        self.c_call.start_server_batch((cygrpc.ReceiveCloseOnServerOperation(0),), self._on_over)
        self.push(last=self.health._frozen)

    def push(self, last: bool = False) -> None:
        self.ending = self.ending or last
        if self.sending or self.over:
            return
        status = self.health.status(self.service)
        if status == self.sent:
            if self.ending:
                self.over = True
                self.c_call.start_server_batch(status_ops("OK")[:1], ignore)
            return
        self.sending = True
        self.sent = status
        reply = Health.Status(status=status).SerializeToString()
        head, self.head = self.head, ()
        self.c_call.start_server_batch((*head, cygrpc.SendMessageOperation(reply, 0)), self._on_sent)

    def _on_sent(self, ev) -> None:
        self.sending = False
        if ev.success:
            self.push()

    def _on_over(self, _ev) -> None:
        self.over = True
        self.health._watchers.discard(self)
