"""The pool's gRPC channels ("slots"), and keeping every worker reached.

- `channels` slots, each one gRPC channel with its own connections (local
  subchannel pool) and round_robin over every address the target resolves
  to (`dns:///wafsvc:50051` or `ipv4:a:p,b:p`). Each slot carries `streams`
  lanes, or one per address when there are more addresses (round_robin
  gives each new stream the next replica: fewer streams than replicas would
  leave some replica without a stream from that slot, a new replica for
  several rotations).
- Coverage: one HTTP/2 connection pins to one SO_REUSEPORT worker, chosen by
  a hash of the connection, so some worker may get no connection at all.
  While the workers reached fall short of the counts replicas report, a slot
  whose connections only duplicate covered workers is replaced (fresh
  connections, fresh hashes), or a slot is added, within a bound.
- Rotation: every `recycle_s` the oldest slot is replaced, so replicas that
  joined DNS, came back after a crash or were down at start get lanes (a new
  channel resolves the target again). Replacing is lossless: the new slot's
  lanes start first; the old ones take no new work and close once they have
  answered, at the latest after one deadline. An old lane that is the only
  way to its worker stays open for responses (a spare, gateway/workers.py)
  until the worker is reached again, at most RESPONSE_GRACE_S: held
  transactions live there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import grpc

from gateway.lanes import Lane, Slot

log = logging.getLogger("gateway.pool")

MAINTAIN_INTERVAL_S = 0.25
SETTLE_S = 0.2
CONNECT_TIMEOUT_S = 2.0
COVERAGE_COOLDOWN_S = 0.5        # between two coverage repairs
COVERAGE_FAST_ATTEMPTS = 20      # then repair only as often as rotation
# A retired lane that is the only way to its worker stays open this long at
# most, for responses: a little above wafsvc's default transaction TTL (35 s).
RESPONSE_GRACE_S = 40.0


def listed_addresses(target: str) -> int | None:
    """How many addresses an ipv4:/ipv6: target lists; None for a name."""
    scheme, sep, rest = target.partition(":")
    if sep and scheme in ("ipv4", "ipv6"):
        return len([a for a in rest.split(",") if a])
    if scheme == "unix" or scheme == "unix-abstract":
        return 1
    return None


def name_and_port(target: str) -> tuple[str, str] | None:
    """(host, port) of dns:///host:port, dns://authority/host:port or host:port."""
    if target.startswith("dns:"):
        target = target[4:].lstrip("/")
        if "/" in target:  # dns://authority/host:port
            target = target.split("/", 1)[1]
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), port


async def count_addresses(target: str) -> int:
    """How many addresses the target resolves to now (0: unknown)."""
    listed = listed_addresses(target)
    if listed is not None:
        return listed
    where = name_and_port(target)
    if where is None:
        return 0
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(*where, type=socket.SOCK_STREAM)
    except OSError:
        return 0
    return len({info[4][:2] for info in infos})


def lanes_per_slot(streams: int, addresses: int, known_replicas: int) -> int:
    """At least one lane per replica, so that round_robin hands every
    replica a stream of each new slot: the addresses counted now, or, when
    they cannot be counted, one more than the replicas already known."""
    return max(streams, addresses or known_replicas + 1)


def grpc_options(max_message_bytes: int, extra: tuple = ()) -> list:
    return [
        ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.enable_retries", 0),  # retries are ours: per request, across lanes
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.dns_min_time_between_resolutions_ms", 1000),
        *extra,  # e.g. the TLS server name override
    ]


class Channels:
    def __init__(self, pool, target: str, *, channels: int, streams: int, recycle_s: float,
                 credentials: grpc.ChannelCredentials | None, options: list) -> None:
        self.pool = pool
        self.target = target
        self.count = channels
        self.streams = streams
        self.recycle_s = recycle_s
        self.max_slots = max(4 * channels, 16)
        self.slots: list[Slot] = []
        self.replacing: asyncio.Task | None = None
        self.retiring: set[asyncio.Task] = set()
        self._credentials = credentials
        self._options = options
        self._generation = 0
        self._lane_index = 0
        self._last_rotation = time.monotonic()
        self._coverage_attempts = 0
        self._next_repair = 0.0

    async def start(self) -> None:
        slots = [self.new_slot(i) for i in range(self.count)]
        await self.settle([slot.channel for slot in slots])
        lanes = await self.lanes_for_new_slot()
        for slot in slots:
            self.slots.append(slot)
            self.start_lanes(slot, lanes)

    async def lanes_for_new_slot(self) -> int:
        return lanes_per_slot(self.streams, await count_addresses(self.target),
                              len(self.pool.workers.coverage()))

    def new_slot(self, position: int) -> Slot:
        self._generation += 1
        # A distinct channel argument gives a distinct channel with its own
        # connections, hence new SO_REUSEPORT hashes.
        options = self._options + [("grpc.channel_index", self._generation)]
        if self._credentials is None:
            channel = grpc.aio.insecure_channel(self.target, options=options)
        else:
            channel = grpc.aio.secure_channel(self.target, self._credentials, options=options)
        return Slot(position, self._generation, channel)

    def add_lane(self, slot: Slot) -> Lane:
        self._lane_index += 1
        lane = Lane(self._lane_index, slot)
        slot.lanes.append(lane)
        return lane

    def start_lanes(self, slot: Slot, count: int) -> None:
        for _ in range(count):
            lane = self.add_lane(slot)
            slot.tasks.append(asyncio.create_task(self.pool.runner.run(lane), name=f"lane-{lane.index}"))

    async def settle(self, channels: list[grpc.aio.Channel], timeout_s: float = 1.0) -> bool:
        """round_robin only picks READY subchannels: streams opened while
        some replicas are still connecting would all land on the first one.
        Give the channels a moment to connect to all of them first."""
        async def ready(channel: grpc.aio.Channel) -> None:
            channel.get_state(try_to_connect=True)
            await channel.channel_ready()
        try:
            await asyncio.wait_for(asyncio.gather(*(ready(c) for c in channels)), timeout_s)
            await asyncio.sleep(SETTLE_S)
            return True
        except asyncio.TimeoutError:
            log.warning("wafsvc not reachable yet; streams will connect when it is",
                        extra={"target": self.target})
            return False

    def tasks(self) -> list[asyncio.Task]:
        tasks = [task for slot in self.slots for task in slot.tasks]
        if self.replacing is not None:
            tasks.append(self.replacing)
        return tasks + list(self.retiring)

    async def close(self) -> None:
        for slot in self.slots:
            await slot.channel.close()

    # -- keeping every worker of every replica reached -------------------
    async def maintain(self) -> None:
        while True:
            await asyncio.sleep(MAINTAIN_INTERVAL_S)
            if self.replacing is not None and not self.replacing.done():
                continue
            now = time.monotonic()
            if self.repair_coverage(now):
                continue
            if self.recycle_s > 0 and now - self._last_rotation >= self.recycle_s and self.slots:
                self._last_rotation = now
                oldest = min(self.slots, key=lambda slot: slot.opened)
                self.replace(oldest, "rotation")

    def repair_coverage(self, now: float) -> bool:
        coverage = self.pool.workers.coverage()
        missing = {replica for replica, (reached, count) in coverage.items() if reached < count}
        if not missing:
            self._coverage_attempts = 0
            return False
        if now < self._next_repair:
            return False
        self._coverage_attempts += 1
        self.pool.stats.coverage_repairs += 1
        fast = self._coverage_attempts <= COVERAGE_FAST_ATTEMPTS
        self._next_repair = now + (COVERAGE_COOLDOWN_S if fast else max(self.recycle_s, 5.0))
        if self._coverage_attempts == COVERAGE_FAST_ATTEMPTS:
            log.warning("some wafsvc workers still have no connection; retrying slowly",
                        extra={"coverage": coverage})
        spare = self.spare_slot()
        if spare is not None:
            self.replace(spare, "coverage")
        elif len(self.slots) < self.max_slots:
            self.add_slot()
        return True

    def spare_slot(self) -> Slot | None:
        """A slot whose every lane reaches a worker that another slot
        reaches too: replacing it loses nothing and rolls new hashes."""
        holders: dict[str, set[int]] = {}
        for slot in self.slots:
            for lane in slot.lanes:
                if lane.worker is not None and lane in lane.worker.lanes:
                    holders.setdefault(lane.worker.name, set()).add(slot.generation)
        for slot in sorted(self.slots, key=lambda s: s.opened):
            names = {lane.worker.name for lane in slot.lanes if lane.worker is not None}
            if all(len(holders.get(name, ())) > 1 for name in names):
                return slot
        return None

    def add_slot(self) -> None:
        slot = self.new_slot(len(self.slots))
        log.info("adding a gRPC channel to reach every wafsvc worker",
                 extra={"channels": len(self.slots) + 1, "coverage": self.pool.workers.coverage()})
        self.replacing = asyncio.create_task(self._bring_up(slot, None))

    def replace(self, old: Slot, why: str) -> None:
        self.pool.stats.recycles += 1
        log.debug("replacing a gRPC channel", extra={"why": why, "generation": old.generation})
        self.replacing = asyncio.create_task(self._bring_up(self.new_slot(old.position), old))

    async def _bring_up(self, slot: Slot, old: Slot | None) -> None:
        """New lanes first, then the old ones stop taking work and close once
        they have answered: nothing in flight is lost to a replacement."""
        try:
            await self.settle([slot.channel], CONNECT_TIMEOUT_S)
            if self.pool.closing:
                await slot.channel.close()
                return
            self.start_lanes(slot, await self.lanes_for_new_slot())
            until = time.monotonic() + CONNECT_TIMEOUT_S
            while any(lane.worker is None for lane in slot.lanes) and time.monotonic() < until:
                await asyncio.sleep(0.02)
            if old is None:
                self.slots.append(slot)
                return
            self.slots[self.slots.index(old)] = slot
            # In the background: an old lane may have to stay for responses
            # while coverage repair (which waits for this task) reaches its
            # worker again.
            retiring = asyncio.create_task(self._retire(old), name=f"retire-{old.generation}")
            self.retiring.add(retiring)
            retiring.add_done_callback(self.retiring.discard)
        except asyncio.CancelledError:
            for dropped in (slot, old):
                if dropped is not None and dropped not in self.slots:
                    for task in dropped.tasks:
                        task.cancel()
                    await dropped.channel.close()
            raise

    async def _retire(self, slot: Slot) -> None:
        pool = self.pool
        workers = pool.workers
        for lane in slot.lanes:
            lane.retired = True
            workers.stop_taking_work(lane, spare=lane.call is not None)
            queued, lane.queue = lane.queue, []
            for pending in queued:
                if not pending.done and pending.lane is lane:
                    pool.redispatch(pending)
        now = time.monotonic()
        answered_by, spare_until = now + pool.deadline_s, now + RESPONSE_GRACE_S
        try:
            while True:
                now = time.monotonic()
                owed = any(lane.sent or lane.queue for lane in slot.lanes) and now < answered_by
                needed = any(workers.needs(lane) for lane in slot.lanes) and now < spare_until
                if not owed and not needed:
                    break
                await asyncio.sleep(0.05)
        finally:
            for lane in slot.lanes:
                workers.forget(lane)
            for task in slot.tasks:
                task.cancel()
            await asyncio.gather(*slot.tasks, return_exceptions=True)
            await slot.channel.close()
