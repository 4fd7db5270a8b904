"""Record real edge traffic once, replay it as many edges: N is not bounded by N llama.cpp processes.

Recording (`record_traces`): a real `fogline cloud serve`, a WanEmulator in front of it, and a
real `fogline edge serve` whose cloud URL is a `RecordingProxy` (a websocket-level tap on the
edge's side of the link). For each mode and chat prompt the bench sends one streaming chat
request (greedy; to the end of the answer, or `ignore_eos` for a fixed length); the proxy stamps
every frame the edge sends and every reply it receives, and the streaming client stamps every
token the edge emits (and keeps the edge's own token count), all on this process's
monotonic clock. A `Trace` is that request's event list — `send` (the frame's bytes), `recv`
(the reply's id and its recorded token / accepted / length), `emit` (one token reached the
user) — each with `dt`, the edge's measured time since the previous event (its think time).

Replay (`replay_split`): one websocket per simulated edge, the recorded hello, then the events
in order. A `recv` is a barrier: the replay waits for the cloud's real reply to that id (so a
slow cloud delays everything after it, as it would a real edge), checks it against the
recording (token, accepted, length: the frames are the real edge's h_K and greedy decoding is
deterministic, so they must match; a mismatch is counted and, where positions diverge, ends
that session), then sleeps the recorded think time before the next event. Every `emit` is a
token the user sees; inter-token latency is measured between emits, think time included.

`replay_cloud_only` is the baseline client: token ids up, the whole model's tokens streamed
down (cloud_runtime/full_model.py `/v1/generate`); the edge only tokenises, no think time.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
from aiohttp import web

REPLY_KEYS = ("t", "token", "accepted", "length")


@dataclass
class Event:
    kind: str  # "send" | "recv" | "emit"
    dt: float  # seconds since the previous event of this trace, as recorded
    data: bytes = b""  # send: the msgpack frame the edge sent
    id: int = -1  # send/recv: the request id
    reply: dict[str, Any] = field(default_factory=dict)  # recv: REPLY_KEYS of the recorded reply


@dataclass
class Trace:
    """One real chat request of a real edge, as the frames and tokens it produced."""

    mode: str
    prompt: str
    hello: bytes
    events: list[Event]
    generated: int = 0  # tokens the edge generated (its reply's stats); emits can merge tokens into one chunk

    @property
    def tokens(self) -> int:
        return sum(e.kind == "emit" for e in self.events)

    def to_obj(self) -> dict[str, Any]:
        return {"mode": self.mode, "prompt": self.prompt, "hello": self.hello, "generated": self.generated,
                "events": [[e.kind, e.dt, e.data, e.id, e.reply] for e in self.events]}

    @classmethod
    def from_obj(cls, o: dict[str, Any]) -> "Trace":
        return cls(o["mode"], o["prompt"], o["hello"],
                   [Event(k, float(dt), d, int(i), dict(r)) for k, dt, d, i, r in o["events"]],
                   int(o.get("generated", 0)))


def save_traces(path: Path, traces: list[Trace], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgpack.packb({"meta": meta, "traces": [t.to_obj() for t in traces]}, use_bin_type=True))
    tmp.replace(path)


def load_traces(path: Path) -> tuple[list[Trace], dict[str, Any]]:
    o = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
    return [Trace.from_obj(t) for t in o["traces"]], o["meta"]


# --- recording ---------------------------------------------------------------------------


class RecordingProxy:
    """A websocket proxy on the edge's side of the link that stamps every frame both ways.

    `log` holds (monotonic time, "up" | "down", frame bytes) in arrival order; `cut(t0, t1)`
    turns the part of it that belongs to one request into a Trace.
    """

    def __init__(self, upstream_url: str) -> None:
        self.upstream_url = upstream_url
        self.log: list[tuple[float, str, bytes]] = []
        self.hello: bytes = b""
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> "RecordingProxy":
        app = web.Application()
        app.router.add_get("/ws", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        down = web.WebSocketResponse(max_msg_size=64 << 20, compress=False)
        await down.prepare(request)
        async with aiohttp.ClientSession() as http, http.ws_connect(self.upstream_url, compress=0,
                                                                     max_msg_size=64 << 20) as up:
            async def pump(src: Any, dst: Any, direction: str) -> None:
                async for m in src:
                    if m.type != aiohttp.WSMsgType.BINARY:
                        break
                    data = bytes(m.data)
                    self.log.append((time.monotonic(), direction, data))
                    if direction == "up" and not self.hello and msgpack.unpackb(data).get("t") == "hello":
                        self.hello = data
                    await dst.send_bytes(data)

            tasks = [asyncio.ensure_future(pump(down, up, "up")), asyncio.ensure_future(pump(up, down, "down"))]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in tasks:
                t.cancel()
        await down.close()
        return down

    def cut(self, mode: str, prompt: str, t0: float, t1: float, emits: list[float], generated: int = 0) -> Trace:
        """The frames of the one session that ran in [t0, t1], merged with the token stamps."""
        ups = [(t, msgpack.unpackb(d, raw=False), d) for t, w, d in self.log if w == "up" and t0 <= t <= t1]
        sessions = {m.get("session") for _, m, _ in ups} - {None}
        if len(sessions) != 1:
            raise RuntimeError(f"{mode} {prompt!r}: expected one session in the window, saw {sorted(sessions)}")
        ids = {m["id"] for _, m, _ in ups if m.get("session") in sessions and "id" in m}
        raw: list[tuple[float, Event]] = [(t, Event("send", 0.0, d, m["id"])) for t, m, d in ups
                                          if m.get("session") in sessions]
        for t, w, d in self.log:
            if w == "down" and t0 <= t:
                m = msgpack.unpackb(d, raw=False)
                if m.get("id") in ids:
                    raw.append((t, Event("recv", 0.0, id=m["id"], reply={k: m.get(k) for k in REPLY_KEYS})))
        raw += [(t, Event("emit", 0.0)) for t in emits]
        raw.sort(key=lambda x: x[0])
        prev, events = t0, []
        for t, e in raw:
            e.dt, prev = max(0.0, t - prev), t
            events.append(e)
        return Trace(mode, prompt, self.hello, events, generated)


# --- replay ---------------------------------------------------------------------------------


@dataclass
class SessionResult:
    """What one simulated edge saw."""

    runs: list[list[float]] = field(default_factory=list)  # per request: its start, then each token's time
    replies: int = 0
    mismatches: int = 0  # cloud replies that differ from the recording
    errors: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(len(r) - 1 for r in self.runs)

    @property
    def itls(self) -> list[float]:
        """Every wait of the user, per request: start -> first token, then token -> token (think time
        included). The first gap makes a server that queues whole requests show its queueing."""
        return [b - a for r in self.runs for a, b in zip(r, r[1:])]

    @property
    def ttfts(self) -> list[float]:
        return [r[1] - r[0] for r in self.runs if len(r) > 1]


def _with_session(frame: bytes, session: str) -> bytes:
    m = msgpack.unpackb(frame, raw=False)
    m["session"] = session
    return msgpack.packb(m, use_bin_type=True)


def prepare(trace: Trace, session: str) -> list[Event]:
    """The trace's events with the frames re-encoded for a fresh session id (done before timing)."""
    return [Event(e.kind, e.dt, _with_session(e.data, session), e.id, e.reply) if e.kind == "send" else e
            for e in trace.events]


async def _sleep_until(t: float) -> None:
    d = t - time.monotonic()
    if d > 0:
        await asyncio.sleep(d)


async def replay_split(url: str, hello: bytes, runs: list[list[Event]], out: SessionResult,
                       http: aiohttp.ClientSession) -> None:
    """One edge: one websocket, the recorded hello, then each prepared trace in turn."""
    pending: dict[int, asyncio.Future] = {}
    async with http.ws_connect(url, compress=0, max_msg_size=64 << 20) as ws:
        await ws.send_bytes(hello)
        m = msgpack.unpackb((await ws.receive(timeout=30)).data, raw=False)
        if m.get("t") != "hello_ok":
            out.errors.append(f"handshake: {m}")
            return

        async def read() -> None:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                r = msgpack.unpackb(msg.data, raw=False)
                if r.get("t") == "error" and r.get("id") not in pending:
                    out.errors.append(f"{r.get('code')}: {r.get('message')}")
                fut = pending.pop(r.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(r)
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("cloud closed the websocket"))

        reader = asyncio.ensure_future(read())
        try:
            for events in runs:
                if not await _replay_one(ws, events, pending, out):
                    break
        finally:
            reader.cancel()


async def _replay_one(ws: Any, events: list[Event], pending: dict[int, asyncio.Future],
                      out: SessionResult) -> bool:
    loop = asyncio.get_running_loop()
    stamps: list[float] = [time.monotonic()]
    out.runs.append(stamps)
    futs: dict[int, asyncio.Future] = {}
    prev = stamps[0]
    for e in events:
        if e.kind == "recv":
            fut = futs.pop(e.id, None)
            if fut is None:
                continue
            try:
                r = await asyncio.wait_for(fut, 120)
            except (asyncio.TimeoutError, ConnectionError) as err:
                out.errors.append(f"no reply to {e.id}: {type(err).__name__}")
                return False
            prev = time.monotonic()
            out.replies += 1
            if r.get("t") == "error":
                out.errors.append(f"{r.get('code')}: {r.get('message')}")
                return False
            got = {k: r.get(k) for k in REPLY_KEYS}
            if got != e.reply:
                out.mismatches += 1
                if got.get("length") != e.reply.get("length"):
                    out.errors.append(f"reply {got} differs from the recorded {e.reply}; session diverged")
                    return False
            continue
        prev += e.dt
        await _sleep_until(prev)
        if e.kind == "emit":
            stamps.append(time.monotonic())
        else:
            fut = loop.create_future()
            pending[e.id] = futs[e.id] = fut
            await ws.send_bytes(e.data)
    # ack-less frames have no recv; let the cloud's error, if any, arrive before the next run
    return True


async def replay_cloud_only(url: str, prompts: list[list[int]], max_tokens: list[int], out: SessionResult,
                            http: aiohttp.ClientSession) -> None:
    """The cloud-only edge: token ids up, the whole model's tokens streamed down, one socket; request i makes
    exactly max_tokens[i] tokens (the split's answer length for that prompt: the same work per request)."""
    async with http.ws_connect(url, compress=0) as ws:
        for ids, n in zip(prompts, max_tokens, strict=True):
            stamps: list[float] = [time.monotonic()]
            out.runs.append(stamps)
            await ws.send_str(json.dumps({"prompt": ids, "max_tokens": n}))
            while True:
                msg = json.loads((await ws.receive(timeout=600)).data)
                if "error" in msg:
                    out.errors.append(msg["error"])
                    return
                if "done" in msg:
                    break
                stamps.append(time.monotonic())
                out.replies += 1
