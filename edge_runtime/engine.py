"""The edge engine: continuous batching over one llama.cpp context.

One model, one context, `parallel` KV sequences. Each `step()` is
schedule -> execute -> update, passing plain dataclasses (vLLM v1's cut):

* schedule: admit waiting requests into free sequences, then fill one batch of
  at most `batch_size` rows: one row per decoding sequence first (latency),
  then chunks of pending prompts (chunked prefill).
* execute: one `llama_decode` for all of them (h_K captured only when a
  sequence in the batch asked for it).
* update: each sequence whose input is fully decoded gets an `ExitStep` (the
  exit head's logits for its next position). A pluggable `TokenSource`, chosen
  by the request's mode, turns it into a `TokenChoice` now, or parks the
  sequence until `Engine.deliver()` hands one in (a cloud answer arriving
  later). The choice is appended, checked against the stop rules and emitted.

llama.cpp calls block, so the loop runs in one dedicated thread; consumers get
`StreamEvent`s through the `emit` callback they submitted with (the HTTP server
forwards them into its event loop). A cancelled request leaves the batch at
the next step boundary and its KV sequence is erased.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from edge_runtime.errors import ApiError, ErrorKind
from edge_runtime.llama_backend import BatchRow, DecodeError, LlamaContext, LlamaModel
from edge_runtime.sampling import Sampler, SamplingParams, StopMatcher, TokenChoice, Utf8Stream
from fogline.constraint import Constraint, apply_mask
from fogline.prompt_lookup import PromptLookup

log = logging.getLogger("fogline.edge.engine")

NO_CLOUD = "no cloud configured"


# --------------------------------------------------------------------------- requests and events


@dataclass
class GenerationRequest:
    """What a consumer asks the engine for; travels in full once, at submit."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    mode: str = "edge"  # requested mode: edge|collab|spec|cloud|auto
    capture_hidden: bool = False  # keep h_K of every position (needs an engine with a tap)
    tau: float | None = None  # collab threshold asked by the request (None: the source's default)
    gamma: int | None = None  # spec draft length for this request (auto's spec@γ; None: the source's default)
    constraint: Constraint | None = None  # structured output: this request's grammar matcher (fogline/constraint.py)
    timeline: bool = False  # record per-event timestamps (spec) into the stats; off by default: costs nothing


@dataclass
class FoglineStats:
    """Where a response's tokens came from; every response carries it as `fogline`."""

    mode: str
    fallback: str | None = None
    edge_tokens: int = 0
    cloud_tokens: int = 0
    lookup_tokens: int = 0  # edge tokens (emitted or accepted drafts) where prompt lookup overrode the exit head's argmax
    cloud_round_trips: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    # spec: drafts sent for verification, of those accepted, and verdicts that rejected one
    # (the auto policy learns acceptance from these; not part of the response)
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0
    # collab: exit tokens the cloud checked against the deep model's greedy token, and agreeing
    checked: int = 0
    agreed: int = 0
    auto: dict[str, object] | None = None  # the auto policy's decision, when the request asked for `auto`
    # each time the request left the cloud: {at_token, reason, rejoined_at_token (None: never came back)};
    # token counts are completion tokens emitted before that moment
    fallbacks: list[dict[str, object]] = field(default_factory=list)
    # spec timing (always counted, cheap): edge seconds spent drafting (sum of step intervals while a
    # block is held), drafted steps timed, verify round trips (send -> verdict) summed and counted
    draft_s: float = 0.0
    draft_steps: int = 0
    verify_s: float = 0.0
    verifies: int = 0
    # the request asked for a timeline: [event, seconds since request start, detail]; None: not recorded
    timeline: list[list[object]] | None = None
    t0: float = field(default_factory=time.monotonic)

    def mark(self, event: str, detail: object = None) -> None:
        """Append a timeline event when the request asked for one (a no-op otherwise)."""
        if self.timeline is not None:
            self.timeline.append([event, round(time.monotonic() - self.t0, 6), detail])

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"mode": self.mode, "edge_tokens": self.edge_tokens, "cloud_tokens": self.cloud_tokens,
                                "fallback": self.fallback, "cloud_round_trips": self.cloud_round_trips,
                                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                                "lookup_tokens": self.lookup_tokens}
        if self.checked:
            d["agreement"] = {"checked": self.checked, "agreed": self.agreed,
                              "rate": round(self.agreed / self.checked, 4)}
        if self.auto is not None:
            d["auto"] = self.auto
        if self.fallbacks:
            d["fallbacks"] = [dict(f) for f in self.fallbacks]
        if self.verifies:  # spec: what the pipeline bound needs (bench_collab)
            d["spec"] = {"drafted": self.drafted, "accepted": self.accepted, "verifies": self.verifies,
                         "verify_s": round(self.verify_s, 6), "draft_s": round(self.draft_s, 6),
                         "draft_steps": self.draft_steps}
        if self.timeline is not None:
            d["timeline"] = self.timeline
        return d


@dataclass(frozen=True)
class StreamEvent:
    """Engine -> consumer. A token event has `choice`; the last event has `finish_reason`."""

    request_id: str
    text: str = ""  # text that became safe to emit (stop strings withheld, UTF-8 whole)
    choice: TokenChoice | None = None
    finish_reason: str | None = None  # stop | length | cancelled | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stats: FoglineStats | None = None
    error: str | None = None
    at: float = field(default_factory=time.monotonic)  # when the engine produced it


Emit = Callable[[StreamEvent], None]


# --------------------------------------------------------------------------- token sources


class HiddenBuffer:
    """h_K of one sequence, one fp16 row per position, grown as positions are decoded."""

    def __init__(self, n_embd: int, capacity: int = 256) -> None:
        self._data = np.empty((capacity, n_embd), dtype=np.float16)
        self.n = 0

    def append(self, rows: np.ndarray) -> None:
        need = self.n + rows.shape[0]
        if need > self._data.shape[0]:
            grown = np.empty((max(need, 2 * self._data.shape[0]), self._data.shape[1]), dtype=np.float16)
            grown[:self.n] = self._data[:self.n]
            self._data = grown
        self._data[self.n:need] = rows
        self.n = need

    def truncate(self, n: int) -> None:
        """Forget positions >= n (a rejected speculative draft)."""
        self.n = min(self.n, n)

    def view(self, p0: int = 0, p1: int | None = None) -> np.ndarray:
        """Rows for positions [p0, p1) (a view: copy it before the sequence moves on)."""
        return self._data[p0:self.n if p1 is None else p1]


@dataclass
class ExitStep:
    """The exit head's output for one sequence at one position: what a token source decides on."""

    request: GenerationRequest
    position: int  # position the chosen token will occupy
    logits: np.ndarray  # [n_vocab] float32, the edge's own distribution (owned by this step)
    sampler: Sampler
    tokens: list[int]  # prompt + completion so far (read-only)
    hidden: HiddenBuffer | None  # h_K for positions [0, position) when captured
    stats: FoglineStats  # a source that talks to a cloud adds its round trips / bytes here
    held: int = 0  # speculative drafts held (not emitted) at positions [position - held, position)
    mask: bytes | None = None  # structured output: the bitmask already applied to `logits` (the cloud applies it too)
    hint: tuple[int, float] | None = None  # greedy: prompt-lookup (candidate, λ) for Sampler.choose


@dataclass(frozen=True)
class Draft:
    """A TokenSource's answer in `spec` mode: feed this token (so the edge drafts on past it) but
    hold it back until `Engine.deliver_verdict()` accepts it or rolls it back."""

    choice: TokenChoice


class TokenSource(Protocol):
    """Decides the token of one position. Registered per mode with `Engine.register_source`."""

    def decide(self, step: ExitStep) -> TokenChoice | Draft | None:
        """Return the token now, a Draft to hold, or None to park the sequence until `Engine.deliver()`
        (or `deliver_verdict()` / `fall_back()`)."""
        ...

    def release(self, request: GenerationRequest) -> None:
        """The request finished (or was cancelled): drop any state kept for it."""
        ...


class EdgeTokenSource:
    """Standalone mode: every token from the exit head (the GGUF's own logits)."""

    def __init__(self, model: LlamaModel) -> None:
        self._eog = tuple(t for t in range(model.n_vocab) if model.is_eog(t))

    def decide(self, step: ExitStep) -> TokenChoice:
        banned = self._eog if step.request.params.ignore_eos else ()
        return step.sampler.choose(step.logits, banned, step.hint)

    def release(self, request: GenerationRequest) -> None:
        pass


# --------------------------------------------------------------------------- internal state


@dataclass
class _Sequence:
    """A running request bound to one KV sequence (slot)."""

    req: GenerationRequest
    emit: Emit
    slot: int
    source: TokenSource
    sampler: Sampler
    stats: FoglineStats
    max_new: int
    tokens: list[int]  # everything fed or to be fed: prompt + completion
    n_past: int = 0  # positions already in the KV cache
    n_generated: int = 0
    parked: bool = False
    stopper: StopMatcher = field(default_factory=lambda: StopMatcher(()))
    utf8: Utf8Stream = field(default_factory=Utf8Stream)
    hidden: HiddenBuffer | None = None
    held: list[TokenChoice] = field(default_factory=list)  # drafts fed but not emitted (spec mode)
    parked_step: ExitStep | None = None  # the step a source parked on (re-decided after a kept verdict)

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.n_past


@dataclass
class SchedulerOutput:
    """One step's batch: the rows, and which sequences get logits from it."""

    rows: list[BatchRow]
    spans: list[tuple[_Sequence, int, int]]  # (sequence, first row, row count)
    outputs: list[_Sequence]  # sequences whose last pending token is in this batch, in row order
    capture: bool


@dataclass
class _SlotCache:
    """A free slot's KV content: the tokens of positions [0, len(tokens)), their h_K if captured."""

    tokens: list[int]
    hidden: HiddenBuffer | None
    finished: int  # order in which the slot was freed (LRU eviction)


@dataclass
class _Waiting:
    req: GenerationRequest
    emit: Emit
    enqueued: float


# --------------------------------------------------------------------------- the engine


class Engine:
    """Continuous-batching scheduler over a LlamaContext with `parallel` sequences."""

    def __init__(self, model: LlamaModel, ctx: LlamaContext, *, parallel: int, ctx_size: int,
                 batch_size: int, queue_size: int, retry_after_s: float = 1.0) -> None:
        if ctx.n_seq < parallel:
            raise ValueError(f"context has {ctx.n_seq} sequences, engine wants {parallel}")
        self.model = model
        self.ctx = ctx
        self.parallel = parallel
        self.ctx_size = ctx_size
        self.batch_size = min(batch_size, ctx.n_batch)
        self.queue_size = queue_size
        self.retry_after_s = retry_after_s
        self.can_capture = ctx.can_capture
        self._sources: dict[str, TokenSource] = {"edge": EdgeTokenSource(model)}
        self._lock = threading.Condition()
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._cancelled: set[str] = set()
        self._delivered: list[tuple[str, TokenChoice]] = []
        self._control: list[tuple[str, Callable[[_Sequence], None]]] = []  # verdicts, fallbacks
        self._running: dict[str, _Sequence] = {}
        self._free_slots = list(range(parallel))
        # what each free slot's KV still holds from its last request (engine thread only): a new
        # prompt that shares a prefix with it (a chat's system prompt and history) skips that
        # prefill, as llama.cpp's own server does; evicted least recently used first
        self._slot_cache: dict[int, _SlotCache] = {}
        self._finished = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self.prefix_reused = 0  # prompt positions not prefilled again thanks to a slot's cached prefix
        self.dead: str | None = None  # set when the loop died; the engine cannot recover
        # the bundle's prompt-lookup mixture (fogline.prompt_lookup), for greedy requests; None: off
        self.lookup: PromptLookup | None = None

    # ---- consumer side (any thread)

    def register_source(self, mode: str, source: TokenSource) -> None:
        """Make `mode` available (e.g. a cloud-backed source for collab/spec/cloud)."""
        self._sources[mode] = source

    def resolve_mode(self, requested: str) -> tuple[str, str | None]:
        """(mode actually used, fallback reason or None)."""
        if requested in self._sources:
            return requested, None
        return "edge", NO_CLOUD

    def check_fits(self, n_prompt: int, max_tokens: int | None) -> int:
        """Validate a request's size; return how many tokens it may generate."""
        if n_prompt < 1:
            raise ApiError(ErrorKind.INVALID_REQUEST, "the prompt is empty (0 tokens)", param="prompt")
        limit = self.ctx_size
        if n_prompt >= limit:
            raise ApiError(ErrorKind.CONTEXT_LENGTH_EXCEEDED,
                           f"This model's maximum context length is {limit} tokens. However, your prompt "
                           f"has {n_prompt} tokens, leaving no room for a completion.")
        if max_tokens is not None and n_prompt + max_tokens > limit:
            raise ApiError(ErrorKind.CONTEXT_LENGTH_EXCEEDED,
                           f"This model's maximum context length is {limit} tokens. However, you requested "
                           f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the "
                           f"completion). Please reduce the prompt or max_tokens.", param="max_tokens")
        return max_tokens if max_tokens is not None else limit - n_prompt

    def submit(self, req: GenerationRequest, emit: Emit) -> None:
        """Queue a request. Raises ApiError (400 too long, 429 queue full, 503 engine down)."""
        self.check_fits(len(req.prompt), req.params.max_tokens)
        if req.capture_hidden and not self.can_capture:
            raise ApiError(ErrorKind.INVALID_REQUEST, "hidden-state capture is off on this edge "
                           "(set capture_hidden = true)", param="capture_hidden")
        with self._lock:
            if self.dead is not None or self._stopping:
                raise ApiError(ErrorKind.UNAVAILABLE, f"the edge engine is not running: {self.dead or 'stopping'}")
            if len(self._waiting) >= self.queue_size + len(self._free_slots):
                raise ApiError(ErrorKind.RATE_LIMITED,
                               f"{len(self._running)} requests running and {len(self._waiting)} waiting "
                               f"(queue_size {self.queue_size}); retry later", retry_after=self.retry_after_s)
            self._waiting.append(_Waiting(req, emit, time.monotonic()))
            self._lock.notify()

    def cancel(self, request_id: str) -> None:
        """Stop a request (client gone). Idempotent; unknown or finished ids are ignored."""
        with self._lock:
            self._cancelled.add(request_id)
            self._lock.notify()

    def deliver(self, request_id: str, choice: TokenChoice) -> None:
        """Hand in the token a TokenSource deferred (returned None for); resumes the sequence."""
        with self._lock:
            self._delivered.append((request_id, choice))
            self._lock.notify()

    def deliver_verdict(self, request_id: str, start: int, accepted: int, correction: TokenChoice,
                        applied: Callable[[], None] | None = None,
                        draft_logprobs: Sequence[tuple[float | None, tuple[tuple[int, float], ...]]] | None = None
                        ) -> None:
        """Settle the held drafts from position `start`: emit the first `accepted`, then the cloud's
        `correction` for position start+accepted. A held draft there equal to the correction is kept
        (with everything drafted after it: the pipelined next block); otherwise the edge rolls back
        exactly — KV cells, tokens, h_K rows — and continues from the correction. `applied` runs on
        the engine thread once this is done (a source syncs its own state there). `draft_logprobs`:
        the verifier's own (logprob, top_logprobs) of the accepted drafts, reported instead of the
        edge's (an accepted draft is a token of the deep model's distribution)."""
        def apply(seq: _Sequence) -> None:
            self._apply_verdict(seq, start, accepted, correction, applied, draft_logprobs)
        self._queue_control(request_id, apply, None)

    def fall_back(self, request_id: str, reason: str, applied: Callable[[], None] | None = None, *,
                  rejoin: bool = False) -> None:
        """The cloud failed this request: emit its held drafts as edge tokens and continue in edge
        mode. rejoin=False: for good (the edge source takes over). rejoin=True: the request's own
        source stays in charge and answers from the exit head until it takes the cloud back
        (`FoglineStats.fallbacks` records both moments)."""
        def apply(seq: _Sequence) -> None:
            self._apply_fallback(seq, reason, applied, rejoin=rejoin)
        self._queue_control(request_id, apply, None)

    def abort(self, request_id: str, error: str) -> None:
        """End a request now with finish_reason "error" (a bug on its path, not a cloud failure:
        the HTTP layer answers 500 / an SSE error event)."""
        def apply(seq: _Sequence) -> None:
            self._finish(seq, "error", error=error)
        self._queue_control(request_id, apply, None)

    def _queue_control(self, request_id: str, apply: Callable[[_Sequence], None],
                       applied: Callable[[], None] | None) -> None:
        def run(seq: _Sequence) -> None:
            apply(seq)
            if applied is not None:
                applied()
        with self._lock:
            self._control.append((request_id, run))
            self._lock.notify()

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    @property
    def n_running(self) -> int:
        return len(self._running)

    def generate(self, req: GenerationRequest) -> Iterator[StreamEvent]:
        """Blocking convenience for in-process callers: yields events until the finish event."""
        import queue

        q: queue.SimpleQueue[StreamEvent] = queue.SimpleQueue()
        self.submit(req, q.put)
        try:
            while True:
                ev = q.get()
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            self.cancel(req.request_id)

    # ---- lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fogline-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the loop; running and waiting requests end with finish_reason 'cancelled'."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stopping and not self._has_work():
                        self._lock.wait()
                    if self._stopping:
                        break
                self.step()
        except BaseException as e:  # the loop must not die silently
            log.exception("engine loop died")
            self.dead = f"{type(e).__name__}: {e}"
        self._abort_all("cancelled" if self.dead is None else "error", self.dead)

    def _has_work(self) -> bool:
        if self._cancelled or self._delivered or self._control:
            return True
        if self._waiting and self._free_slots:
            return True
        return any(s.pending and not s.parked for s in self._running.values())

    # ---- the step

    def step(self) -> bool:
        """One schedule -> execute -> update round. Returns whether anything was decoded."""
        self._apply_control()
        sched = self._schedule()
        if not sched.rows:
            return False
        try:
            res = self.ctx.decode(sched.rows, capture_hidden=sched.capture)
        except DecodeError as e:
            log.error("decode failed for %d sequences: %s", len(sched.spans), e)
            for seq, _, _ in sched.spans:
                self._finish(seq, "error", error=str(e))
            return False
        self.steps += 1
        self._update(sched, res.logits, res.hidden)
        return True

    def _apply_control(self) -> None:
        """Take cancellations, deliveries and admissions queued by other threads."""
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            delivered, self._delivered = self._delivered, []
            control, self._control = self._control, []
            if cancelled:
                self._waiting = collections.deque(w for w in self._waiting if w.req.request_id not in cancelled)
            admitted = []
            while self._waiting and self._free_slots:
                w = self._waiting.popleft()
                slot = self._pick_slot(w.req)
                self._free_slots.remove(slot)
                admitted.append((w, slot))
        for rid in cancelled:
            seq = self._running.get(rid)
            if seq is not None:
                self._finish(seq, "cancelled")
        for rid, choice in delivered:
            seq = self._running.get(rid)
            if seq is not None and seq.parked:
                seq.parked = False
                seq.parked_step = None
                self._accept(seq, choice)
        for rid, run in control:
            seq = self._running.get(rid)
            if seq is not None:
                run(seq)
        for w, slot in admitted:
            self._admit(w, slot)

    def _reusable(self, slot: int, req: GenerationRequest) -> int:
        """Prompt positions whose KV (and h_K, when the request captures it) `slot` already holds.
        At least the last prompt token is always decoded again: its logits start the completion."""
        cache = self._slot_cache.get(slot)
        if cache is None:
            return 0
        n = 0
        for a, b in zip(cache.tokens, req.prompt[:-1]):
            if a != b:
                break
            n += 1
        if req.capture_hidden:
            n = min(n, cache.hidden.n if cache.hidden is not None else 0)
        return n

    def _pick_slot(self, req: GenerationRequest) -> int:
        """The free slot holding the longest prefix of the prompt; else the least recently used."""
        def key(slot: int) -> tuple[int, int]:
            cache = self._slot_cache.get(slot)
            return self._reusable(slot, req), -(cache.finished if cache is not None else -1)
        return max(self._free_slots, key=key)

    def _admit(self, w: _Waiting, slot: int) -> None:
        req = w.req
        mode, fallback = self.resolve_mode(req.mode)
        reuse = self._reusable(slot, req)
        cache = self._slot_cache.pop(slot, None)
        self.ctx.remove(slot, reuse)  # the slot keeps only the reused prefix, whatever happened before
        hidden = None
        if req.capture_hidden:
            hidden = HiddenBuffer(self.model.n_embd, capacity=max(256, reuse))
            if reuse:
                assert cache is not None and cache.hidden is not None
                hidden.append(cache.hidden.view(0, reuse))
        seq = _Sequence(req=req, emit=w.emit, slot=slot, source=self._sources[mode],
                        sampler=Sampler(req.params, self.model.n_vocab),
                        stats=FoglineStats(mode=mode, fallback=fallback, timeline=[] if req.timeline else None),
                        max_new=self.check_fits(len(req.prompt), req.params.max_tokens),
                        tokens=list(req.prompt), stopper=StopMatcher(req.params.stop), hidden=hidden,
                        n_past=reuse)
        self.prefix_reused += reuse
        self._running[req.request_id] = seq

    def _schedule(self) -> SchedulerOutput:
        budget = self.batch_size
        ready = [s for s in self._running.values() if s.pending and not s.parked]
        # the budget goes to decoding sequences first (one row each), then to prompt chunks
        ready.sort(key=lambda s: s.pending > 1)
        take: list[tuple[_Sequence, int]] = []
        for seq in ready:
            if budget <= 0:
                break
            n = min(seq.pending, budget)
            take.append((seq, n))
            budget -= n
        # rows in slot order: llama.cpp computes consecutive sequences in one micro-batch
        take.sort(key=lambda t: t[0].slot)
        rows: list[BatchRow] = []
        spans: list[tuple[_Sequence, int, int]] = []
        outputs: list[_Sequence] = []
        for seq, n in take:
            first = len(rows)
            rows.extend(BatchRow(seq.tokens[p], p, seq.slot, False) for p in range(seq.n_past, seq.n_past + n))
            if n == seq.pending:
                rows[-1].output = True
                outputs.append(seq)
            spans.append((seq, first, n))
        capture = any(seq.hidden is not None for seq, _ in take)
        return SchedulerOutput(rows=rows, spans=spans, outputs=outputs, capture=capture)

    def _update(self, sched: SchedulerOutput, logits: np.ndarray, hidden: np.ndarray | None) -> None:
        for seq, first, n in sched.spans:
            seq.n_past += n
            if seq.hidden is not None and hidden is not None:
                seq.hidden.append(hidden[first:first + n])
        for i, seq in enumerate(sched.outputs):
            step = ExitStep(request=seq.req, position=seq.n_past, logits=logits[i], sampler=seq.sampler,
                            tokens=seq.tokens, hidden=seq.hidden, stats=seq.stats)
            if seq.req.constraint is not None and not self._constrain(seq, step):
                continue
            if self.lookup is not None and seq.sampler.takes_lookup:
                step.hint = self.lookup.hint(seq.tokens)
            self._decide(seq, step)

    def _constrain(self, seq: _Sequence, step: ExitStep) -> bool:
        """Structured output: bring the request's matcher to its tokens so far (drafts included,
        rolled-back ones undone) and mask the exit logits before any sampling or confidence test.
        False: the matcher failed (the request finished with an error)."""
        c = seq.req.constraint
        assert c is not None
        c.sync(seq.tokens[len(seq.req.prompt):step.position])
        if c.error is not None:
            self._finish(seq, "error", error=f"structured output: {c.error[:300]}")
            return False
        step.mask = c.bitmask()
        apply_mask(step.logits, c.allowed(step.mask))
        return True

    def _decide(self, seq: _Sequence, step: ExitStep) -> None:
        step.held = len(seq.held)
        choice = seq.source.decide(step)
        if choice is None:
            seq.parked = True
            seq.parked_step = step
        elif isinstance(choice, Draft):
            seq.held.append(choice.choice)
            seq.tokens.append(choice.choice.token)  # decoded next step, emitted on a verdict
        else:
            self._accept(seq, choice)

    def _apply_verdict(self, seq: _Sequence, start: int, accepted: int, correction: TokenChoice,
                       applied: Callable[[], None] | None = None,
                       draft_logprobs: Sequence[tuple[float | None, tuple[tuple[int, float], ...]]] | None = None
                       ) -> None:
        """`applied` runs once the verdict is settled and before the source is asked to decide
        again: a source that re-decides while it still believes a verdict is in flight parks forever."""
        rid = seq.req.request_id
        first = len(seq.tokens) - len(seq.held)  # position of the first held draft
        if start != first or accepted > len(seq.held):
            log.error("verdict for %s at %d (+%d) does not match its held drafts at %d (+%d)",
                      rid, start, accepted, first, len(seq.held))
            self._apply_fallback(seq, "cloud verdict out of step with the edge", applied)
            return
        keep = accepted < len(seq.held) and seq.held[accepted].token == correction.token
        n_held = len(seq.held)
        emit, seq.held = seq.held[:accepted], seq.held[accepted + 1:] if keep else []
        cut = start + accepted  # the correction's position
        # kept: the held draft at the correction matched (the pipelined block survives); rolled_back: held
        # drafts were discarded; settled: every held draft was accepted, nothing was held past them
        seq.stats.mark("kept" if keep else "rolled_back" if accepted < n_held else "settled", accepted)
        if not keep:
            del seq.tokens[cut:]
            seq.n_past = min(seq.n_past, cut)
            self.ctx.remove(seq.slot, cut)
            if seq.hidden is not None:
                seq.hidden.truncate(cut)
        if applied is not None:
            applied()
        if draft_logprobs is not None and len(draft_logprobs) == len(emit):
            emit = [replace(c, logprob=lp, top_logprobs=top) for c, (lp, top) in zip(emit, draft_logprobs)]
        for ch in [replace(c, origin="draft") for c in emit] + ([correction] if keep else []):
            self._accept(seq, ch, append=False)
            if rid not in self._running:
                return
        if not keep:
            seq.parked, seq.parked_step = False, None
            self._accept(seq, correction)
        elif seq.parked and seq.parked_step is not None:
            step, seq.parked, seq.parked_step = seq.parked_step, False, None
            self._decide(seq, step)

    def _apply_fallback(self, seq: _Sequence, reason: str, applied: Callable[[], None] | None = None, *,
                        rejoin: bool = False) -> None:
        rid = seq.req.request_id
        if seq.stats.fallback is None:  # the first reason: why the request did not run as asked
            seq.stats.fallback = reason
        seq.stats.fallbacks.append({"at_token": seq.n_generated, "reason": reason, "rejoined_at_token": None})
        if not rejoin:
            seq.source.release(seq.req)
            seq.source = self._sources["edge"]
        held, seq.held = seq.held, []
        if applied is not None:
            applied()
        for ch in held:
            self._accept(seq, ch, append=False)
            if rid not in self._running:
                return
        if seq.parked and seq.parked_step is not None:
            step, seq.parked, seq.parked_step = seq.parked_step, False, None
            self._decide(seq, step)

    def _accept(self, seq: _Sequence, choice: TokenChoice, *, append: bool = True) -> None:
        """Append a chosen token (append=False: a held draft, already in `tokens`), apply the stop
        rules, emit what became visible."""
        tok = choice.token
        seq.sampler.observe(tok)
        seq.n_generated += 1
        seq.stats.mark("token", choice.origin)
        if choice.origin == "cloud":
            seq.stats.cloud_tokens += 1
        else:
            seq.stats.edge_tokens += 1
            seq.stats.lookup_tokens += choice.lookup
        if self.model.is_eog(tok) and not seq.req.params.ignore_eos:
            self._emit(seq, StreamEvent(seq.req.request_id, choice=choice))
            self._finish(seq, "stop")
            return
        text, hit = seq.stopper.push(seq.utf8.push(self.model.token_bytes(tok)))
        self._emit(seq, StreamEvent(seq.req.request_id, text=text, choice=choice))
        if hit:
            self._finish(seq, "stop", flush=False)
        elif seq.n_generated >= seq.max_new or len(seq.tokens) + 1 - len(seq.held) > self.ctx_size:
            self._finish(seq, "length")
        elif append:
            seq.tokens.append(tok)

    def _finish(self, seq: _Sequence, reason: str, *, flush: bool = True, error: str | None = None) -> None:
        rid = seq.req.request_id
        if self._running.pop(rid, None) is None:
            return
        text = ""
        if flush and reason in ("stop", "length"):
            text = seq.stopper.push(seq.utf8.flush())[0] + seq.stopper.flush()
        if reason != "error":  # its KV holds exactly tokens[:n_past] (also when cancelled): keep it for a next prompt
            self._finished += 1
            if seq.hidden is not None:
                seq.hidden.truncate(seq.n_past)
            self._slot_cache[seq.slot] = _SlotCache(seq.tokens[:seq.n_past], seq.hidden, self._finished)
        else:  # a failed decode: hand the slot back empty
            self.ctx.remove(seq.slot)
        with self._lock:
            self._free_slots.append(seq.slot)
            self._free_slots.sort()
        try:
            seq.source.release(seq.req)
        except Exception:
            log.exception("token source failed to release %s", rid)
        self._emit(seq, StreamEvent(rid, text=text, finish_reason=reason, prompt_tokens=len(seq.req.prompt),
                                    completion_tokens=seq.n_generated, stats=seq.stats, error=error))

    @staticmethod
    def _emit(seq: _Sequence, ev: StreamEvent) -> None:
        """A consumer that fails (its event loop closed) must not take the engine down."""
        try:
            seq.emit(ev)
        except Exception:
            log.exception("consumer of %s failed to take an event", ev.request_id)

    def _abort_all(self, reason: str, error: str | None) -> None:
        for seq in list(self._running.values()):
            self._finish(seq, reason, error=error)
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for w in waiting:
            mode, fallback = self.resolve_mode(w.req.mode)
            w.emit(StreamEvent(w.req.request_id, finish_reason=reason, prompt_tokens=len(w.req.prompt),
                               stats=FoglineStats(mode=mode, fallback=fallback), error=error))

    # ---- introspection (tests, /health)

    def kv_positions(self, slot: int) -> int:
        """Highest position held in a slot's KV sequence (-1: empty). Engine thread or idle engine only."""
        return self.ctx.seq_pos_max(slot)

    def cached_prefix(self, slot: int) -> int:
        """Positions a free slot keeps for prefix reuse (0: none). Engine thread or idle engine only."""
        cache = self._slot_cache.get(slot)
        return 0 if cache is None else len(cache.tokens)

    def hidden_of(self, request_id: str) -> np.ndarray | None:
        seq = self._running.get(request_id)
        return None if seq is None or seq.hidden is None else seq.hidden.view().copy()
