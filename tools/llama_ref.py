"""The off-the-shelf reference client: one streaming chat completion at a time against
`python -m llama_cpp.server` (OpenAI API, server-sent events), stamping each content chunk.

A stream the server drops or answers with an error is counted in the session's errors.
"""

from __future__ import annotations

import json
import time
from typing import Any

from tools.loadgen import SessionResult


async def replay_llama_server(base: str, prompts: list[str], max_tokens: int, out: SessionResult,
                              http: Any) -> None:
    for prompt in prompts:
        stamps: list[float] = [time.monotonic()]
        out.runs.append(stamps)
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
                "stream": True}
        async with http.post(f"{base}/v1/chat/completions", json=body) as r:
            if r.status != 200:
                out.errors.append(f"HTTP {r.status}: {(await r.text())[:200]}")
                return
            done = False
            async for line in r.content:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                ch = json.loads(data)
                if (ch.get("choices") or [{}])[0].get("delta", {}).get("content"):
                    stamps.append(time.monotonic())
                    out.replies += 1
            if not done:
                out.errors.append("stream ended without [DONE]")
                return
