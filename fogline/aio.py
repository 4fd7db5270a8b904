"""asyncio helpers shared by the edge and cloud daemons (torch-free)."""

from __future__ import annotations

import asyncio
import contextlib


async def cancel_and_wait(task: asyncio.Task) -> None:
    """Cancel a background task and wait until it has really stopped (its cleanup has run)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
