"""The edge's link to the cloud: one websocket per process, sessions multiplexed on it.

    link = CloudLink("ws://cloud:8700/ws", fingerprint=m.fingerprint, split=m.split, token=...)
    await link.connect()
    r = await link.infer("sess-1", start=0, hidden=h_prompt)      # -> InferResult(token, length, top)
    r = await link.infer("sess-1", start=r.length, hidden=h_next)
    v = await link.verify("sess-1", start, h_rows, draft)          # -> VerifyResult(accepted, token, length)
    await link.append("sess-1", start, h_rows, ack=False)          # lazy upload, no round trip
    await link.truncate("sess-1", length); await link.close_session("sess-1")

Every request gets a fresh id; the reader task routes replies to their futures.
Errors arrive as the typed exceptions of fogline.wire.errors (`PositionGap`
with `.expected`, `UnknownSession`, `Overloaded` with `.retry_after`, ...); an
error answering an `ack=False` append is kept and raised by the next request
of that session. A dropped socket fails pending requests with `LinkDown`; the
next request reconnects. Replay (after `UnknownSession`) is the caller's job,
since only the caller keeps the h_K history — see edge_runtime/cloud_generation.py.

Bytes are measured, not estimated: every websocket frame sent or received is
counted with its framing (header + client mask; no extensions: compress=0) in the
link's `total` Meter and, when it belongs to a session, in that session's Meter
(`attach`). Those are the bytes a proxy on the path sees, minus the HTTP upgrade.
Load and agreement, measured by the cloud: replies to deep-layer steps carry the step's queue
wait and pass time (`queue_ms`, `step_ms`), which the link keeps as EMAs (`cloud_queue_ms`,
`cloud_step_ms`, what the `auto` policy adds to the RTT), and the session's settled agreement
checks (`checked`, `agreed`), which are added to the session's Meter.

Imports neither torch nor llama.cpp (a test checks this in a fresh interpreter).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np

from fogline.wire.codecs import INT8_BLOCK_DEFAULT, Codec, encode_hidden
from fogline.wire.errors import BadFrame, LinkDown, MismatchError, ProtocolError, ShuttingDown, error_from_code
from edge_runtime.ratelog import RateLimitedLog
from fogline.wire.protocol import (GREEDY, Ack, Append, Bye, Close, Error, Hello, HelloOk, Infer, Message, Ping,
                                   Pong, Sampling, TokenReply, Truncate, Verdict, Verify, decode_frame,
                                   encode_frame)

log = logging.getLogger("fogline.edge.cloud")
ratelog = RateLimitedLog(log)
LOAD_EMA = 0.2  # weight of the newest reply in the cloud queue/step EMAs


@dataclass
class Meter:
    """Websocket traffic of one session (or of the whole link): bytes on the wire per direction,
    frames, and replies received (round trips). Mutated on the event loop only."""

    up: int = 0
    down: int = 0
    frames_up: int = 0
    frames_down: int = 0
    round_trips: int = 0
    # agreement checks the cloud settled for this session: edge tokens checked, and agreeing
    checked: int = 0
    agreed: int = 0

    def sent(self, n: int) -> None:
        self.up += ws_frame_bytes(n, masked=True)
        self.frames_up += 1

    def received(self, n: int) -> None:
        self.down += ws_frame_bytes(n, masked=False)
        self.frames_down += 1


def ws_frame_bytes(payload: int, *, masked: bool) -> int:
    """Bytes of one unfragmented websocket frame on the wire (RFC 6455 §5.2): 2-byte header,
    extended length for payloads >= 126 / >= 65536, a 4-byte mask key on client frames."""
    ext = 0 if payload < 126 else 2 if payload < 65536 else 8
    return payload + 2 + ext + (4 if masked else 0)


@dataclass(frozen=True)
class InferResult:
    token: int
    length: int  # positions the cloud holds after this request (= position of `token`)
    top: tuple[tuple[int, float], ...] = ()  # (id, prob) of the model's most likely tokens
    logprob: float | None = None  # the cloud's own log p(token), when asked for
    top_logprobs: tuple[tuple[int, float], ...] = ()  # the cloud's (id, logprob), when asked for


@dataclass(frozen=True)
class VerifyResult:
    accepted: int  # leading draft tokens the cloud agreed with
    token: int  # the cloud's token for the position after the accepted ones
    length: int  # positions the cloud holds now (= start + accepted + 1)
    # when asked for: the cloud's own logprob / top_logprobs of the accepted drafts, then `token`
    logprobs: tuple[float, ...] | None = None
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None


class CloudLink:
    """An async client for one cloud server. Safe to share between many concurrent requests."""

    def __init__(self, url: str, *, fingerprint: str, split: int, token: str = "",
                 codec: Codec | str = Codec.FP16, int8_block: int = INT8_BLOCK_DEFAULT,
                 connect_timeout: float = 10.0, request_timeout: float = 120.0,
                 client_name: str = "fogline-edge") -> None:
        self.url = url
        self.fingerprint, self.split, self.token = fingerprint, split, token
        self.codec = Codec(codec)
        self.int8_block = int8_block
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.client_name = client_name
        self.info: HelloOk | None = None
        self.bye: Bye | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._deferred: dict[str, ProtocolError] = {}  # errors of ack-less appends, by session
        self.total = Meter()  # every frame of every connection (hello, pings and closes included)
        self._meters: dict[str, Meter] = {}  # by session
        self._reply_meters: dict[int, Meter] = {}  # by request id, until its reply arrives
        self._ids = itertools.count(1)
        self._connect_lock = asyncio.Lock()
        self._send_lock = asyncio.Lock()
        self._closed = False
        # EMAs of the cloud's own step figures (None until a reply carried them)
        self.cloud_queue_ms: float | None = None
        self.cloud_step_ms: float | None = None

    # --- connection ----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._ws is not None and not self._ws.closed and self.info is not None

    async def connect(self) -> HelloOk:
        """Open the websocket and shake hands (no-op when already connected)."""
        async with self._connect_lock:
            if self.connected:
                assert self.info is not None
                return self.info
            if self._closed:
                raise LinkDown("this CloudLink was closed")
            await self._teardown()
            if self._http is None:
                self._http = aiohttp.ClientSession()
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            try:
                ws = await self._http.ws_connect(self.url, headers=headers, heartbeat=30.0, max_msg_size=64 << 20,
                                                 timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                                                 compress=0)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                raise LinkDown(f"cannot reach the cloud at {self.url}: {type(e).__name__}: {e}") from None
            try:
                hello = encode_frame(Hello(fingerprint=self.fingerprint, split=self.split, token=self.token,
                                           client=self.client_name))
                await ws.send_bytes(hello)
                self.total.sent(len(hello))
                m = await ws.receive(timeout=self.connect_timeout)
                if m.type == aiohttp.WSMsgType.BINARY:
                    self.total.received(len(m.data))
            except (asyncio.TimeoutError, aiohttp.ClientError, ConnectionError) as e:
                await ws.close()
                raise LinkDown(f"no handshake answer from {self.url}: {type(e).__name__}") from None
            if m.type != aiohttp.WSMsgType.BINARY:
                await ws.close()
                raise LinkDown(f"cloud closed the connection during the handshake "
                               f"(code {ws.close_code}, {m.extra or m.type.name})")
            try:
                reply = decode_frame(m.data, 64 << 20)
                if isinstance(reply, Error):
                    raise error_from_code(reply.code, reply.message)
                if not isinstance(reply, HelloOk):
                    raise BadFrame(f"cloud answered hello with {reply.KIND}")
                if (reply.fingerprint, reply.split) != (self.fingerprint, self.split):
                    raise MismatchError(f"cloud serves model {reply.fingerprint[:12]} K={reply.split}; this edge "
                                        f"has {self.fingerprint[:12]} K={self.split}")
            except ProtocolError:
                await ws.close()
                raise
            self._ws, self.info, self.bye = ws, reply, None
            self._reader = asyncio.get_running_loop().create_task(self._read(ws), name="fogline-cloud-reader")
            log.info("connected to %s (%s, K=%d)", self.url, reply.server, reply.split)
            return reply

    async def close(self) -> None:
        self._closed = True
        await self._teardown()
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def __aenter__(self) -> "CloudLink":
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _teardown(self) -> None:
        ws, reader = self._ws, self._reader
        self._ws, self._reader, self.info = None, None, None
        if ws is not None and not ws.closed:
            await ws.close()
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            try:
                await reader
            except (asyncio.CancelledError, Exception):
                pass
        self._fail_all(LinkDown("connection to the cloud closed"))

    def attach(self, session: str, meter: Meter) -> None:
        """Count this session's frames (both directions) into `meter` from now on."""
        self._meters[session] = meter

    def deferred(self, session: str) -> ProtocolError | None:
        """The error an ack-less append of `session` got and no later request has raised yet."""
        return self._deferred.get(session)

    def _fail_all(self, e: ProtocolError) -> None:
        self._reply_meters.clear()
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(e)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        reason: ProtocolError = LinkDown("connection to the cloud closed")
        try:
            async for m in ws:
                if m.type != aiohttp.WSMsgType.BINARY:
                    break
                self.total.received(len(m.data))
                try:
                    msg = decode_frame(m.data, 64 << 20)
                except ProtocolError as e:
                    log.warning("undecodable frame from the cloud: %s", e)
                    continue
                self._meter_reply(msg, len(m.data))
                if isinstance(msg, Bye):
                    self.bye = msg
                    reason = ShuttingDown(f"cloud is shutting down: {msg.reason}", retry_after=msg.retry_after)
                    continue
                self._route(msg)
            if ws.close_code is not None and self.bye is None:
                reason = LinkDown(f"cloud closed the connection (code {ws.close_code})")
        except (aiohttp.ClientError, ConnectionError) as e:
            reason = LinkDown(f"connection to the cloud failed: {type(e).__name__}")
        finally:
            if self._ws is ws:
                self._ws, self.info = None, None
                if not self._closed:
                    ratelog.log("link-lost", logging.WARNING, "lost the cloud link to %s: %s", self.url, reason)
            self._fail_all(reason)

    def _meter_reply(self, msg: Message, size: int) -> None:
        req_id = getattr(msg, "id", None)
        meter = self._reply_meters.pop(req_id, None) if req_id is not None else None
        if meter is None and (s := getattr(msg, "session", None)) is not None:
            meter = self._meters.get(s)
        if meter is not None:
            meter.received(size)
            meter.round_trips += 1
            if (checked := getattr(msg, "checked", None)) is not None:
                meter.checked += checked
                meter.agreed += msg.agreed  # type: ignore[attr-defined]
        self.cloud_queue_ms = _ema(self.cloud_queue_ms, getattr(msg, "queue_ms", None))
        self.cloud_step_ms = _ema(self.cloud_step_ms, getattr(msg, "step_ms", None))

    def _route(self, msg: Message) -> None:
        req_id = getattr(msg, "id", None)
        fut = self._pending.pop(req_id, None) if req_id is not None else None
        session = getattr(msg, "session", None)
        stale = self._deferred.get(session) if session is not None else None
        if stale is not None and req_id is not None and (stale.req_id or 0) < req_id:
            # A later request of the session has been answered: it saw the state after the
            # failed append, so that older error no longer describes the session.
            del self._deferred[session]
        if isinstance(msg, Error):
            err = error_from_code(msg.code, msg.message, req_id=msg.id, session=msg.session,
                                  expected=msg.expected, retry_after=msg.retry_after)
            if fut is not None:
                if not fut.done():
                    fut.set_exception(err)
            elif msg.session is not None:
                self._deferred[msg.session] = err  # answer to an ack-less append
            else:
                log.warning("cloud error: %s: %s", msg.code, msg.message)
                if err.fatal:
                    self._fail_all(err)
            return
        if fut is not None and not fut.done():
            fut.set_result(msg)

    # --- requests --------------------------------------------------------------------

    async def _request(self, make: Any, want_reply: bool = True) -> Message | None:
        await self.connect()
        ws = self._ws
        if ws is None:
            raise LinkDown("connection to the cloud closed")
        req_id = next(self._ids)
        msg = make(req_id)
        if (s := getattr(msg, "session", None)) is not None and s in self._deferred:
            raise self._deferred.pop(s)
        fut: asyncio.Future[Message] | None = None
        if want_reply:
            fut = asyncio.get_running_loop().create_future()
            self._pending[req_id] = fut
        data = encode_frame(msg)
        meter = self._meters.get(s) if s is not None else None
        try:
            async with self._send_lock:
                await ws.send_bytes(data)
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as e:
            self._pending.pop(req_id, None)
            raise LinkDown(f"sending to the cloud failed: {type(e).__name__}") from None
        self.total.sent(len(data))
        if meter is not None:
            meter.sent(len(data))
            if fut is not None:
                self._reply_meters[req_id] = meter
        if fut is None:
            return None
        try:
            return await asyncio.wait_for(fut, self.request_timeout)
        except asyncio.TimeoutError:
            self._pending.pop(req_id, None)
            self._reply_meters.pop(req_id, None)
            raise LinkDown(f"no answer from the cloud in {self.request_timeout:g} s") from None
        except asyncio.CancelledError:
            self._pending.pop(req_id, None)
            self._reply_meters.pop(req_id, None)
            raise

    def _encode(self, hidden: np.ndarray) -> Any:
        return encode_hidden(hidden, self.codec, self.int8_block)

    def _max_rows(self) -> int:
        info = self.info
        if info is None:
            return 1 << 30
        per_row = hidden_row_bytes(self.codec, info.hidden_size, self.int8_block)
        return max(1, min(info.max_rows, (info.max_frame - 4096) // per_row))

    async def append(self, session: str, start: int, hidden: np.ndarray, *, ack: bool = True,
                     check: dict[int, int] | None = None) -> int:
        """Upload h_K of positions [start, start+len(hidden)). Returns the cloud's length (ack) or
        the expected one (ack=False: errors surface on this session's next request).
        check: position -> the edge's token after it, for the cloud to check (agreement)."""
        if len(hidden) == 0:
            return start
        await self.connect()
        end = start
        for lo, rows in self._chunks(hidden):
            reply = await self._request(
                lambda i, lo=lo, rows=rows: Append(id=i, session=session, start=start + lo, h=self._encode(rows),
                                                   ack=ack, check=_checks(check, start + lo, len(rows))),
                want_reply=ack)
            end = reply.length if isinstance(reply, Ack) else start + lo + len(rows)
        return end

    async def infer(self, session: str, start: int, hidden: np.ndarray, sampling: Sampling = GREEDY,
                     top_n: int = 0, logprobs: int | None = None, mask: bytes | None = None,
                     check: dict[int, int] | None = None) -> InferResult:
        """Send h_K of positions [start, start+n) (n >= 1) and get the token for position start+n.
        check: as in `append`."""
        if len(hidden) == 0:
            raise ValueError("infer needs at least one h_K row")
        await self.connect()
        chunks = list(self._chunks(hidden))
        for lo, rows in chunks[:-1]:  # a long prompt goes up in several frames
            await self._request(lambda i, lo=lo, rows=rows: Append(id=i, session=session, start=start + lo,
                                                                    h=self._encode(rows),
                                                                    check=_checks(check, start + lo, len(rows))))
        lo, rows = chunks[-1]
        reply = await self._request(lambda i: Infer(id=i, session=session, start=start + lo, h=self._encode(rows),
                                                     sampling=sampling, top_n=top_n, logprobs=logprobs, mask=mask,
                                                     check=_checks(check, start + lo, len(rows))))
        if not isinstance(reply, TokenReply):
            raise BadFrame(f"cloud answered infer with {type(reply).__name__}")
        return InferResult(reply.token, reply.length, reply.top, reply.logprob, reply.top_logprobs or ())

    async def verify(self, session: str, start: int, hidden: np.ndarray, draft: list[int] | tuple[int, ...],
                     sampling: Sampling = GREEDY,
                     draft_probs: tuple[tuple[tuple[int, float], ...], ...] | None = None,
                     logprobs: int | None = None, masks: tuple[bytes, ...] | None = None) -> VerifyResult:
        """rows = h_K of positions [start, start+n); draft[i] proposes position start+i+1 (n-1 drafts)."""
        if len(draft) != len(hidden) - 1:
            raise ValueError(f"{len(draft)} drafts for {len(hidden)} rows; need rows - 1")
        reply = await self._request(lambda i: Verify(id=i, session=session, start=start, h=self._encode(hidden),
                                                     draft=tuple(int(t) for t in draft), sampling=sampling,
                                                     draft_probs=draft_probs, logprobs=logprobs, masks=masks))
        if not isinstance(reply, Verdict):
            raise BadFrame(f"cloud answered verify with {type(reply).__name__}")
        return VerifyResult(reply.accepted, reply.token, reply.length, reply.logprobs, reply.top_logprobs)

    async def truncate(self, session: str, length: int) -> int:
        reply = await self._request(lambda i: Truncate(id=i, session=session, length=length))
        if not isinstance(reply, Ack):
            raise BadFrame(f"cloud answered truncate with {type(reply).__name__}")
        return reply.length

    async def close_session(self, session: str) -> None:
        self._deferred.pop(session, None)
        try:
            await self._request(lambda i: Close(id=i, session=session))
        finally:
            self._meters.pop(session, None)

    async def ping(self) -> float:
        """Round-trip time in seconds."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        reply = await self._request(lambda i: Ping(id=i, stamp=t0))
        if not isinstance(reply, Pong):
            raise BadFrame(f"cloud answered ping with {type(reply).__name__}")
        return loop.time() - t0

    def _chunks(self, hidden: np.ndarray) -> list[tuple[int, np.ndarray]]:
        step = self._max_rows()
        return [(lo, hidden[lo:lo + step]) for lo in range(0, max(len(hidden), 1), step)]


def _ema(old: float | None, new: float | None) -> float | None:
    """The load EMA after one reply (`new` None: the reply did not carry the figure)."""
    if new is None:
        return old
    return new if old is None else (1 - LOAD_EMA) * old + LOAD_EMA * new


def _checks(check: dict[int, int] | None, start: int, rows: int) -> tuple[tuple[int, int], ...] | None:
    """The agreement checks that fall on the rows [start, start+rows) of one frame, ascending."""
    if not check:
        return None
    mine = tuple((p, int(t)) for p, t in sorted(check.items()) if start <= p < start + rows)
    return mine or None


def hidden_row_bytes(codec: Codec, dim: int, block: int) -> int:
    if codec is Codec.FP32:
        return 4 * dim
    if codec is Codec.FP16:
        return 2 * dim
    return dim + 4 * (-(-dim // block))
