"""One edge's websocket, whatever serves it: the protocol handling of the cloud, written once.

The plain aiohttp server (cloud_runtime/server.py) and the Ray Serve ingress
(cloud_runtime/ray_serve.py) both hand each accepted websocket to
`Connections.serve` through a `Transport`, a four-call adapter over their
framework's websocket object. Everything the protocol says — the hello (version,
auth token, fingerprint, K), per-request concurrency with a cap, typed error
frames, the bad-frame budget, `bye` on shutdown — lives here, so both front
ends answer byte for byte the same.

Protocol errors are mapped to frames in exactly one place
(`EdgeConnection._reply_error`); nothing a client sends can raise past it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from enum import IntEnum
from typing import TYPE_CHECKING, Protocol

from cloud_runtime.metrics import CloudMetrics
from fogline.wire.errors import (AuthError, BadFrame, ErrorCode, InternalError, MismatchError, Overloaded,
                                 ProtocolError, ShuttingDown)
from fogline.wire.protocol import Bye, Error, Hello, Message, Ping, Pong, decode_frame, encode_frame

if TYPE_CHECKING:
    from cloud_runtime.server import CloudRuntime

log = logging.getLogger("fogline.cloud")

# A frame as a transport delivers it: binary, text, or None once the peer closed or the socket failed.
Frame = bytes | str | None


class CloseCode(IntEnum):
    """The websocket close codes the cloud uses (RFC 6455 §7.4.1)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # shutting down: reconnect elsewhere / later
    POLICY_VIOLATION = 1008  # refused handshake, too many bad frames


class Transport(Protocol):
    """An accepted server-side websocket, as the protocol needs it."""

    peer: str  # the edge's address, for logs
    authorization: str  # the upgrade request's Authorization header ("" if none)

    @property
    def closed(self) -> bool: ...

    async def receive(self, timeout: float | None = None) -> Frame:
        """The next frame; raises TimeoutError after `timeout` seconds."""
        ...

    async def send(self, data: bytes) -> None:
        """Send one binary frame; a peer that is gone is not an error (the frame is dropped)."""
        ...

    async def close(self, code: int, reason: str) -> None: ...


class EdgeConnection:
    """One websocket: handshake, then requests served concurrently (ordered per session)."""

    def __init__(self, transport: Transport, rt: CloudRuntime) -> None:
        self.transport, self.rt = transport, rt
        self.config = rt.config
        self.metrics = rt.metrics
        self.peer = transport.peer
        self.tasks: set[asyncio.Task[None]] = set()
        self.send_lock = asyncio.Lock()
        self.bad_frames = 0
        self.closing = False

    async def send(self, msg: Message) -> None:
        if self.transport.closed:
            return
        async with self.send_lock:
            await self.transport.send(encode_frame(msg))  # a gone peer's requests stay in the session store

    async def close(self, code: int, reason: str) -> None:
        self.closing = True
        if not self.transport.closed:
            await self.transport.close(code, reason[:120])

    async def _reply_error(self, e: ProtocolError) -> None:
        """The one place a ProtocolError becomes a frame (and maybe a close)."""
        self.metrics.errors.labels(str(e.code)).inc()
        log.debug("edge %s: %s: %s", self.peer, e.code, e)
        await self.send(Error.of(e))
        if e.fatal:
            code = CloseCode.GOING_AWAY if e.code == ErrorCode.SHUTTING_DOWN else CloseCode.POLICY_VIOLATION
            await self.close(code, f"{e.code}: {e}")
        elif e.code in (ErrorCode.BAD_FRAME, ErrorCode.TOO_LARGE):
            self.bad_frames += 1
            if self.bad_frames > self.config.max_bad_frames:
                await self.close(CloseCode.POLICY_VIOLATION,
                                 f"bad_frame: more than {self.config.max_bad_frames} malformed frames")

    async def run(self) -> None:
        if not await self._handshake():
            return
        while not self.closing:
            frame = await self.transport.receive()
            if isinstance(frame, bytes):
                await self._on_frame(frame)
            elif isinstance(frame, str):
                await self._reply_error(BadFrame("text frames are not part of the protocol (binary msgpack only)"))
            else:  # closed or failed: the framework has already answered the close
                break
        if self.tasks:  # let admitted requests finish; their replies are dropped if we are gone
            await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _handshake(self) -> bool:
        try:
            frame = await self.transport.receive(timeout=self.config.hello_timeout_s)
        except TimeoutError:
            await self.close(CloseCode.POLICY_VIOLATION, "no hello frame in time")
            return False
        if not isinstance(frame, bytes):
            if isinstance(frame, str):
                await self._reply_error(BadFrame("the first frame must be a binary msgpack hello"))
                await self.close(CloseCode.POLICY_VIOLATION, "bad_frame: expected hello")
            return False
        try:
            hello = decode_frame(frame, self.config.max_frame_bytes)
            if not isinstance(hello, Hello):
                raise BadFrame(f"the first frame must be hello, got {hello.KIND}")
            self._check_hello(hello)
        except ProtocolError as e:
            await self._reply_error(e)
            await self.close(CloseCode.POLICY_VIOLATION, f"{e.code}: {e}")
            return False
        self.metrics.frames.labels("hello").inc()
        await self.send(self.rt.hello_ok())
        log.info("edge %s connected (%s)", self.peer, hello.client or "unnamed client")
        return True

    def _check_hello(self, hello: Hello) -> None:
        if self.rt.draining:
            raise ShuttingDown("server is shutting down", retry_after=1.0)
        want = self.config.token
        if want:
            header = self.transport.authorization
            given = hello.token or (header[7:] if header.startswith("Bearer ") else "")
            if not hmac.compare_digest(given.encode(), want.encode()):
                raise AuthError("missing or wrong bearer token")
        m = self.rt.manifest
        if hello.fingerprint != m.fingerprint:
            raise MismatchError(f"model fingerprint {hello.fingerprint[:12]!r} != this server's {m.fingerprint[:12]!r}")
        if hello.split != m.split:
            raise MismatchError(f"edge split K={hello.split} != this server's K={m.split}")

    async def _on_frame(self, data: bytes) -> None:
        try:
            msg = decode_frame(data, self.config.max_frame_bytes)
        except ProtocolError as e:
            await self._reply_error(e)
            return
        self.metrics.frames.labels(msg.KIND).inc()
        try:
            if not msg.REQUEST or isinstance(msg, Hello):
                raise BadFrame(f"{msg.KIND} is not a request a client may send after hello")
            if isinstance(msg, Ping):
                await self.send(Pong(id=msg.id, stamp=msg.stamp))
                return
            if self.rt.draining:
                raise ShuttingDown("server is shutting down", retry_after=1.0)
            if len(self.tasks) >= self.config.max_inflight_per_connection:
                raise Overloaded(f"{len(self.tasks)} requests in flight on this connection", retry_after=0.1)
        except ProtocolError as e:
            e.req_id, e.session = getattr(msg, "id", None), getattr(msg, "session", None)
            await self._reply_error(e)
            return
        task = asyncio.get_running_loop().create_task(self._serve(msg))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, msg: Message) -> None:
        try:
            reply = await self.rt.handle(msg)
        except ProtocolError as e:
            e.req_id = getattr(msg, "id", None)
            e.session = getattr(msg, "session", None)
            await self._reply_error(e)
            return
        except Exception as e:  # a server bug: tell the edge, keep serving everyone else
            log.exception("request %s from %s failed", msg.KIND, self.peer)
            await self._reply_error(InternalError(f"{msg.KIND} failed: {type(e).__name__}",
                                                  req_id=getattr(msg, "id", None),
                                                  session=getattr(msg, "session", None)))
            return
        if reply is not None:
            await self.send(reply)

    async def goodbye(self, reason: str) -> None:
        await self.send(Bye(reason=reason, retry_after=1.0))
        await self.close(CloseCode.GOING_AWAY, reason)


class Connections:
    """The open edge connections of one runtime: the connections gauge, and `bye` at shutdown."""

    def __init__(self, metrics: CloudMetrics) -> None:
        self.metrics = metrics
        self._open: set[EdgeConnection] = set()

    def __len__(self) -> int:
        return len(self._open)

    async def serve(self, transport: Transport, rt: CloudRuntime) -> None:
        """Speak the protocol on an accepted websocket until either side closes it."""
        conn = EdgeConnection(transport, rt)
        self._open.add(conn)
        self.metrics.connections.inc()
        try:
            await conn.run()
        finally:
            self._open.discard(conn)
            self.metrics.connections.dec()
            if not transport.closed:
                await transport.close(CloseCode.NORMAL, "")

    async def drain(self, rt: CloudRuntime, reason: str) -> None:
        """Refuse new work, let in-flight steps finish (up to shutdown_grace_s), then say goodbye to every edge."""
        rt.draining = True
        if not await rt.wait_idle(rt.config.shutdown_grace_s):
            log.warning("shutdown: %d request(s) still in flight after %.1f s", rt.inflight, rt.config.shutdown_grace_s)
        await asyncio.gather(*(c.goodbye(reason) for c in list(self._open)), return_exceptions=True)
