"""The sd_notify protocol against a real AF_UNIX datagram socket that the test listens on (as systemd does)."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fogline import sd_notify
from fogline.sd_notify import Notifier, ProgressWatch, run_watchdog, start_watchdog, watchdog_interval

_CRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


class Listener:
    """What PID 1 does: a datagram socket with SO_PASSCRED, so each message carries its sender."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(10)  # only against a hang; no test depends on timing

    def recv(self) -> tuple[str, int]:
        data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(_CRED.size))
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _CRED.unpack(payload[:_CRED.size])[0]
        return data.decode(), pid

    def pending(self) -> list[str]:
        self.sock.setblocking(False)
        out = []
        try:
            while True:
                out.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            return out
        finally:
            self.sock.settimeout(10)


@pytest.fixture()
def path_listener(tmp_path: Path) -> Iterator[tuple[Listener, str]]:
    path = str(tmp_path / "notify")
    listener = Listener(path)
    yield listener, path
    listener.sock.close()


@pytest.fixture()
def abstract_listener() -> Iterator[tuple[Listener, str]]:
    name = f"fogline-test-{secrets.token_hex(8)}"
    listener = Listener(b"\0" + name.encode())
    yield listener, "@" + name
    listener.sock.close()


@pytest.mark.parametrize("which", ["path_listener", "abstract_listener"])
def test_protocol_messages(which: str, request: pytest.FixtureRequest) -> None:
    listener, address = request.getfixturevalue(which)
    n = Notifier({"NOTIFY_SOCKET": address})
    assert n.enabled
    assert n.ready("model loaded; serving on 127.0.0.1:8080")
    assert listener.recv() == ("READY=1\nSTATUS=model loaded; serving on 127.0.0.1:8080", os.getpid())
    assert n.watchdog()
    assert listener.recv()[0] == "WATCHDOG=1"
    assert n.status("queue 3\nrunning 2")  # one line, whatever the caller passed
    assert listener.recv()[0] == "STATUS=queue 3 running 2"
    assert n.extend_timeout(90)
    assert listener.recv()[0] == "EXTEND_TIMEOUT_USEC=90000000"
    assert n.watchdog_trigger()
    assert listener.recv()[0] == "WATCHDOG=trigger"
    assert n.stopping()
    assert listener.recv()[0] == "STOPPING=1"
    n.close()


def test_main_process_is_the_sender(path_listener: tuple[Listener, str], subprocess_env: dict[str, str]) -> None:
    """NotifyAccess=main: systemd accepts the message because the kernel says which process sent it."""
    listener, path = path_listener
    env = dict(subprocess_env, NOTIFY_SOCKET=path)
    child = subprocess.Popen([sys.executable, "-c", "from fogline import sd_notify; import sys; "
                              "sys.exit(0 if sd_notify.ready('up') else 3)"], env=env)
    message, pid = listener.recv()
    assert child.wait(timeout=60) == 0
    assert message == "READY=1\nSTATUS=up"
    assert pid == child.pid


def test_outside_systemd_everything_is_a_noop(tmp_path: Path) -> None:
    for env in ({}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:1234"}, {"NOTIFY_SOCKET": "@"}):
        n = Notifier(env)
        assert not n.enabled
        assert not n.ready() and not n.watchdog() and not n.stopping()


def test_a_gone_socket_is_reported_not_raised(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert n.enabled and n.ready() is False


def test_assignments_are_checked() -> None:
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent"})
    with pytest.raises(ValueError):
        n.send("READY=1\nSTATUS=sneaky")
    with pytest.raises(ValueError):
        n.send("READY")


def test_module_functions_use_notify_socket(path_listener: tuple[Listener, str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    listener, path = path_listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setattr(sd_notify, "_default", None)
    assert sd_notify.status("loading")
    assert listener.recv()[0] == "STATUS=loading"
    monkeypatch.setattr(sd_notify, "_default", None)


def test_watchdog_interval() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # meant for another process
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({}) is None


async def test_watchdog_pings_only_while_healthy(path_listener: tuple[Listener, str]) -> None:
    listener, path = path_listener
    n = Notifier({"NOTIFY_SOCKET": path})
    verdicts = iter([True, True, False, False, True])
    done = asyncio.Event()

    def healthy() -> bool:
        try:
            return next(verdicts)
        except StopIteration:
            done.set()
            return False

    task = asyncio.create_task(run_watchdog(healthy, notifier=n, interval_s=0.001))
    await done.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert listener.pending() == ["WATCHDOG=1", "WATCHDOG=1", "STATUS=unhealthy: watchdog pings withheld",
                                  "WATCHDOG=1", "STATUS=healthy again",
                                  "STATUS=unhealthy: watchdog pings withheld"]


async def test_watchdog_async_check_and_a_raising_check(path_listener: tuple[Listener, str]) -> None:
    listener, path = path_listener
    n = Notifier({"NOTIFY_SOCKET": path})
    calls = 0
    done = asyncio.Event()

    async def healthy() -> bool:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("engine thread is gone")
        if calls == 3:
            done.set()
        return True

    task = asyncio.create_task(run_watchdog(healthy, notifier=n, interval_s=0.001))
    await done.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert listener.pending()[:4] == ["WATCHDOG=1", "STATUS=unhealthy: watchdog pings withheld",
                                      "WATCHDOG=1", "STATUS=healthy again"]


async def test_start_watchdog_from_the_environment(path_listener: tuple[Listener, str]) -> None:
    listener, path = path_listener
    assert start_watchdog(lambda: True, notifier=Notifier({"NOTIFY_SOCKET": path}), env={}) is None
    n = Notifier({"NOTIFY_SOCKET": path})
    task = start_watchdog(lambda: True, notifier=n, env={"WATCHDOG_USEC": "2000"})  # pings every 1 ms
    assert task is not None
    await asyncio.sleep(0)  # let it run its first round
    assert listener.recv()[0] == "WATCHDOG=1"
    task.cancel()


def test_progress_watch() -> None:
    steps, busy = [0], [False]
    watch = ProgressWatch(lambda: steps[0], lambda: busy[0], patience=2)
    assert watch() and watch() and watch()  # idle: never unhealthy, however long
    busy[0] = True
    assert watch()  # busy, no step since the last check: tolerated once
    assert not watch()  # a second check with work and no step
    steps[0] += 1
    assert watch()  # it moved again
    assert watch() is True and watch() is False
    busy[0] = False
    assert watch()
