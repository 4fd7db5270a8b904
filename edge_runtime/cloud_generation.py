"""`cloud` mode on the edge: every token comes from the deep layers.

The loop is the smallest possible split inference:

    h = edge(prompt)                    # llama.cpp layers [0, K), h_K of every prompt token
    loop:
        token = await cloud.infer(h)    # deep layers [K, L) + head, on the cloud
        h = edge([token])               # h_K of the new token, for the next step

`CloudSession` is the edge's record of one cloud session: it keeps the h_K rows
it has produced (float16, the newest `history_tokens` of them when bounded), so when the cloud answers `unknown_session` (evicted,
expired, restarted) it replays them, and on `position_gap` it resynchronises
from the position the cloud reports (Petals' rule: retry and replay live in the
client, which holds the history). `overloaded` and a dropped link are retried
with backoff. `verify` and `append_lazy` are the hooks the collab/spec modes use.

Torch-free: llama.cpp on one side, the websocket client on the other.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from edge_runtime.cloud_client import CloudLink, InferResult, Meter, VerifyResult
from edge_runtime.ratelog import RateLimitedLog
from fogline.wire.codecs import FP16_MAX
from fogline.wire.errors import LinkDown, Overloaded, PositionGap, ShuttingDown, UnknownSession
from fogline.wire.protocol import GREEDY, Sampling

T = TypeVar("T")
ratelog = RateLimitedLog(logging.getLogger("fogline.edge.cloud"))
# (tokens, position of tokens[0]) -> h_K rows [len(tokens), D] float32
EdgeStep = Callable[[Sequence[int], int], Awaitable[np.ndarray]]


class ReplayImpossible(Exception):
    """The cloud needs h_K rows the edge no longer keeps (older than `history_tokens`)."""


class CloudSession:
    """One sequence's state at the cloud, with the h_K history needed to rebuild it.

    History: the h_K rows are kept as float16 (clipped to the fp16 range exactly as the fp16
    wire codec does, so a replay over the default codec sends the very bytes the first upload
    sent; over fp32/int8 a replay is fp16-rounded). The rows handed to infer/verify/append_lazy
    go up the first time from the caller's own float32 array, not from the fp16 copy. With `history_tokens` set, the
    newest `history_tokens` rows are always kept and at most max(2·history_tokens, the
    largest single batch of rows recorded) are held (older rows are dropped in amortised
    compactions), and a row the cloud has not received yet (position >= cloud_len) is never
    dropped. Nothing is
    refused up front: a request may run far past the bound as long as the cloud keeps its
    session. Only when the cloud needs rows before the oldest kept one (it lost the session:
    eviction, TTL, restart; or a position gap below it) does the send raise
    `ReplayImpossible`, which the daemon's modes turn into an edge-mode fallback with that
    reason.
    """

    def __init__(self, link: CloudLink, sid: str | None = None, *, max_retries: int = 6,
                 backoff_s: float = 0.25, history_tokens: int | None = None, meter: Meter | None = None) -> None:
        self.link = link
        self.sid = sid or f"edge-{uuid.uuid4().hex}"
        # this session's frames, as sent and received (a caller may share one Meter across sessions)
        self.meter = meter if meter is not None else Meter()
        link.attach(self.sid, self.meter)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.history_tokens = history_tokens
        self._h: np.ndarray | None = None  # [capacity, D] float16: rows of positions [base, n)
        self.base = 0  # position of _h[0]; positions < base were dropped by the bound
        self.n = 0  # positions recorded on the edge
        self.cloud_len = 0  # positions the cloud holds, as far as we know
        self.replays = 0  # times the cloud lost the session and we replayed it
        self.resyncs = 0  # position gaps repaired

    @property
    def history(self) -> np.ndarray:
        """The kept rows, positions [base, n), float16."""
        return self._h[:self.n - self.base] if self._h is not None else np.empty((0, 0), np.float16)

    def record(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        if rows.ndim != 2:
            raise ValueError(f"h_K rows must be [n, D], got {rows.shape}")
        if self.n < self.base:  # rolled back below the kept window: it is empty now
            self.base = self.n
        rows16 = np.clip(rows, -FP16_MAX, FP16_MAX).astype(np.float16)
        if self._h is None:
            cap = max(256, len(rows)) if self.history_tokens is None else max(len(rows), 2 * self.history_tokens)
            self._h = np.empty((cap, rows.shape[1]), np.float16)
        kept = self.n - self.base
        if kept + len(rows) > len(self._h):
            drop = 0
            if self.history_tokens is not None:  # drop the oldest rows the cloud already has
                drop = max(0, min(self.n + len(rows) - self.history_tokens, self.cloud_len) - self.base)
                drop = min(drop, kept)
            if kept - drop + len(rows) > len(self._h):
                grown = np.empty((max(2 * len(self._h), kept - drop + len(rows)), self._h.shape[1]), np.float16)
                grown[:kept - drop] = self._h[drop:kept]
                self._h = grown
            elif drop:
                self._h[:kept - drop] = self._h[drop:kept].copy()
            self.base += drop
            kept -= drop
        self._h[kept:kept + len(rows)] = rows16
        self.n += len(rows)

    def rows(self, lo: int, hi: int, fresh: np.ndarray | None = None) -> np.ndarray:
        """float32 h_K of positions [lo, hi); `fresh` = the caller's rows of [hi - len(fresh), hi)."""
        hi = min(hi, self.n)
        fs = hi - len(fresh) if fresh is not None else hi
        if lo < self.base and lo < fs:
            raise ReplayImpossible(
                f"the cloud needs h_K from position {lo} but the edge keeps only positions >= {self.base} "
                f"(replay_history_tokens={self.history_tokens})")
        old = self._h[lo - self.base:max(lo, fs) - self.base].astype(np.float32) if lo < fs else None
        new = np.asarray(fresh[max(lo, fs) - fs:], np.float32) if fresh is not None else None
        if old is None:
            return new if new is not None else np.empty((0, self._h.shape[1] if self._h is not None else 0),
                                                        np.float32)
        return old if new is None or not len(new) else np.concatenate([old, new])

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run `call` (which sends from self.cloud_len), repairing the session between tries."""
        for attempt in range(self.max_retries + 1):
            try:
                return await call()
            except UnknownSession:
                self.cloud_len = 0  # evicted / expired / server restarted: replay from scratch
                self.replays += 1
                ratelog.log("replay", logging.INFO, "cloud lost session %s: replaying its %d h_K rows",
                            self.sid, self.n)
                err: Exception = UnknownSession(f"session {self.sid} keeps disappearing")
            except PositionGap as e:
                await self._resync(e.expected if e.expected is not None else 0)
                err = e
            except (Overloaded, ShuttingDown) as e:
                await asyncio.sleep(e.retry_after or self.backoff_s * 2 ** attempt)
                err = e
            except LinkDown as e:
                await asyncio.sleep(self.backoff_s * 2 ** attempt)
                err = e
        raise err

    async def _resync(self, expected: int) -> None:
        """The cloud holds `expected` positions of this session (ours: they came from us)."""
        self.resyncs += 1
        target = min(expected, max(self.n - 1, 0))  # keep at least one row to send
        if target < expected:
            try:
                target = await self.link.truncate(self.sid, target)
            except UnknownSession:
                target = 0
                self.replays += 1
        self.cloud_len = target

    async def infer(self, rows: np.ndarray, sampling: Sampling = GREEDY, top_n: int = 0,
                    logprobs: int | None = None, mask: bytes | None = None,
                    check: dict[int, int] | None = None) -> InferResult:
        """Record h_K of the next positions and get the token that follows them.
        check: position -> the edge's own token after it, for the cloud to check (collab)."""
        self.record(rows)

        async def call() -> InferResult:
            return await self.link.infer(self.sid, self.cloud_len, self.rows(self.cloud_len, self.n, rows), sampling,
                                         top_n, logprobs, mask=mask, check=check)

        res = await self._retrying(call)
        self.cloud_len = res.length
        return res

    async def append_lazy(self, rows: np.ndarray, check: dict[int, int] | None = None) -> None:
        """Record and upload without waiting (collab mode); failures surface on the next call.
        check: as in `infer` (its counts come back with the session's next reply)."""
        self.record(rows)
        try:
            self.cloud_len = await self.link.append(self.sid, self.cloud_len,
                                                    self.rows(self.cloud_len, self.n, rows), ack=False, check=check)
        except (LinkDown, ShuttingDown):
            pass  # the next infer/verify replays what is missing
        except UnknownSession:  # an earlier append's deferred answer: the cloud lost the session
            self.cloud_len = 0
            self.replays += 1
        except PositionGap as e:  # an earlier append's deferred answer: resync; the next call resends
            await self._resync(e.expected if e.expected is not None else 0)

    async def verify(self, rows: np.ndarray, draft: Sequence[int], sampling: Sampling = GREEDY,
                     draft_probs: Any = None, logprobs: int | None = None,
                     masks: tuple[bytes, ...] | None = None) -> VerifyResult:
        """rows: h_K of positions [n, n+len(rows)); draft[i] proposes position n+i+1.

        After the verdict the edge and the cloud both hold `result.length` positions; the
        caller must also drop the rejected positions from its own llama.cpp cache.
        """
        start = self.n
        self.record(rows)

        async def call() -> VerifyResult:
            if self.cloud_len < start:  # bring the cloud up to `start` first (replay / lazy rows)
                self.cloud_len = await self.link.append(self.sid, self.cloud_len, self.rows(self.cloud_len, start))
            elif self.cloud_len > start:
                self.cloud_len = await self.link.truncate(self.sid, start)
            return await self.link.verify(self.sid, start, self.rows(start, self.n, rows), draft, sampling,
                                          draft_probs, logprobs, masks=masks)

        res = await self._retrying(call)
        self.n = self.cloud_len = res.length
        return res

    async def rewind(self, length: int) -> None:
        """Forget positions >= length on both sides."""
        self.n = min(self.n, length)
        if self.cloud_len > length:
            try:
                self.cloud_len = await self.link.truncate(self.sid, length)
            except (UnknownSession, LinkDown):
                self.cloud_len = 0

    async def close(self) -> None:
        try:
            await self.link.close_session(self.sid)
        except Exception:  # best effort: the cloud's TTL reaper frees it otherwise
            pass


_ctx_locks: dict[int, threading.Lock] = {}


class LlamaEdgeStep:
    """EdgeStep over one llama.cpp sequence: runs layers [0, K) in a worker thread, returns h_K."""

    def __init__(self, ctx: Any, seq: int = 0) -> None:
        self.ctx, self.seq = ctx, seq
        self._lock = _ctx_locks.setdefault(id(ctx), threading.Lock())  # a context is not thread-safe

    async def __call__(self, tokens: Sequence[int], start: int) -> np.ndarray:
        return await asyncio.to_thread(self._run, list(tokens), start)

    def _run(self, tokens: list[int], start: int) -> np.ndarray:
        from edge_runtime.llama_backend import prefill

        with self._lock:
            if start == 0:
                self.ctx.remove(self.seq)  # a fresh sequence
            res = prefill(self.ctx, tokens, seq=self.seq, start=start, capture_hidden=True)
        if res.hidden is None:
            raise RuntimeError("the llama.cpp context has no h_K tap (create it with tap_layer=K-1)")
        return res.hidden


async def generate_cloud(edge_step: EdgeStep, link: CloudLink, prompt: Sequence[int], max_new_tokens: int,
                         sampling: Sampling = GREEDY, stop_tokens: Sequence[int] = (), top_n: int = 0,
                         session: CloudSession | None = None) -> AsyncIterator[InferResult]:
    """Yield the cloud's tokens for `prompt`, one at a time (stop tokens are yielded, then stop)."""
    cs = session or CloudSession(link)
    stop = set(stop_tokens)
    try:
        h = await edge_step(prompt, 0)
        pos = len(prompt)
        for i in range(max_new_tokens):
            res = await cs.infer(h, sampling, top_n)
            yield res
            if res.token in stop or i == max_new_tokens - 1:
                break
            h = await edge_step([res.token], pos)
            pos += 1
    finally:
        if session is None:
            await asyncio.shield(cs.close())
