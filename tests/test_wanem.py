"""The WAN emulator moves real bytes over real sockets, late but intact.

Only lower bounds on time are asserted: a busy machine can make things slower,
never faster than the emulated link allows.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tools.wanem import LinkShape, WanEmulator, parse_script


async def _echo_server() -> asyncio.Server:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def _roundtrip(port: int, payload: bytes) -> tuple[bytes, float]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    w.write(payload)
    await w.drain()
    got = await r.readexactly(len(payload))
    dt = time.monotonic() - t0
    w.close()
    return got, dt


async def test_delay_and_bandwidth_are_applied_and_bytes_intact():
    server = await _echo_server()
    up = server.sockets[0].getsockname()
    async with WanEmulator(up, LinkShape(delay_ms=40, jitter_ms=5, mbit=20)) as emu:
        got, dt = await _roundtrip(emu.port, b"ping")
        assert got == b"ping" and dt >= 0.070  # 2 x (40 - 5) ms
        blob = bytes(range(256)) * 1024  # 256 KiB: >= 105 ms per direction at 20 Mbit/s
        got, dt = await _roundtrip(emu.port, blob)
        assert got == blob and dt >= 0.2
        assert emu.stats.bytes_up == emu.stats.bytes_down == len(blob) + 4
    server.close()


async def test_cut_stall_refuse():
    server = await _echo_server()
    up = server.sockets[0].getsockname()
    async with WanEmulator(up) as emu:
        r, w = await asyncio.open_connection("127.0.0.1", emu.port)
        w.write(b"a")
        assert await r.readexactly(1) == b"a"
        assert emu.cut_all() == 1
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            w.write(b"b")
            await w.drain()
            await asyncio.wait_for(r.readexactly(1), 2)

        emu.stall(0.3)
        got, dt = await _roundtrip(emu.port, b"held")
        assert got == b"held" and dt >= 0.25

        emu.refuse(0.3)
        r2, w2 = await asyncio.open_connection("127.0.0.1", emu.port)
        assert await asyncio.wait_for(r2.read(1), 2) == b""  # closed at once
        assert emu.stats.refused == 1
        await asyncio.sleep(0.35)
        assert (await _roundtrip(emu.port, b"back"))[0] == b"back"
    server.close()


def test_parse_script():
    assert parse_script("30:cut, 60:stall=5,90:refuse=10") == [(30, "cut", 0), (60, "stall", 5), (90, "refuse", 10)]
    with pytest.raises(ValueError, match="unknown fault"):
        parse_script("5:explode")
