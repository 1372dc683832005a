"""Response inspection for one worker: requests evaluated with
inspect_response are kept in a HeldStore (wafsvc/held.py), and their
responses continue the same libmodsecurity transaction.

The handle a caller gets is "<worker name>#<nonce>.<token>": the worker name
is the stream metadata "x-waf-worker" ("<replica>/<pid>"), so the caller
knows where to send the response; the nonce is drawn when this object is
built in the worker, so a handle from a worker that died can never match a
transaction of a new worker that happens to get the same pid. A miss is
answered at once with NOT_FOUND and its reason:

- TRANSACTION_OTHER_WORKER: the handle names a live sibling worker, or
  another replica (we cannot tell whether it lives);
- TRANSACTION_UNKNOWN: never held here, already used, or held by a worker
  of this replica that is gone (died, restarted);
- TRANSACTION_EXPIRED / _EVICTED / _RELOADED: the store's reasons.

Every held transaction ends exactly once: with its response (logging runs
after phase 4, so the audit log has request and response as one entry), or
when the store ends it (logging runs then).
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets

from wafapi import waf_pb2
from wafsvc.errors import EvaluationFailed, invalid_field
from wafsvc.held import Gone, HeldStore, Reason
from wafsvc.transaction import Transaction

log = logging.getLogger("wafsvc.responses")

# glibc keeps freed memory for reuse: after a burst of held transactions (many
# small allocations each) RSS would stay at the burst's peak. Once the held
# count has fallen below half of a peak this large, malloc_trim gives it back.
TRIM_AFTER_PEAK = 256

MISS_REASONS = {Reason.EXPIRED: waf_pb2.TRANSACTION_EXPIRED, Reason.EVICTED: waf_pb2.TRANSACTION_EVICTED,
                Reason.RELOADED: waf_pb2.TRANSACTION_RELOADED, Reason.SHUTDOWN: waf_pb2.TRANSACTION_UNKNOWN,
                Reason.UNKNOWN: waf_pb2.TRANSACTION_UNKNOWN}


class TransactionMiss(EvaluationFailed):
    """The response's transaction is not here (NOT_FOUND)."""

    def __init__(self, reason: int, handle: str) -> None:
        name = waf_pb2.ErrorReason.Name(reason)
        super().__init__("NOT_FOUND", f"no held transaction for handle {handle!r}: {name}", reason)


class Responses:
    """The engine as the service sees it once responses are inspected:
    evaluate() keeps what asks to be kept, evaluate_response() continues it.
    Everything else passes through to the engine."""

    def __init__(self, engine, worker_id: str, ttl_ms: int, max_count: int, clock=None) -> None:
        self._engine = engine
        self.worker_id = worker_id
        self.ttl_ms = ttl_ms
        self._prefix = f"{worker_id}#{secrets.token_hex(4)}."
        kwargs = {"clock": clock} if clock is not None else {}
        self.store: HeldStore[Transaction] = HeldStore(ttl_ms / 1000, max_count, self._ended, **kwargs)
        self.misses = {reason: 0 for reason in waf_pb2.ErrorReason.values()}
        self._generation = engine.generation

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    # -- requests ----------------------------------------------------------
    def evaluate(self, req: waf_pb2.EvaluateRequest, verdict: waf_pb2.Verdict | None = None) -> waf_pb2.Verdict:
        if not req.inspect_response:
            return self._engine.evaluate(req, verdict)
        tx = self._engine.begin(req.application, req.ignore_rule_ids, req.transaction_id)
        policy = tx.policy
        # An application that does not inspect responses keeps nothing: the
        # verdict then has no handle, and the caller sends no response.
        verdict = tx.run_request(req, verdict, keep=policy.response_inspection)
        if tx.open:
            ttl_ms = policy.transaction_ttl_ms or self.ttl_ms
            token = self.store.put(tx, tx.generation, ttl_ms / 1000)
            verdict.transaction_handle = f"{self._prefix}{token:x}"
            verdict.transaction_ttl_ms = ttl_ms
        return verdict

    # -- responses ---------------------------------------------------------
    def evaluate_response(self, resp: waf_pb2.ResponseRequest,
                          verdict: waf_pb2.Verdict | None = None) -> waf_pb2.Verdict:
        if not 100 <= resp.status <= 999:
            raise invalid_field(f"response status must be 100 to 999, got {resp.status}")
        tx = self._take(resp.transaction_handle)
        return tx.run_response(resp, verdict)

    def _take(self, handle: str) -> Transaction:
        if not handle.startswith(self._prefix):
            raise self._miss(self._foreign(handle), handle)
        try:
            token = int(handle[len(self._prefix):], 16)
        except ValueError:
            raise invalid_field(f"malformed transaction_handle {handle!r}") from None
        try:
            return self.store.take(token)
        except Gone as gone:
            raise self._miss(MISS_REASONS[gone.reason], handle) from None

    def _foreign(self, handle: str) -> int:
        worker, sep, token = handle.rpartition("#")
        if not sep or not worker or not token:
            raise invalid_field(f"malformed transaction_handle {handle!r}: expected '<worker>#<token>'")
        if worker == self.worker_id:
            return waf_pb2.TRANSACTION_UNKNOWN   # this worker, but not this life of it
        replica, _, pid = worker.rpartition("/")
        if replica == self.worker_id.rpartition("/")[0] and not _sibling_alive(pid):
            return waf_pb2.TRANSACTION_UNKNOWN   # its worker is gone: died or restarted
        return waf_pb2.TRANSACTION_OTHER_WORKER

    def _miss(self, reason: int, handle: str) -> TransactionMiss:
        self.misses[reason] += 1
        return TransactionMiss(reason, handle)

    # -- the store's bounds ------------------------------------------------
    def sweep(self) -> int:
        """Ends expired transactions; the service calls it every second so
        an idle worker frees them too (a busy one does on every keep)."""
        ended = self.store.expire()
        if self.store.peak >= TRIM_AFTER_PEAK and len(self.store) * 2 < self.store.peak:
            _malloc_trim()
            self.store.reset_peak()
        return ended

    def rules_reloaded(self) -> None:
        """After a reload, held transactions finish on their own rules; those
        from two loads ago end (RELOADED), so at most one superseded rule
        set per application stays in memory, for at most the TTL."""
        generation = self._engine.generation
        if generation != self._generation:
            self._generation = generation
            ended = self.store.end_generations_before(generation - 1)
            if ended:
                log.warning("held transactions ended by a second reload within their TTL",
                            extra={"ended": ended})

    def close_all(self) -> int:
        """At shutdown: ends every held transaction (its audit entry is written)."""
        return self.store.clear(Reason.SHUTDOWN)

    @staticmethod
    def _ended(tx: Transaction, reason: Reason) -> None:
        tx.close()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("held transaction ended without its response",
                      extra={"unique_id": tx.id, "reason": reason.value})


def _sibling_alive(pid: str) -> bool:
    """A worker of this replica: a live process whose parent is ours."""
    if not pid.isdigit():
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    # Fields after the command name (which may hold spaces): state, ppid, ...
    fields = stat[stat.rfind(b")") + 2:].split()
    return len(fields) > 1 and int(fields[1]) == os.getppid()


def _load_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):   # not glibc: nothing to trim
        return lambda _pad: 0


_MALLOC_TRIM = _load_malloc_trim()


def _malloc_trim() -> None:
    _MALLOC_TRIM(0)
