"""WAN emulator: an asyncio TCP proxy with delay, jitter, a bandwidth cap and scripted faults.

The kernel here has no netem, so edge<->cloud traffic is shaped by moving the
real bytes through this proxy. Each direction of each connection is modelled
as a link with bandwidth B and one-way propagation delay D: a chunk starts
transmitting when it arrives and the link is free, occupies the link for
size/B seconds, and is delivered D (+ jitter, order preserved) later.

Faults: `cut_all()` aborts every connection, `stall(s)` holds all traffic for s
seconds (nothing dropped), `refuse(s)` closes new connections for s seconds.

    python -m tools.wanem --listen 127.0.0.1:9100 --upstream 127.0.0.1:9000 \
        --delay-ms 25 --jitter-ms 2 --mbit 20 --script "30:cut,60:stall=5,90:refuse=10"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import time
from dataclasses import dataclass


@dataclass
class LinkShape:
    delay_ms: float = 0.0  # one-way
    jitter_ms: float = 0.0  # uniform in [-jitter, +jitter], never reorders
    mbit: float = 0.0  # 0 = unlimited

    @property
    def rtt_ms(self) -> float:
        return 2 * self.delay_ms


@dataclass
class ProxyStats:
    connections: int = 0
    refused: int = 0
    bytes_up: int = 0  # client -> upstream
    bytes_down: int = 0


class WanEmulator:
    """One listening port forwarding to one upstream, shaped by `shape`."""

    CHUNK = 64 * 1024

    def __init__(self, upstream: tuple[str, int], shape: LinkShape | None = None,
                 listen: tuple[str, int] = ("127.0.0.1", 0), seed: int = 0) -> None:
        self.upstream = upstream
        self.shape = shape or LinkShape()
        self.listen = listen
        self.stats = ProxyStats()
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task] = set()
        self._stall_until = 0.0
        self._refuse_until = 0.0

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return f"{self.listen[0]}:{self.port}"

    async def start(self) -> "WanEmulator":
        self._server = await asyncio.start_server(self._on_client, *self.listen)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.cut_all()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> "WanEmulator":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- faults ------------------------------------------------------------------------

    def cut_all(self) -> int:
        """Abort every open connection (both sides see a reset). Returns how many."""
        n = len(self._conns)
        for a, b in list(self._conns):
            for w in (a, b):
                with contextlib.suppress(Exception):
                    w.transport.abort()
        self._conns.clear()
        return n

    def stall(self, seconds: float) -> None:
        """Hold all traffic (both directions) for `seconds`; nothing is dropped."""
        self._stall_until = max(self._stall_until, time.monotonic() + seconds)

    def refuse(self, seconds: float) -> None:
        """Close new connections immediately for `seconds`."""
        self._refuse_until = max(self._refuse_until, time.monotonic() + seconds)

    # ---- forwarding --------------------------------------------------------------------

    async def _on_client(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        if time.monotonic() < self._refuse_until:
            self.stats.refused += 1
            c_writer.transport.abort()
            return
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            self.stats.refused += 1
            c_writer.transport.abort()
            return
        self.stats.connections += 1
        pair = (c_writer, u_writer)
        self._conns.add(pair)
        up = self._spawn(self._pipe(c_reader, u_writer, "up"))
        down = self._spawn(self._pipe(u_reader, c_writer, "down"))
        await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        for t in (up, down):
            t.cancel()
        self._conns.discard(pair)
        for w in pair:
            with contextlib.suppress(Exception):
                w.close()

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        sender = self._spawn(self._deliver(queue, writer, direction))
        link_free = 0.0
        last_delivery = 0.0
        try:
            while True:
                data = await reader.read(self.CHUNK)
                if not data:
                    break
                now = time.monotonic()
                s = self.shape
                start = max(now, link_free)
                link_free = start + (len(data) * 8 / (s.mbit * 1e6) if s.mbit > 0 else 0.0)
                jitter = self._rng.uniform(-s.jitter_ms, s.jitter_ms) / 1000 if s.jitter_ms else 0.0
                deliver_at = max(link_free + s.delay_ms / 1000 + jitter, last_delivery)
                last_delivery = deliver_at
                queue.put_nowait((deliver_at, data))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            queue.put_nowait(None)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender

    async def _deliver(self, queue: asyncio.Queue, writer: asyncio.StreamWriter, direction: str) -> None:
        while (item := await queue.get()) is not None:
            deliver_at, data = item
            while True:
                wait = max(deliver_at, self._stall_until) - time.monotonic()
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            try:
                writer.write(data)
                await writer.drain()
            except (ConnectionError, RuntimeError):
                return
            if direction == "up":
                self.stats.bytes_up += len(data)
            else:
                self.stats.bytes_down += len(data)
        with contextlib.suppress(Exception):
            writer.write_eof()


def parse_script(text: str) -> list[tuple[float, str, float]]:
    """'30:cut,60:stall=5,90:refuse=10' -> [(30, 'cut', 0), (60, 'stall', 5), (90, 'refuse', 10)]."""
    events = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        at, _, action = part.partition(":")
        name, _, arg = action.partition("=")
        if name not in ("cut", "stall", "refuse"):
            raise ValueError(f"unknown fault {name!r} in {part!r} (cut, stall=S, refuse=S)")
        events.append((float(at), name, float(arg or 0)))
    return sorted(events)


async def _run(args: argparse.Namespace) -> None:
    lh, lp = args.listen.rsplit(":", 1)
    uh, up = args.upstream.rsplit(":", 1)
    emu = WanEmulator((uh, int(up)), LinkShape(args.delay_ms, args.jitter_ms, args.mbit), (lh, int(lp)))
    await emu.start()
    print(f"wanem {emu.address} -> {args.upstream}: {args.delay_ms} ms one-way, ±{args.jitter_ms} ms, "
          f"{args.mbit or 'unlimited'} Mbit/s", flush=True)
    t0 = time.monotonic()
    try:
        for at, name, arg in parse_script(args.script or ""):
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            if name == "cut":
                print(f"[{at:.0f}s] cut {emu.cut_all()} connections", flush=True)
            elif name == "stall":
                emu.stall(arg)
                print(f"[{at:.0f}s] stall {arg}s", flush=True)
            else:
                emu.refuse(arg)
                print(f"[{at:.0f}s] refuse new connections for {arg}s", flush=True)
        await asyncio.Event().wait()
    finally:
        await emu.close()


def main() -> None:
    ap = argparse.ArgumentParser(description="asyncio TCP proxy that emulates a WAN link")
    ap.add_argument("--listen", default="127.0.0.1:9100")
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay")
    ap.add_argument("--jitter-ms", type=float, default=0.0)
    ap.add_argument("--mbit", type=float, default=0.0, help="bandwidth cap per direction, 0 = none")
    ap.add_argument("--script", default="", help="faults, e.g. '30:cut,60:stall=5,90:refuse=10'")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(ap.parse_args()))


if __name__ == "__main__":
    main()
