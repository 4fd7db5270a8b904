"""The benchmarks' child processes: a free port, an HTTP daemon started and awaited, a clean stop.

One copy for tools/bench_collab.py, tools/bench_capacity.py and tools/bench_cloud.py (and
tools/llama_ref.py through bench_capacity), so a daemon that never comes up fails the same way
everywhere: one line naming its log.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def repo_env(repo: Path = REPO) -> dict[str, str]:
    """This environment with `repo`'s checkout first on the child's sys.path."""
    return dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def start_http(argv: list[str], port: int, log_path: str | os.PathLike[str], *, health: str = "/health",
               timeout_s: float = 240.0, repo: Path = REPO, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python argv...` run from `repo`, its output in `log_path`; returns once `health` answers on
    127.0.0.1:`port`, or exits the benchmark naming the log if the child dies or the time runs out."""
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, *argv], stdout=log_file, stderr=subprocess.STDOUT,
                                env=env if env is not None else repo_env(repo), cwd=repo)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{health}", timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"{' '.join(argv[:3])} did not come up on port {port}; see {log_path}")
            time.sleep(0.2)


def stop(*procs: subprocess.Popen | None) -> None:
    """SIGTERM each (a graceful drain), SIGKILL what has not exited after 30 s."""
    for p in procs:
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
