"""The cloud's session context manager (CE-CoLLM's "cloud context manager").

Each session owns one KV cache of the deep layers (a block table into the
model's KV pool, cloud_runtime/kv_cache.py) and the number of positions it
holds; a dropped session's blocks go back to the pool at once. The store keeps all KV caches under one byte budget: when a step
needs more, the least recently used *idle* sessions are evicted; an idle
session is also dropped after `ttl_s`. An evicted or unknown session answers
`unknown_session`, and the edge — which keeps every h_K row it sent — replays.

Everything here runs on the event loop thread; the model worker only touches
a session's cache while the session's lock is held by the request that
submitted the step.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

from cloud_runtime.kv_cache import KVCache
from cloud_runtime.metrics import CloudMetrics
from fogline.wire.errors import Overloaded, UnknownSession


@dataclass(eq=False)
class Session:
    sid: str
    cache: KVCache
    last_used: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # requests admitted and not finished; a session with users is never evicted
    closed: bool = False
    reserved: int = 0  # bytes accounted to this session
    high: int = 0  # highest position + 1 ever received (a row below it is a re-upload)
    # agreement checks settled since the session's last reply (an ack-less append has none)
    checked: int = 0
    agreed: int = 0

    def take_checks(self) -> tuple[int | None, int | None]:
        """The checks to report in this reply (None, None: none since the last), reset."""
        if not self.checked:
            return None, None
        out, self.checked, self.agreed = (self.checked, self.agreed), 0, 0
        return out

    @property
    def length(self) -> int:
        return self.cache.length

    @property
    def busy(self) -> bool:
        return self.users > 0


class SessionStore:
    def __init__(self, new_cache: Callable[[], KVCache], budget_bytes: int, ttl_s: float,
                 metrics: CloudMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._new_cache = new_cache
        self.budget = budget_bytes
        self.ttl_s = ttl_s
        self.metrics = metrics
        self.clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._gone: deque[tuple[str, str]] = deque(maxlen=4096)  # (sid, why) of recently dropped ones
        self.kv_bytes = 0
        metrics.kv_budget.set(budget_bytes)

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def get(self, sid: str) -> Session | None:
        s = self._sessions.get(sid)
        if s is not None:
            s.last_used = self.clock()
            self._sessions.move_to_end(sid)
        return s

    def unknown(self, sid: str) -> UnknownSession:
        why = next((w for s, w in reversed(self._gone) if s == sid), None)
        detail = f"was {why}" if why else "is unknown"
        return UnknownSession(f"session {sid} {detail}; replay its h_K from position 0",
                              session=sid, expected=0)

    def open(self, sid: str) -> Session:
        """A new, empty session (its first KV chunk is charged to the budget)."""
        cache = self._new_cache()
        s = Session(sid, cache, self.clock())
        self._make_room(cache.nbytes(), requester=None)
        s.reserved = cache.nbytes()
        self.kv_bytes += s.reserved
        self._sessions[sid] = s
        self._update()
        return s

    def reserve(self, s: Session, positions: int) -> None:
        """Make sure the session's cache can grow to `positions` within the budget."""
        need = s.cache.bytes_for(positions)
        if need <= s.reserved:
            return
        self._make_room(need - s.reserved, requester=s)
        self.kv_bytes += need - s.reserved
        s.reserved = need
        self._update()

    def sync(self, s: Session) -> None:
        """Re-account after the cache changed size (it may have been reallocated)."""
        actual = s.cache.nbytes()
        if actual != s.reserved and s.sid in self._sessions:
            self.kv_bytes += actual - s.reserved
            s.reserved = actual
            self._update()

    def _make_room(self, extra: int, requester: Session | None) -> None:
        if self.kv_bytes + extra <= self.budget:
            return
        for victim in list(self._sessions.values()):  # LRU order
            if self.kv_bytes + extra <= self.budget:
                break
            if victim is requester or victim.busy:
                continue
            self.drop(victim.sid, "evicted (KV memory budget)", reason="budget")
        if self.kv_bytes + extra > self.budget:
            raise Overloaded(f"KV budget of {self.budget} bytes is held by busy sessions; "
                             f"need {extra} more", retry_after=0.5)

    def drop(self, sid: str, why: str, reason: str = "closed") -> None:
        s = self._sessions.pop(sid, None)
        if s is None:
            return
        s.closed = True
        s.cache.release()  # never busy here (evict/reap skip busy ones, close holds the lock)
        self.kv_bytes -= s.reserved
        s.reserved = 0
        self._gone.append((sid, why))
        if reason != "closed":
            self.metrics.evictions.labels(reason).inc()
        self._update()

    def reap(self) -> int:
        """Drop sessions idle for longer than the TTL; returns how many."""
        now = self.clock()
        expired = [s.sid for s in self._sessions.values() if not s.busy and now - s.last_used > self.ttl_s]
        for sid in expired:
            self.drop(sid, f"expired (idle > {self.ttl_s:g} s)", reason="ttl")
        return len(expired)

    @asynccontextmanager
    async def use(self, s: Session) -> AsyncIterator[Session]:
        """Hold the session for one request: not evictable, requests of one session run in order."""
        s.users += 1
        try:
            async with s.lock:
                if s.closed:
                    raise self.unknown(s.sid)
                yield s
        finally:
            s.users -= 1
            s.last_used = self.clock()

    def _update(self) -> None:
        self.metrics.sessions.set(len(self._sessions))
        self.metrics.kv_bytes.set(self.kv_bytes)
