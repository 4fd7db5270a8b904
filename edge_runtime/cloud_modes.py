"""`cloud`, `collab` and `spec` modes inside the edge daemon: TokenSources backed by the cloud.

The engine thread calls `decide(step)`. A source that needs the cloud copies the h_K rows
it must send, schedules the call on the daemon's event loop
(`asyncio.run_coroutine_threadsafe`) and returns None (the sequence parks) or, in spec mode,
a `Draft`. The coroutine answers through `Engine.deliver` / `deliver_verdict` / `fall_back`.
All cloud I/O of one request runs under one asyncio lock, so its frames leave in the order
the engine produced them.

* `cloud`  — every token from the deep layers: `infer` with the rows not uploaded yet.
* `collab` — CE-CoLLM: the edge's token is emitted when its confidence >= τ (request
  `fogline_tau`, else the bundle's calibrated τ, else config `tau`); otherwise `infer`. The
  confidence is the exit head's max probability, or, for greedy requests with prompt lookup on,
  the max probability of the lookup mixture (fogline/prompt_lookup.py) the bundle's τ was
  calibrated on. Rows of edge-emitted positions go up lazily: the prompt's rows as soon as prefill
  produced them, then a background `append` (no ack) once `LAZY_BATCH` rows are pending, the
  rest piggybacked on the next `infer`. A row is recorded once in the request's CloudSession
  and sent from `cloud_len` only, so no position goes up twice (the cloud would refuse an
  overlap as `position_gap` anyway); a replay happens only after the cloud lost the session.
  Live agreement: for a `collab_check_share` of the tokens the exit emits (picked by a hash of
  the position, so deterministic), the frame carrying that position's row also carries the exit
  head's own greedy token there (`check`); the cloud compares it with the deep model's greedy
  token in the same pass and returns the counts (`fogline.agreement`, and what `auto` learns
  collab's a_τ from). Nothing extra is sent for it but a pair of ints per checked token.
* `spec`   — LayerSkip over the network with PicoSpec's pipeline: the edge drafts a block of γ
  tokens (held, not emitted), sends their h_K with `verify`, and keeps drafting the next block
  while the verdict is in flight. The engine emits the accepted drafts + the cloud's
  correction; a held draft equal to the correction survives (with the block after it),
  anything else is rolled back exactly (llama.cpp seq_rm, tokens, h_K rows) and the cloud
  truncates past the accepted prefix itself.

  Sampling (temperature > 0), exactly how it is done:
    1. the edge draws each draft d_i from a sparse q_i and sends q_i whole: q_i is its sampler's
       distribution (exit head logits, logit bias and penalties, banned EOS under ignore_eos,
       temperature T, top-k, top-p) cut to its `DRAFT_TOP` (= 32) most likely ids and
       renormalised (edge_runtime/sampling.py `Sampler.draft`). q_i is 0 on every other id,
       and the drafted token is always in it with its own q_i(d_i) > 0 (the protocol refuses a
       verify whose q lacks its draft);
    2. the cloud computes p_i (temperature, top-k, top-p applied to the deep logits; see
       cloud_runtime/sampling.py `judge`), rebuilds q_i as a dense vector and accepts d_i with
       probability min(1, p_i(d_i) / q_i(d_i)) using a uniform draw keyed by (seed, position);
    3. on the first rejection it samples the correction from norm(max(0, p_i − q_i)) with the
       same keyed generator, and the block ends; if every draft is accepted the bonus token is
       sampled from p at the next position.
  Speculative sampling's output is distributed as p for *any* draft distribution the verifier
  knows exactly; drawing from the truncated q (instead of the full exit-head distribution, of
  which only the top entries could travel) makes the q the cloud uses the true one, so the
  rule is exact, not an approximation: every output token is distributed as the exported split
  model's p (tests/test_spec_exact.py measures it against cloud-mode sampling). The cost: ≤ 32
  (id, prob) pairs per draft in the verify frame; the price of the cut is only acceptance
  (q misses the exit head's tail), never correctness.

  Reproducibility: with a seed, the edge sampler's stream and the cloud's position-keyed
  draws are deterministic, but block boundaries are not if γ adapts to measured timings and
  the next block is drafted while a verdict is in flight (a bonus token is drawn from p, a
  drafted one through accept/residual — different functions of the same randomness). So a
  request with temperature > 0 AND a seed runs spec mode with a fixed γ = spec_gamma and no
  pipelined block: the same seed then gives the same completion. Unseeded sampling and greedy
  keep the adaptive, pipelined schedule.

  γ rule (per request): start at `spec_gamma`; after a verdict that accepted the whole block
  γ ← γ + 1, else γ ← max(1, accepted + 1); γ ≤ γ_max = max(2·spec_gamma, ⌈RTT / t_draft⌉)
  where t_draft is the edge's measured time per drafted token and RTT the link's ping EMA:
  on a slow link a longer block keeps the edge busy for one round trip, on a fast link or a
  poor exit head short blocks waste less. The pipelined next block is capped at γ too.

  Confidence stop (`spec_stop` c, default 0.5): a position whose exit confidence is below c is
  not drafted; the block so far goes to the cloud (an empty block: the cloud picks the token,
  one row), and a pipelined block ends there. A rejected draft costs the cloud a deep-layer and an
  LM-head row for nothing, so c trades tokens per round trip for cloud rows per token
  (`python tools/bench_exit.py --bundle DIR` replays both per c). Exactness is unchanged: whether
  a position is drafted depends only on the drafts before it.

Supervision: every coroutine a source puts on the loop (infer, verify, lazy append, close)
runs inside `_CloudSource._guarded`, and each whole exchange — waiting for the request's lock
included — runs under `cloud_deadline_ms`. So none can vanish or park its request:
  * a cloud failure (`CLOUD_FAILURES`: link errors, a typed ProtocolError the session could
    not repair, the deadline, ReplayImpossible) ends the request's cloud use: the engine emits
    its held drafts and continues in edge mode with `fallback` set (the HTTP request never
    fails because of the cloud);
  * anything else is a bug on the edge's cloud path: it is logged with its traceback and the
    request ends with finish_reason "error" (HTTP 500 / an SSE error event), never a quiet
    "cloud unavailable".
An error the cloud sent back for an ack-less append is raised by the session's next request
(CloudLink defers it per session); one still pending when the request finishes is recorded in
that request's `fallbacks` and logged.

Rejoin: a fallback is not forever. The request's source stays in charge (answering from the
exit head) and takes the cloud back once the link is up and a ping has come back since the
failure, at least `REJOIN_BACKOFF_S` (doubling per fallback, at most `MAX_REJOINS` times)
after it. Rejoining opens a fresh cloud session and sends it the request's whole h_K history
from the engine's HiddenBuffer (a replay: the edge-made tokens' rows included), so the cloud
continues exactly where the edge is. `fogline.fallbacks` lists each departure with its token
index, reason and `rejoined_at_token`; `fallback` keeps the first reason.

Bytes: `bytes_up`/`bytes_down`/`cloud_round_trips` are read from the request's Meter, which
CloudLink fills with the websocket frames it really sent and received for the request's
session(s) — replays, retries, resyncs and rejoins included (see cloud_client.py).

Replay history: each request's CloudSession keeps its h_K rows as float16, bounded by config
`replay_history_tokens` (the newest rows; rows the cloud has not received yet are never
dropped). A request longer than the bound is NOT cut short: it keeps using the cloud while
the cloud keeps its session. Only if the cloud then loses the session (restart, eviction,
TTL) or reports a position gap below the oldest kept row does the request fall back, with
`fallback` = "cloud lost the session and replay is impossible: the cloud needs h_K from
position 0 but the edge keeps only positions >= N (replay_history_tokens=B)".

Torch-free (tests/test_edge_imports.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
import concurrent.futures
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from edge_runtime.cloud_client import CloudLink, Meter
from edge_runtime.cloud_generation import CloudSession, ReplayImpossible
from edge_runtime.engine import Draft, Engine, ExitStep, FoglineStats, GenerationRequest
from edge_runtime.ratelog import RateLimitedLog
from edge_runtime.sampling import SamplingParams, TokenChoice
from fogline.constraint import pack_mask
from fogline.wire.errors import FoglineError, ProtocolError
from fogline.wire.protocol import Sampling

log = logging.getLogger("fogline.edge.modes")
ratelog = RateLimitedLog(log)

LAZY_BATCH = 8  # collab: pending edge rows that trigger a background append
DRAFT_TOP = 32  # spec sampling: entries of q sent with each draft
CLOUD_MODES = ("collab", "spec", "cloud")
REJOIN_BACKOFF_S = 0.5  # a request takes the cloud back no sooner than this after leaving it (doubles)
MAX_REJOINS = 8  # then it stays on the edge


class DeadlineExceeded(Exception):
    """A cloud exchange (lock wait included) took longer than cloud_deadline_ms."""


# What counts as the cloud failing (-> edge fallback). Anything else raised on the cloud path is a bug.
CLOUD_FAILURES: tuple[type[BaseException], ...] = (ProtocolError, DeadlineExceeded, ReplayImpossible, OSError,
                                                   asyncio.TimeoutError, aiohttp.ClientError)


def wire_sampling(p: SamplingParams) -> Sampling:
    return Sampling(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed)


class CloudBridge:
    """The daemon's one cloud link: connection upkeep with backoff + jitter, RTT by ping, and
    the bridge between the engine thread and the event loop."""

    def __init__(self, link: CloudLink, loop: asyncio.AbstractEventLoop, *, deadline_s: float,
                 history_limit: int, tau: float, spec_gamma: int, ping_s: float = 2.0,
                 check_share: float = 0.25, on_fallback: Callable[[str, str], None] | None = None,
                 spec_stop: float = 0.0) -> None:
        self.link, self.loop = link, loop
        self.deadline_s = deadline_s or None
        self.history_limit = history_limit
        self.tau, self.spec_gamma, self.ping_s = tau, spec_gamma, ping_s
        self.check_share = check_share  # collab: share of edge-emitted tokens the cloud checks
        self.spec_stop = spec_stop  # spec: no draft where the exit head's confidence is below this
        self.on_fallback = on_fallback
        self.rtt_s: float | None = None  # EMA of ping round trips
        # spec verdicts, discounted: accepted drafts and verdicts that rejected one (auto's acceptance)
        self._accepted = self._rejected = 0.0
        self.last_error: str | None = None
        self.reconnects = 0
        self.last_ok = 0.0  # monotonic time of the last ping answered
        self._wanted_until = 0.0  # want_link(): reconnect eagerly until then
        self._task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self.link.connected

    def observe_verdict(self, accepted: int, drafted: int) -> None:
        """A spec verdict: `accepted` of `drafted` drafts (drafts after a rejection are never judged)."""
        self._accepted = 0.98 * self._accepted + accepted
        self._rejected = 0.98 * self._rejected + (1 if accepted < drafted else 0)

    @property
    def cloud_queue_ms(self) -> float | None:
        """EMA of the time a step waits in the cloud's batcher queue, as the cloud reports it."""
        return self.link.cloud_queue_ms

    @property
    def cloud_step_ms(self) -> float | None:
        """EMA of the cloud's batched deep-layer pass time, as the cloud reports it."""
        return self.link.cloud_step_ms

    @property
    def acceptance(self) -> float | None:
        """Per-token acceptance of the edge's drafts, accepted / (accepted + rejections); None before any."""
        n = self._accepted + self._rejected
        return self._accepted / n if n > 0 else None

    def state(self) -> dict[str, Any]:
        return {"configured": True, "connected": self.connected, "url": self.link.url,
                "rtt_ms": None if self.rtt_s is None else round(self.rtt_s * 1000, 3),
                "reconnects": self.reconnects, "last_error": self.last_error}

    def start(self) -> None:
        self._task = self.loop.create_task(self._upkeep(), name="fogline-cloud-upkeep")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        await self.link.close()

    async def _upkeep(self) -> None:
        """Keep the link up: reconnect with exponential backoff and full jitter; ping for RTT.
        `last_ok` (monotonic) is when a ping last came back: proof that the link carries traffic."""
        backoff = 0.2
        was_up = False
        down_since: float | None = None
        while True:
            try:
                if not self.link.connected:
                    if down_since is None:
                        down_since = time.monotonic()
                    await self.link.connect()
                    if was_up:
                        self.reconnects += 1
                        ratelog.log("reconnect", logging.INFO, "cloud link back after %.1f s (reconnect #%d)",
                                    time.monotonic() - down_since, self.reconnects)
                    was_up, backoff, self.last_error, down_since = True, 0.2, None, None
                rtt = await asyncio.wait_for(self.link.ping(), max(self.ping_s, 5.0))
                self.rtt_s = rtt if self.rtt_s is None else 0.8 * self.rtt_s + 0.2 * rtt
                self.last_ok = time.monotonic()
                await self._nap(self.ping_s)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # unreachable, refused, handshake refused, timeout
                if self.last_error is None:
                    ratelog.log("link-down", logging.WARNING, "cloud link down: %s: %s", type(e).__name__, e)
                self.last_error = f"{type(e).__name__}: {e}"
                await self._nap(random.uniform(0, backoff))
                backoff = min(backoff * 2, 10.0)

    async def _nap(self, seconds: float) -> None:
        """Sleep, but no longer than ~1 s while the link is down and a request waits to rejoin."""
        start = time.monotonic()
        while (now := time.monotonic()) < start + seconds:
            if now - start >= 1.0 and not self.link.connected and now < self._wanted_until:
                return
            await asyncio.sleep(min(0.25, start + seconds - now))

    def schedule(self, coro: Coroutine[Any, Any, Any], what: str = "cloud call") -> bool:
        """Run `coro` on the loop (from the engine thread). False if the loop is gone (shutdown).
        Sources pass only `_guarded` coroutines; the callback is the net under that net."""
        try:
            fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:  # loop closed
            coro.close()
            return False

        def done(f: concurrent.futures.Future[Any]) -> None:
            if not f.cancelled() and (e := f.exception()) is not None:
                log.error("%s escaped its supervisor", what, exc_info=e)
        fut.add_done_callback(done)
        return True

    def want_link(self) -> None:
        """A request waits to rejoin: keep reconnect attempts at most ~1 s apart for a while."""
        self._wanted_until = time.monotonic() + 5.0

    async def call(self, aw: Awaitable[Any]) -> Any:
        """One cloud exchange under the deadline."""
        if self.deadline_s is None:
            return await aw
        try:
            return await asyncio.wait_for(aw, self.deadline_s)
        except (asyncio.TimeoutError, TimeoutError):
            raise DeadlineExceeded(f"cloud slower than cloud_deadline_ms ({self.deadline_s * 1000:.0f} ms)") from None


def _why(e: BaseException) -> str:
    if isinstance(e, DeadlineExceeded):
        return str(e)
    if isinstance(e, ReplayImpossible):
        return f"cloud lost the session and replay is impossible: {e}"
    if isinstance(e, FoglineError):
        return f"cloud error: {e}"
    return f"cloud unavailable: {type(e).__name__}: {e}"


@dataclass
class _Req:
    """One request's cloud state (engine thread fields + loop thread fields, see each). A rejoin
    replaces it with a fresh one (new session, new lock): coroutines of the old one see
    `failed` and do nothing."""

    cs: CloudSession
    stats: FoglineStats  # the request's response stats (bytes and round trips synced from `cs.meter`)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    recorded: int = 0  # engine thread: h_K rows handed to the cloud session so far (positions [0, recorded))
    failed: bool = False
    # rejoin bookkeeping (engine thread, except failed_at/rejoinable set with `failed`)
    failed_at: float = 0.0  # monotonic time of the failure
    rejoinable: bool = True  # False: the request cannot use the cloud again (no h_K, a bug)
    left: bool = False  # the engine applied the fallback (its `fallbacks` entry exists)
    rejoins: int = 0  # times this request took the cloud back so far
    # spec
    inflight: bool = False
    block_start: int = 0
    block_len: int = 0
    gamma: int = 4
    t_last: float = 0.0
    t_draft: float = 0.0  # EMA seconds per edge step
    q: dict[int, tuple[tuple[int, float], ...]] = field(default_factory=dict)  # spec sampling: position -> q
    seeded: bool = False  # spec: sampled with a seed -> fixed γ, no pipelining (reproducible)
    masks: dict[int, bytes] = field(default_factory=dict)  # structured output, spec: position -> packed mask
    # collab: agreement checks not sent yet, row position -> the exit head's greedy token after it
    checks: dict[int, int] = field(default_factory=dict)
    check_from: int = 0  # collab: rows below this are not checked (prompt, or history before a rejoin)


class _CloudSource:
    """Shared plumbing of the three cloud-backed sources: per-request state, supervised
    coroutines, fallback and rejoin."""

    mode = "cloud"

    def __init__(self, engine: Engine, bridge: CloudBridge) -> None:
        self.engine, self.bridge = engine, bridge
        self._eog = tuple(t for t in range(engine.model.n_vocab) if engine.model.is_eog(t))
        self._reqs: dict[str, _Req] = {}
        self._mu = threading.Lock()

    def _session(self, meter: Meter | None = None) -> CloudSession:
        return CloudSession(self.bridge.link, max_retries=8, backoff_s=0.2, history_tokens=self.bridge.history_limit,
                            meter=meter)

    def _state(self, step: ExitStep) -> _Req:
        rid = step.request.request_id
        with self._mu:
            st = self._reqs.get(rid)
            if st is None:
                st = self._reqs[rid] = _Req(self._session(), step.stats,
                                            gamma=step.request.gamma or self.bridge.spec_gamma)
        return st

    def release(self, request: GenerationRequest) -> None:
        with self._mu:
            st = self._reqs.pop(request.request_id, None)
        if st is None:
            return
        self._sync_bytes(st)
        if (err := self.bridge.link.deferred(st.cs.sid)) is not None:
            # the cloud refused a background upload and no later call of this request raised it
            why = _why(err)
            log.warning("request %s: %s (answer to a background upload)", request.request_id, why)
            if st.stats.fallback is None:
                st.stats.fallback = why
            st.stats.fallbacks.append({"at_token": st.stats.edge_tokens + st.stats.cloud_tokens, "reason": why,
                                       "rejoined_at_token": None})
        if st.recorded:
            self._close_later(request.request_id, st)

    def _close_later(self, rid: str, st: _Req) -> None:
        async def close() -> None:
            async with st.lock:
                await st.cs.close()
        self.bridge.schedule(self._guarded(rid, st, "session close", close, quiet=True), "session close")

    def _sync_bytes(self, st: _Req) -> None:
        """The response's figures are the meter's: frames really sent and received."""
        m = st.cs.meter
        st.stats.bytes_up, st.stats.bytes_down, st.stats.cloud_round_trips = m.up, m.down, m.round_trips
        st.stats.checked, st.stats.agreed = m.checked, m.agreed

    async def _guarded(self, rid: str, st: _Req, what: str, body: Callable[[], Awaitable[None]], *,
                       quiet: bool = False) -> None:
        """Run one cloud coroutine of request `rid` so that its failure always ends somewhere:
        a cloud failure -> edge fallback, anything else -> logged traceback + the request ends
        with an error. quiet: after the request (close): only log."""
        try:
            await body()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            try:
                if isinstance(e, CLOUD_FAILURES):
                    if quiet:
                        log.debug("request %s: %s failed: %s", rid, what, e)
                    else:
                        self._fail(rid, st, _why(e))
                else:
                    log.error("request %s: %s raised a bug on the edge's cloud path", rid, what, exc_info=e)
                    if not quiet:
                        self._crash(rid, st, f"{what}: {type(e).__name__}: {e}")
            except Exception as e2:  # the handling itself failed: still end the request
                log.error("request %s: handling the failure of %s failed", rid, what, exc_info=e2)
                if not quiet:
                    self.engine.abort(rid, f"internal error on the edge's cloud path ({what}): {e2!r}")
        finally:
            if not quiet:  # after the request (its Close): the response's figures are final
                self._sync_bytes(st)

    def _exchange(self, st: _Req, fn: Callable[[], Awaitable[Any]]) -> Awaitable[Any]:
        """fn() under the request's lock, the whole of it (lock wait included) under the deadline.
        Resolves to None when the request's cloud use ended meanwhile."""
        async def locked() -> Any:
            async with st.lock:
                if st.failed:
                    return None
                return await fn()
        return self.bridge.call(locked())

    def _spawn(self, step: ExitStep, st: _Req, what: str, body: Callable[[], Awaitable[None]]) -> None:
        rid = step.request.request_id
        if not self.bridge.schedule(self._guarded(rid, st, what, body), what):
            self._fail(rid, st, "the edge's event loop is gone (shutting down)")

    def _edge_choice(self, step: ExitStep) -> TokenChoice:
        banned = self._eog if step.request.params.ignore_eos else ()
        return step.sampler.choose(step.logits, banned, step.hint)

    def _rows(self, step: ExitStep, st: _Req, upto: int) -> np.ndarray:
        assert step.hidden is not None
        rows = step.hidden.view(st.recorded, upto).copy()
        st.recorded = upto
        return rows

    def _cloud_blocker(self, step: ExitStep, st: _Req) -> str | None:
        """Why this step cannot use the cloud (None: it can). Engine thread."""
        if step.hidden is None:
            st.rejoinable = False
            return "this request keeps no h_K (capture off)"
        if st.failed:
            return "cloud failed earlier in this request"
        if st.recorded == 0 and not self.bridge.connected and self.bridge.last_error is not None:
            return f"cloud unreachable: {self.bridge.last_error}"
        return None

    def _live_state(self, step: ExitStep) -> tuple[_Req, str | None]:
        """The request's state, rejoined to the cloud if it left it and may come back now;
        with the reason it stays on the edge (None: it uses the cloud)."""
        st = self._state(step)
        why = self._cloud_blocker(step, st)
        if st.failed and self._may_rejoin(st):
            st = self._rejoin(step, st)
            why = self._cloud_blocker(step, st)
        return st, why

    def _may_rejoin(self, st: _Req) -> bool:
        if not (st.rejoinable and st.left) or st.rejoins >= MAX_REJOINS:
            return False
        if time.monotonic() - st.failed_at < REJOIN_BACKOFF_S * 2 ** st.rejoins:
            return False
        if not self.bridge.connected:
            self.bridge.want_link()
            return False
        return self.bridge.last_ok > st.failed_at  # a ping came back since the failure

    def _rejoin(self, step: ExitStep, old: _Req) -> _Req:
        """Take the cloud back: a fresh session that gets the whole h_K history (st.recorded = 0)."""
        rid = step.request.request_id
        st = _Req(self._session(old.cs.meter), old.stats, gamma=step.request.gamma or self.bridge.spec_gamma,
                  rejoins=old.rejoins + 1, check_from=step.position)  # the replayed history is not checked
        with self._mu:
            if self._reqs.get(rid) is old:
                self._reqs[rid] = st
        if old.recorded:
            self._close_later(rid, old)
        at = len(step.tokens) - len(step.request.prompt) - step.held
        if step.stats.fallbacks:
            step.stats.fallbacks[-1]["rejoined_at_token"] = at
        ratelog.log("rejoin", logging.INFO, "request %s rejoined the cloud at token %d (replaying %d h_K rows)",
                    rid, at, step.position)
        return st

    def _stay_on_edge(self, step: ExitStep, st: _Req, why: str) -> bool:
        """Mark the request edge-only for now (engine thread); its first reason (not "cloud failed
        earlier") goes into its stats. True if this call is that first time."""
        if st.failed:
            return False
        st.failed, st.failed_at, st.left = True, time.monotonic(), True
        if step.stats.fallback is None:
            step.stats.fallback = why
        step.stats.fallbacks.append({"at_token": len(step.tokens) - len(step.request.prompt) - step.held,
                                     "reason": why, "rejoined_at_token": None})
        return True

    def _fail(self, rid: str, st: _Req, why: str) -> None:
        """A cloud failure (any thread): continue in edge mode now, maybe rejoin later."""
        if st.failed:
            return
        st.failed, st.failed_at = True, time.monotonic()
        ratelog.log("fallback", logging.WARNING, "request %s continues in edge mode: %s", rid, why)
        if self.bridge.on_fallback is not None:
            try:
                self.bridge.on_fallback(self.mode, why)
            except Exception:
                log.exception("on_fallback hook failed")

        def applied() -> None:  # engine thread: the fallback's `fallbacks` entry exists now
            st.left = True
        self.engine.fall_back(rid, why, applied, rejoin=True)

    def _crash(self, rid: str, st: _Req, what: str) -> None:
        """A bug on the cloud path (loop thread): the request ends with an error, no fallback."""
        st.failed, st.rejoinable = True, False
        self.engine.abort(rid, f"internal error on the edge's cloud path ({what})")

    @staticmethod
    def _take_checks(st: _Req) -> dict[int, int] | None:
        """The pending agreement checks; they go with the frame carrying rows up to `st.recorded`."""
        if not st.checks:
            return None
        out, st.checks = st.checks, {}
        return out

    def _infer(self, step: ExitStep, st: _Req, rows: np.ndarray, lazy: np.ndarray | None = None) -> None:
        """Ask the cloud for position step.position's token; deliver it (or fall back)."""
        rid, params = step.request.request_id, step.request.params
        sampling = wire_sampling(params)
        mask = pack_mask(step.mask) if step.mask is not None else None  # structured output
        n_lp = params.top_logprobs if params.logprobs else 0
        check = self._take_checks(st)

        async def run() -> None:
            res = await self._exchange(st, lambda: st.cs.infer(rows, sampling, top_n=1, logprobs=n_lp, mask=mask,
                                                               check=check))
            if res is None or st.failed:
                return
            conf = res.top[0][1] if res.top else 0.0
            # the cloud's own log p(token) and top-n (deep model, temperature 1); null if it sent none
            self.engine.deliver(rid, TokenChoice(res.token, res.logprob, conf, res.top_logprobs[:n_lp],
                                                 origin="cloud"))

        self._spawn(step, st, "infer", run)

    def _append_lazy(self, step: ExitStep, st: _Req, rows: np.ndarray) -> None:
        check = self._take_checks(st)

        async def run() -> None:
            await self._exchange(st, lambda: st.cs.append_lazy(rows, check))

        self._spawn(step, st, "lazy append", run)


class CloudModeSource(_CloudSource):
    """`cloud`: every token from the deep layers."""

    mode = "cloud"

    def decide(self, step: ExitStep) -> TokenChoice | None:
        st, why = self._live_state(step)
        if why is not None:
            self._stay_on_edge(step, st, why)
            return self._edge_choice(step)
        self._infer(step, st, self._rows(step, st, step.position))
        return None


class CollabSource(_CloudSource):
    """`collab`: edge token when confident, else the cloud's; lazy, exactly-once h_K upload."""

    mode = "collab"

    def __init__(self, engine: Engine, bridge: CloudBridge) -> None:
        super().__init__(engine, bridge)

    def decide(self, step: ExitStep) -> TokenChoice | None:
        st, why = self._live_state(step)
        choice = self._edge_choice(step)
        if why is not None:
            self._stay_on_edge(step, st, why)
            return choice
        tau = step.request.tau if step.request.tau is not None else self.bridge.tau
        if choice.confidence >= tau:
            self._maybe_check(step, st, choice)
            pending = step.position - st.recorded
            if st.recorded == 0 or pending >= LAZY_BATCH:  # the prompt at once, then in batches
                self._append_lazy(step, st, self._rows(step, st, step.position))
            return choice
        self._infer(step, st, self._rows(step, st, step.position))
        return None

    def _maybe_check(self, step: ExitStep, st: _Req, choice: TokenChoice) -> None:
        """Pick this exit (position P, decided from row P-1) for an agreement check, by a hash of P.
        The check is the edge's greedy token, whatever the request samples: the exit head's argmax,
        or the lookup mixture's where the request decodes with it (the token it emits), so agreement
        means what the bundle's calibration measures. Not under a structured output mask (the
        edge's choice there is not the head's free argmax)."""
        P = step.position
        if step.mask is not None or P - 1 < max(st.check_from, len(step.request.prompt) - 1):
            return
        if ((P * 0x9E3779B1) & 0xFFFFFFFF) >= self.bridge.check_share * 0x100000000:
            return
        st.checks[P - 1] = choice.token if step.hint is not None else int(np.argmax(step.logits))


class SpecSource(_CloudSource):
    """`spec`: drafts verified by the cloud, the next block drafted while a verdict is in flight."""

    mode = "spec"

    def decide(self, step: ExitStep) -> TokenChoice | Draft | None:
        st, why = self._live_state(step)
        choice = self._edge_choice(step)
        if why is not None:
            if self._stay_on_edge(step, st, why) and step.held:  # cannot happen before the first verify; be safe
                self.engine.fall_back(step.request.request_id, why, rejoin=st.rejoinable)
                return None
            return choice
        if step.mask is not None:  # structured output: the mask this position is drafted / judged under
            st.masks[step.position] = pack_mask(step.mask)
        now = time.monotonic()
        if st.t_last and step.held:
            st.t_draft = (now - st.t_last) if not st.t_draft else 0.8 * st.t_draft + 0.2 * (now - st.t_last)
            step.stats.draft_s += now - st.t_last
            step.stats.draft_steps += 1
        st.t_last = now
        P, held = step.position, step.held
        params = step.request.params
        st.seeded = params.temperature > 0 and params.seed is not None
        if st.recorded == 0 and P > 1:  # the prompt's rows go up now, overlapping the first drafts
            self._append_lazy(step, st, self._rows(step, st, P - 1))
        remaining = self._remaining(step) - held
        eog_held = held > 0 and step.tokens[-1] in self._eog
        sure = choice.confidence >= self.bridge.spec_stop  # below the stop: the cloud decides this position
        if not st.inflight:
            if held < st.gamma and remaining > 1 and not eog_held and sure:
                return self._draft(step, st, choice)
            self._verify(step, st)
            st.inflight = True
        if st.seeded:
            return None  # reproducible schedule: no block drafted while a verdict is in flight
        if held - st.block_len < st.gamma and remaining > 1 and not eog_held and sure:
            return self._draft(step, st, choice)  # pipelined: the next block, assuming acceptance
        return None  # park until the verdict

    def _draft(self, step: ExitStep, st: _Req, choice: TokenChoice) -> Draft:
        step.stats.mark("draft", step.position)
        params = step.request.params
        if params.temperature > 0 and params.top_k != 1:  # sampled: draw from the q that travels whole
            banned = self._eog if params.ignore_eos else ()
            choice, st.q[step.position] = step.sampler.draft(step.logits, banned, DRAFT_TOP)
        return Draft(choice)

    def _remaining(self, step: ExitStep) -> int:
        req = step.request
        generated = len(step.tokens) - len(req.prompt)  # includes held drafts
        limit = self.engine.check_fits(len(req.prompt), req.params.max_tokens)
        ctx_room = self.engine.ctx_size - len(step.tokens)
        return min(limit - generated, ctx_room) + step.held

    def _verify(self, step: ExitStep, st: _Req) -> None:
        P, held = step.position, step.held
        start = P - held  # first draft's position
        st.block_start, st.block_len = start, held
        catch = self._rows(step, st, start - 1) if st.recorded < start - 1 else None  # rows the cloud lacks
        rows = self._rows(step, st, P)  # positions [start-1, P)
        draft = list(step.tokens[start:P])
        rid, stats, params = step.request.request_id, step.stats, step.request.params
        sampling = wire_sampling(params)
        n_lp = params.top_logprobs if params.logprobs else 0
        probs = None
        if not sampling.greedy:
            # a draft with no recorded q was picked deterministically (top_k=1): q is a point mass on it
            probs = tuple(st.q.pop(p, None) or ((int(d), 1.0),) for p, d in zip(range(start, P), draft))
        masks = None
        if st.masks:  # structured output: one mask per judged position, start..P
            masks = tuple(st.masks.pop(p, b"") for p in range(start, P + 1))  # b"": refused by the cloud
        gamma_max = max(2 * self.bridge.spec_gamma,
                        math.ceil((self.bridge.rtt_s or 0.0) / st.t_draft) if st.t_draft > 0 else 0)
        gamma_max = min(gamma_max, 32) if step.request.gamma is None else step.request.gamma  # auto's spec@γ: a cap

        async def exchange() -> Any:
            if catch is not None:
                st.cs.record(catch)
            stats.mark("verify_sent", len(draft))
            t = time.monotonic()
            res = await st.cs.verify(rows, draft, sampling, probs, logprobs=n_lp, masks=masks)
            stats.verify_s += time.monotonic() - t
            stats.verifies += 1
            stats.mark("verdict", res.accepted)
            return res

        async def run() -> None:
            res = await self._exchange(st, exchange)
            if res is None or st.failed:
                return
            stats.drafted += len(draft)
            stats.accepted += res.accepted
            stats.rejections += int(res.accepted < len(draft))
            self.bridge.observe_verdict(res.accepted, len(draft))

            def applied() -> None:  # engine thread, after the engine applied the verdict
                st.inflight = False
                st.recorded = min(st.recorded, res.length)
                if not st.seeded and draft:  # an empty block (nothing sure enough to draft) says nothing of γ
                    st.gamma = (min(gamma_max, st.gamma + 1) if res.accepted == len(draft)
                                else max(1, res.accepted + 1))

            lps, tops = res.logprobs, res.top_logprobs
            cloud_lp = None  # the cloud's own (logprob, top) of each settled token; null if it sent none
            if lps is not None and len(lps) == res.accepted + 1:
                cloud_lp = [(lp, tops[i] if tops else ()) for i, lp in enumerate(lps)]
            last_lp, last_top = cloud_lp[-1] if cloud_lp else (None, ())
            self.engine.deliver_verdict(rid, start, res.accepted,
                                        TokenChoice(res.token, last_lp, 0.0, last_top, origin="cloud"),
                                        applied, draft_logprobs=cloud_lp[:-1] if cloud_lp else None)

        self._spawn(step, st, "verify", run)


def register_cloud_modes(engine: Engine, bridge: CloudBridge) -> dict[str, _CloudSource]:
    sources: dict[str, _CloudSource] = {"cloud": CloudModeSource(engine, bridge),
                                        "collab": CollabSource(engine, bridge),
                                        "spec": SpecSource(engine, bridge)}
    for mode, src in sources.items():
        engine.register_source(mode, src)
    return sources
