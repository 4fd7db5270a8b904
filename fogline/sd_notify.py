"""The systemd notify protocol, spoken directly over `$NOTIFY_SOCKET` (no bindings).

A `Type=notify` service tells systemd how it is doing by sending newline-separated
`KEY=VALUE` assignments in one AF_UNIX datagram to the socket named in
`$NOTIFY_SOCKET` (see sd_notify(3)). A name starting with `@` is in the abstract
namespace (the `@` becomes a NUL byte); a name starting with `/` is a path. Outside
systemd the variable is unset and every call here is a cheap no-op returning False,
so the daemons call these functions unconditionally.

The messages fogline uses:

* `READY=1`      — the model is loaded and the server answers; systemd marks the unit
                   started (and units ordered after it may start).
* `WATCHDOG=1`   — "still healthy"; with `WatchdogSec=` systemd kills and (with
                   `Restart=on-failure`) restarts a service that stops sending it.
                   `run_watchdog()` sends it at half of `$WATCHDOG_USEC`, and only
                   while a health callback says yes, so a wedged engine is restarted
                   even though the event loop itself still runs.
* `STATUS=...`   — one line shown by `systemctl status`.
* `STOPPING=1`   — shutdown began (stop timeouts are counted from here).
* `EXTEND_TIMEOUT_USEC=...` — "still starting, give me this much longer"
                   (a slow SD card while loading a large GGUF).

With `NotifyAccess=main` systemd only accepts messages whose sender (the kernel
attaches the sender's credentials) is the unit's main process: send from the daemon
process itself, not from a helper subprocess.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
from collections.abc import Callable, Mapping

log = logging.getLogger("fogline.sd_notify")

HealthCheck = Callable[[], "bool | Awaitable[bool]"]


def socket_address(env: Mapping[str, str] | None = None) -> str | bytes | None:
    """The address to send to, as `socket.sendto` wants it, or None when not under systemd.

    Paths are returned as str, abstract names as bytes starting with NUL. Other
    schemes (`vsock:...`, used for VMs by newer systemd) are not supported: None.
    """
    raw = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if raw.startswith("/"):
        return raw
    if raw.startswith("@") and len(raw) > 1:
        return b"\0" + raw[1:].encode()
    return None


class Notifier:
    """One notify socket; `send()` never raises (a failed notification must not kill the daemon)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.address = socket_address(env)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send `KEY=VALUE` lines in one datagram. True if it was handed to the socket."""
        if self.address is None or not assignments:
            return False
        for a in assignments:
            if "=" not in a or "\n" in a:
                raise ValueError(f"not a single KEY=VALUE assignment: {a!r}")
        payload = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # never block the daemon's event loop on a reader that does not drain its socket
                self._sock.setblocking(False)
            self._sock.sendto(payload, self.address)
            return True
        except OSError as e:  # systemd gone, socket removed, buffer full: report, carry on
            log.warning("sd_notify to %r failed: %s", self.address, e)
            self.close()
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # the protocol's words
    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([_status(status)] if status else []))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def watchdog_trigger(self) -> bool:
        """Ask systemd to act as if the watchdog expired now (a dead engine: restart me)."""
        return self.send("WATCHDOG=trigger")

    def status(self, text: str) -> bool:
        return self.send(_status(text))

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([_status(status)] if status else []))

    def extend_timeout(self, seconds: float) -> bool:
        return self.send(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")


def _status(text: str) -> str:
    return "STATUS=" + " ".join(text.split())  # one line, whatever the caller passed


_default: Notifier | None = None


def default_notifier() -> Notifier:
    """The process-wide notifier for `$NOTIFY_SOCKET` (read once, on first use)."""
    global _default
    if _default is None:
        _default = Notifier()
    return _default


def ready(status: str | None = None) -> bool:
    return default_notifier().ready(status)


def watchdog() -> bool:
    return default_notifier().watchdog()


def status(text: str) -> bool:
    return default_notifier().status(text)


def stopping(status: str | None = None) -> bool:
    return default_notifier().stopping(status)


def extend_timeout(seconds: float) -> bool:
    return default_notifier().extend_timeout(seconds)


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds systemd waits for a WATCHDOG=1 (`$WATCHDOG_USEC`), or None if it is not watching us.

    `$WATCHDOG_PID`, when set, names the process the watchdog is meant for; a child
    that inherited the environment must not ping on its parent's behalf.
    """
    env = os.environ if env is None else env
    pid = env.get("WATCHDOG_PID", "").strip()
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


async def run_watchdog(healthy: HealthCheck, *, notifier: Notifier | None = None,
                       interval_s: float | None = None, env: Mapping[str, str] | None = None) -> None:
    """Ping WATCHDOG=1 every `interval_s` (default: half of `$WATCHDOG_USEC`) while `healthy()` is true.

    `healthy` may be a plain or an async function; an exception counts as unhealthy.
    When it says no, nothing is sent and STATUS says why the pings stopped, so if it
    stays unhealthy past WatchdogSec systemd restarts the service. Returns at once
    when no watchdog is configured; otherwise runs until cancelled.
    """
    notifier = notifier or default_notifier()
    if interval_s is None:
        limit = watchdog_interval(env)
        if limit is None or not notifier.enabled:
            return
        interval_s = limit / 2
    was_healthy = True
    while True:
        try:
            result = healthy()
            ok = bool(await result) if inspect.isawaitable(result) else bool(result)
        except Exception as e:  # a broken health check is a failed health check
            log.warning("health check raised %r; withholding the watchdog ping", e)
            ok = False
        if ok:
            notifier.watchdog()
            if not was_healthy:
                log.info("healthy again; watchdog pings resumed")
                notifier.status("healthy again")
        elif was_healthy:
            log.error("unhealthy: withholding watchdog pings (systemd restarts the service after WatchdogSec)")
            notifier.status("unhealthy: watchdog pings withheld")
        was_healthy = ok
        await asyncio.sleep(interval_s)


class ProgressWatch:
    """A health check for a worker loop: unhealthy once it has work but its progress
    counter stayed put for `patience` consecutive checks.

    With `run_watchdog` checking every WatchdogSec/2, patience=2 means a loop that
    made no step for about one WatchdogSec stops the pings, and systemd restarts
    the service one WatchdogSec later. Raise WatchdogSec (a drop-in) where one step
    can legitimately take that long (a long prompt on a big model on a Pi).
    """

    def __init__(self, progress: Callable[[], int], busy: Callable[[], bool], patience: int = 2) -> None:
        self._progress, self._busy, self.patience = progress, busy, patience
        self._last: int | None = None
        self.stale = 0

    def __call__(self) -> bool:
        now = self._progress()
        if not self._busy() or now != self._last:
            self.stale = 0
        else:
            self.stale += 1
        self._last = now
        return self.stale < self.patience


def start_watchdog(healthy: HealthCheck, *, notifier: Notifier | None = None,
                   env: Mapping[str, str] | None = None) -> asyncio.Task[None] | None:
    """Start `run_watchdog` as a task on the running loop; None when systemd is not watching.

    Cancel the returned task on shutdown (before sending STOPPING=1).
    """
    notifier = notifier or default_notifier()
    if watchdog_interval(env) is None or not notifier.enabled:
        return None
    return asyncio.get_running_loop().create_task(run_watchdog(healthy, notifier=notifier, env=env),
                                                  name="sd-watchdog")
