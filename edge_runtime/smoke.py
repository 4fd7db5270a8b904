"""A llama.cpp smoke decode in a child process, so that a native crash is a diagnosis.

A llama.cpp build that does not fit its host dies with a signal inside
`llama_decode` (the AMX case of fogline/host.py), taking its process along.
The test suite's pre-flight (tests/conftest.py) and `fogline doctor` therefore
decode a few tokens in a child first, through fogline's own loader (the same
model params as every other load), and turn a death into one line naming the
signal, llama.cpp's system info and the fix.

The child prints its llama.cpp facts before it loads anything, so they survive
a crash. `python -m edge_runtime.smoke GGUF` runs the child by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_INFO, _RESULT = "FOGLINE_SMOKE_INFO ", "FOGLINE_SMOKE_RESULT "
PROMPT = "The capital of France is"
FIX = ("rebuild llama-cpp-python for this host (`make setup` runs `python -m fogline.llama_build`), "
       "or set FOGLINE_LLAMA_EXTRA_BUFTS=off")


@dataclass(frozen=True)
class SmokeShape:
    """The context the child decodes in: tiny for the pre-flight, the daemon's for the doctor."""

    n_ctx: int = 256
    n_seq: int = 1
    n_batch: int = 64
    prefill: int = 0  # prompt tokens to prefill (the prompt repeated); 0: the prompt once
    tokens: int = 8  # greedy tokens to decode after the prompt
    # 0: the edge's default (physical cores). One thread by default: a smoke test needs no speed,
    # and OpenMP threads on a busy machine wait on each other for whole scheduler slices.
    threads: int = 1


@dataclass(frozen=True)
class SmokeResult:
    ok: bool
    summary: str  # one line: what happened
    version: str | None = None
    system_info: str | None = None
    use_extra_bufts: bool | None = None
    decision: str | None = None
    tokens_per_s: float | None = None  # greedy decode, one token per step
    prefill_tokens_per_s: float | None = None
    peak_rss: int | None = None  # bytes, the child's high-water mark
    text: str | None = None
    signal: str | None = None
    stderr: str = ""  # the child's (llama.cpp logs there with FOGLINE_LLAMA_VERBOSE=1)


def run_smoke(gguf: str | os.PathLike[str], shape: SmokeShape = SmokeShape(), *, timeout: float = 120.0,
              env: Mapping[str, str] | None = None, command: Sequence[str] | None = None) -> SmokeResult:
    """Decode in a child and report. `command` replaces `python -m edge_runtime.smoke` (tests)."""
    argv = [*(command or (sys.executable, "-m", "edge_runtime.smoke")), str(gguf),
            "--ctx", str(shape.n_ctx), "--seqs", str(shape.n_seq), "--batch", str(shape.n_batch),
            "--prefill", str(shape.prefill), "--tokens", str(shape.tokens), "--threads", str(shape.threads)]
    child_env = dict(os.environ if env is None else env)
    repo = str(Path(__file__).resolve().parent.parent)
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, child_env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=child_env)
    except subprocess.TimeoutExpired:
        return SmokeResult(False, f"llama.cpp smoke decode of {gguf} did not finish in {timeout:.0f} s")
    info = _tagged(proc.stdout, _INFO) or {}
    result = _tagged(proc.stdout, _RESULT)
    facts = dict(version=info.get("version"), system_info=info.get("system_info"),
                 use_extra_bufts=info.get("use_extra_bufts"), decision=info.get("decision"), stderr=proc.stderr)
    if proc.returncode == 0 and result is not None:
        return SmokeResult(True, f"prefilled {result['prompt']} tokens at {result['prefill_tokens_per_s']:.0f} tok/s, "
                                 f"decoded {result['tokens']} at {result['tokens_per_s']:.1f} tok/s",
                           tokens_per_s=result["tokens_per_s"], prefill_tokens_per_s=result["prefill_tokens_per_s"],
                           peak_rss=result["peak_rss"], text=result["text"], **facts)
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        summary = (f"llama.cpp smoke decode of {gguf} died with {name}; llama.cpp {facts['version']} system info: "
                   f"{facts['system_info']}; fogline's load params: use_extra_bufts={facts['use_extra_bufts']}. "
                   f"Fix: {FIX}")
        return SmokeResult(False, summary, signal=name, **facts)
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return SmokeResult(False, f"llama.cpp smoke decode of {gguf} failed (exit {proc.returncode}): {tail}", **facts)


def _tagged(stdout: str, tag: str) -> dict | None:
    for line in stdout.splitlines():
        if line.startswith(tag):
            return json.loads(line[len(tag):])
    return None


def _child(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_runtime.smoke", description="decode a few tokens of a GGUF")
    p.add_argument("gguf")
    p.add_argument("--ctx", type=int, default=SmokeShape.n_ctx)
    p.add_argument("--seqs", type=int, default=SmokeShape.n_seq)
    p.add_argument("--batch", type=int, default=SmokeShape.n_batch)
    p.add_argument("--prefill", type=int, default=SmokeShape.prefill)
    p.add_argument("--tokens", type=int, default=SmokeShape.tokens, help="at least 2")
    p.add_argument("--threads", type=int, default=SmokeShape.threads)
    a = p.parse_args(argv)
    if a.tokens < 2:
        p.error("--tokens must be at least 2 (the first comes from the prompt)")
    from edge_runtime.config import physical_cores
    from edge_runtime.llama_backend import BatchRow, LlamaContext, LlamaModel, load_decision, prefill, system_info

    import llama_cpp

    decision = load_decision()
    print(_INFO + json.dumps({"version": llama_cpp.__version__, "system_info": system_info(),
                              "use_extra_bufts": decision.use_extra_bufts, "decision": decision.reason}), flush=True)
    model = LlamaModel(a.gguf)
    ctx = LlamaContext(model, n_ctx=a.ctx, n_batch=a.batch, n_seq=a.seqs, n_threads=a.threads or physical_cores())
    prompt = model.tokenize(PROMPT)
    while len(prompt) < a.prefill:
        prompt += model.tokenize(" " + PROMPT, add_special=False)
    if a.prefill:
        prompt = prompt[:a.prefill]
    start = time.perf_counter()
    token = int(prefill(ctx, prompt, capture_hidden=False).logits[-1].argmax())
    prefill_s = time.perf_counter() - start
    out, start = [token], time.perf_counter()
    for i in range(a.tokens - 1):
        logits = ctx.decode([BatchRow(out[-1], len(prompt) + i, 0, True)]).logits
        out.append(int(logits[-1].argmax()))
    seconds = time.perf_counter() - start
    print(_RESULT + json.dumps({"prompt": len(prompt), "prefill_tokens_per_s": len(prompt) / prefill_s,
                                "tokens": len(out), "tokens_per_s": (len(out) - 1) / seconds,
                                "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                                "text": model.detokenize(out)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child())
