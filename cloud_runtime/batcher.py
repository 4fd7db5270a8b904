"""Cross-session batching: steps of different sessions that are ready together
run as one `forward_ragged` pass.

The loop (vLLM's step, in miniature): take the first waiting step, gather
more, run the pass in the model thread, hand each step its logits rows,
repeat. While a pass runs, new steps queue up, so a busy server batches
without waiting at all. Gathering waits only for sessions that are *expected*:
answered recently, and due back within about twice their own usual think time
(answer to next step). It stops as soon as every expected session has a step in
the batch or the last one's due time has passed — a lone session never waits,
and one whose peers went quiet (closed, thinking longer than usual) waits at
most their due time, not a window — or when no new step arrived for
`window` seconds (the gap between arrivals, not the total: steps of many
sessions trickle in over a few ms after a pass answers them all), or after 20
windows in all.

A step carries h_K rows (`hidden`) or, for the whole model (cloud_runtime/full_model.py,
the cloud-only baseline), token ids (`tokens`) that the model thread embeds: both kinds
share one pass, one KV pool and the same kernels.

A step's `finish` callback runs in the model thread on that step's logits
(sampling, verification), so torch never runs on the event loop.

What a step reports besides its result (the edge's `auto` policy reads them from the reply):
`queue_s`, how long it waited from submit to the start of its pass, and `pass_s`, how long
that batched pass took; and for agreement checks (`check`: row offsets and the edge's tokens
after them) the count of rows where the deep model's greedy token equals the edge's (`agreed`),
computed in the same pass from the same logits, one extra head row per check.

Which queued steps go first (`schedule`):

* `vdf` (default) — Edge-LLM's value density: every step is worth the same (one edge
  waiting on one answer) and is due at its deadline (arrival + `step_deadline_s` for an
  infer/verify, `LAZY_DEADLINE_FACTOR` times that for a lazy append nobody waits on).
  A step that can still make its deadline has density 1 / (slack x rows): the nearest
  deadline and the cheapest to finish first. A step whose slack is below one pass can no
  longer make it; those go after every step that still can, oldest first (so none starves
  while the load lasts: their edges fall back to edge mode at their own deadline anyway).
* `fifo` — arrival order.

The queue is bounded: beyond `max_queue` waiting steps `submit` raises `overloaded` with a
Retry-After of about the time the queue needs to drain; the edge retries after it until its
own cloud deadline, then finishes in edge mode (a slow cloud and an overloaded one look the
same to it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cloud_runtime.deep_model import DeepModel, Segment
from cloud_runtime.metrics import CloudMetrics
from cloud_runtime.sessions import Session
from fogline.aio import cancel_and_wait
from fogline.wire.errors import InternalError, Overloaded, ShuttingDown

log = logging.getLogger("fogline.cloud.batcher")


@dataclass(eq=False)
class Step:
    """h_K rows [start, start+T) of one session, and what to do with the logits."""

    session: Session
    start: int
    hidden: np.ndarray | None  # [T, D] float32 (None when `tokens` are given)
    logit_rows: str  # "none" (append), "last" (infer), "all" (verify)
    finish: Callable[[torch.Tensor | None], Any]  # runs in the model thread; its result is the step's
    future: asyncio.Future[Any] = field(default=None)  # type: ignore[assignment]
    queued_at: float = 0.0
    # when the answer is due, on the batcher's clock; None: arrival + the batcher's step deadline
    deadline: float | None = None
    seq: int = 0  # arrival order
    tokens: np.ndarray | None = None  # [T] int64 token ids instead of `hidden` (whole model only)
    check: tuple[tuple[int, int], ...] = ()  # (row offset, edge token after that row): agreement checks
    # filled by the batcher: queue wait and pass time (seconds), checks that agreed
    queue_s: float = 0.0
    pass_s: float = 0.0
    agreed: int = 0

    @property
    def rows(self) -> int:
        return int((self.hidden if self.tokens is None else self.tokens).shape[0])


SCHEDULES = ("vdf", "fifo")
LAZY_DEADLINE_FACTOR = 4.0  # a lazy append (no edge waits on it) is due this many step deadlines later
EXPECT_SLACK_MAX_S = 0.005  # an expected session may come back up to min(window, this) past 2 x its think time


class _StepQueue(asyncio.Queue):  # type: ignore[type-arg]
    """An asyncio.Queue whose `get` returns the waiting step with the least `priority(step, now)`
    (computed when taken, since slack shrinks while a step waits; O(n) with n <= max_queue)."""

    def __init__(self, priority: Callable[[Step, float], tuple[Any, ...]], clock: Callable[[], float]) -> None:
        self._priority, self._clock = priority, clock
        super().__init__()

    def _init(self, maxsize: int) -> None:
        self._queue: list[Step] = []

    def _put(self, item: Step) -> None:
        self._queue.append(item)

    def _get(self) -> Step:
        now = self._clock()
        best = min(range(len(self._queue)), key=lambda i: self._priority(self._queue[i], now))
        return self._queue.pop(best)

    def rows(self) -> int:
        return sum(s.rows for s in self._queue)


class Batcher:
    def __init__(self, model: DeepModel, metrics: CloudMetrics, *, window_s: float, max_tokens: int,
                 max_queue: int, executor: ThreadPoolExecutor, schedule: str = "vdf",
                 step_deadline_s: float = 0.25, clock: Callable[[], float] = time.perf_counter) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        self.model = model
        self.metrics = metrics
        self.window_s = window_s
        self.max_tokens = max_tokens
        self.max_queue = max_queue
        self.executor = executor
        self.schedule = schedule
        self.step_deadline_s = step_deadline_s
        self.clock = clock  # deadlines and slack (tests drive it virtually)
        self._seq = itertools.count()
        self._pass_clock = 0.0  # moving average of a pass's duration on `clock`
        self._queue = _StepQueue(self._priority, clock)
        self._task: asyncio.Task[None] | None = None
        self._answered: dict[int, float] = {}  # id(session) -> when its last step was answered
        self._think: dict[int, float] = {}  # id(session) -> moving average of answer -> next step
        self._pass_s = 0.0  # moving average of a pass's duration
        self._closed = False
        self.passes = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="fogline-batcher")

    async def stop(self) -> None:
        self._closed = True
        if self._task is not None:
            await cancel_and_wait(self._task)
        while not self._queue.empty():
            step = self._queue.get_nowait()
            if not step.future.done():
                step.future.set_exception(ShuttingDown("server is shutting down", retry_after=1.0))

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def submit(self, step: Step) -> Any:
        if self._closed:
            raise ShuttingDown("server is shutting down", retry_after=1.0)
        if self._queue.qsize() >= self.max_queue:
            # about the time the queue needs to drain: passes of max_tokens rows at the current pass time
            drain = self._pass_s * (1 + self._queue.rows() / max(1, self.max_tokens))
            raise Overloaded(f"{self._queue.qsize()} steps are waiting for the model",
                             retry_after=round(min(5.0, max(0.05, drain)), 3))
        step.future = asyncio.get_running_loop().create_future()
        step.queued_at = time.perf_counter()
        step.seq = next(self._seq)
        if step.deadline is None:
            lazy = LAZY_DEADLINE_FACTOR if step.logit_rows == "none" else 1.0
            step.deadline = self.clock() + lazy * self.step_deadline_s
        key = id(step.session)
        if (answered := self._answered.pop(key, None)) is not None:
            gap = step.queued_at - answered
            prev = self._think.get(key)
            self._think[key] = gap if prev is None else 0.7 * prev + 0.3 * gap
        self._queue.put_nowait(step)
        try:
            return await asyncio.shield(step.future)
        except asyncio.CancelledError:
            # The caller holds the session lock: never release it while the model thread may
            # still be writing this session's cache.
            if not step.future.done():
                await asyncio.wait({step.future})
            raise

    def _priority(self, s: Step, now: float) -> tuple[Any, ...]:
        """Sort key of a queued step: least first (see the module doc)."""
        if self.schedule == "fifo":
            return (0, s.seq)
        assert s.deadline is not None
        slack = s.deadline - now
        if slack < self._pass_clock:  # cannot make it any more: after all that still can, oldest first
            return (1, s.seq)
        return (0, -1.0 / (max(slack, 1e-9) * s.rows), s.seq)

    def _expected(self, now: float) -> dict[int, float]:
        """Sessions answered recently that should submit again soon -> by when: their answer +
        twice their usual think time + one window (at most EXPECT_SLACK_MAX_S) of slack.
        Sessions quiet past the horizon are forgotten."""
        horizon = max(0.2, 4 * self._pass_s)
        keep: dict[int, float] = {}
        expected: dict[int, float] = {}
        for k, t in self._answered.items():
            if now - t > horizon:
                self._think.pop(k, None)
                continue
            keep[k] = t
            think = self._think.get(k)
            if think is not None and (due := t + 2 * think + min(self.window_s, EXPECT_SLACK_MAX_S)) > now:
                expected[k] = due
        self._answered = keep
        return expected

    async def _gather(self) -> list[Step]:
        first = await self._queue.get()
        batch, tokens = [first], first.rows
        now = time.perf_counter()
        waiting_for = self._expected(now)
        waiting_for.pop(id(first.session), None)
        hard_deadline = now + 20 * self.window_s
        while tokens < self.max_tokens:
            if self._queue.empty():
                t = time.perf_counter()
                # never past the last expected session's due time: one that does not come back
                # (closed, thinking) costs its peers at most that, not a window
                remaining = min(self.window_s, hard_deadline - t, max(waiting_for.values(), default=t) - t)
                if remaining <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                nxt = self._queue.get_nowait()
            if tokens + nxt.rows > self.max_tokens and batch:
                self._queue.put_nowait(nxt)  # goes to the back; fine: it runs in the next pass
                break
            batch.append(nxt)
            waiting_for.pop(id(nxt.session), None)
            tokens += nxt.rows
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            batch = [s for s in batch if not s.future.done()]
            if not batch:
                continue
            now = time.perf_counter()
            for s in batch:
                s.queue_s = now - s.queued_at
                self.metrics.queue_wait_seconds.observe(s.queue_s)
            c0 = self.clock()
            try:
                results = await loop.run_in_executor(self.executor, self._execute, batch)
                for s in batch:
                    s.pass_s = time.perf_counter() - now
                dc = self.clock() - c0
                self._pass_clock = dc if self.passes <= 1 else 0.8 * self._pass_clock + 0.2 * dc
            except Exception as e:  # a model failure: the sessions' caches may be half-written
                log.exception("forward pass over %d steps failed", len(batch))
                for s in batch:
                    s.session.cache.truncate(s.start)
                    if not s.future.done():
                        s.future.set_exception(InternalError(f"deep-layer pass failed: {type(e).__name__}: "
                                                             f"{str(e)[:200]}"))
                continue
            answered = time.perf_counter()
            for s, r in zip(batch, results):
                self._answered[id(s.session)] = answered
                if s.future.done():
                    continue
                if isinstance(r, BaseException):
                    s.future.set_exception(r)
                else:
                    s.future.set_result(r)

    def _input(self, s: Step) -> torch.Tensor:
        """The step's rows entering the deep layers: its h_K, or its tokens' embeddings."""
        if s.tokens is None:
            return torch.from_numpy(s.hidden)
        return self.model.embed(torch.from_numpy(s.tokens).to(self.model.device))

    def _execute(self, batch: list[Step]) -> list[Any]:
        """Model thread: one ragged pass, then each step's finish on its logits rows."""
        t0 = time.perf_counter()
        segments = [Segment(self._input(s), s.session.cache, s.start) for s in batch]
        normed = self.model.forward_ragged(segments)
        rows: list[int] = []
        off = 0
        for s in batch:
            if s.logit_rows == "last":
                rows.append(off + s.rows - 1)
            elif s.logit_rows == "all":
                rows.extend(range(off, off + s.rows))
            rows.extend(off + r for r, _ in s.check)  # agreement checks: one more head row each
            off += s.rows
        # to the CPU once per pass: sampling and verification are tiny and use CPU generators
        logits = self.model.logits(normed[rows]).cpu() if rows else None
        results: list[Any] = []
        i = 0
        for s in batch:
            n = 0 if s.logit_rows == "none" else (1 if s.logit_rows == "last" else s.rows)
            mine = logits[i:i + n] if (logits is not None and n) else None
            i += n
            if s.check:
                assert logits is not None
                greedy = logits[i:i + len(s.check)].argmax(dim=-1).tolist()
                s.agreed = sum(int(g == t) for g, (_, t) in zip(greedy, s.check))
                i += len(s.check)
            try:
                results.append(s.finish(mine))
            except Exception as e:  # a bug in one step's post-processing fails that step only
                log.exception("finishing a step of session %s failed", s.session.sid)
                results.append(InternalError(f"post-processing failed: {type(e).__name__}"))
        dt = time.perf_counter() - t0
        self._pass_s = dt if self.passes == 0 else 0.8 * self._pass_s + 0.2 * dt
        self.passes += 1
        self.metrics.forward_seconds.observe(dt)
        self.metrics.batch_sessions.observe(len(batch))
        self.metrics.batch_rows.observe(off)
        self.metrics.tokens.inc(off)
        return results
