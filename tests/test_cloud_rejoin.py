"""A fallback is not forever (issue 12.6): a request whose cloud died rejoins it once it is back.

Real processes: two `fogline cloud serve` and one `fogline edge serve`, the edge's link going
through tools/wanem.py. Mid-stream the serving cloud is killed with SIGKILL; 2 s later the
proxy points at the second cloud, which has never seen the session (a restart at the same
address, without waiting for a model to load). The long cloud-mode request must leave
the cloud, continue on the edge, rejoin (fresh session, its h_K history replayed) within a
moment of the link being back, and make most of its remaining tokens at the cloud.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.edge_server_util import edge_env, edge_server, free_port, wait_cloud_connected, wan_proxy
from tests.test_collab_modes import Cloud

# The 200 tokens: here the edge alone makes ~100 tokens/s, so a 200-token request would end
# inside the outage; 450 leave room for the rejoin (prompt + 450 < ctx 512).
N = 450
OUTAGE_S = 2.0

pytestmark = pytest.mark.slow


def test_killed_cloud_back_after_2s_the_request_rejoins(demo_bundle, tmp_path):
    from openai import OpenAI

    first = Cloud(demo_bundle, free_port(), tmp_path / "cloud1.log")
    second = Cloud(demo_bundle, free_port(), tmp_path / "cloud2.log")
    try:
        first.start()
        second.start()
        with (wan_proxy(first.port) as wan,
              edge_server(demo_bundle / "edge", tmp_path / "edge.log",
                          env=edge_env(f"ws://127.0.0.1:{wan.port}/ws", FOGLINE_EDGE_CLOUD_DEADLINE_MS="500",
                                       FOGLINE_EDGE_CTX_SIZE="512", FOGLINE_EDGE_CLOUD_PING_S="0.3")) as srv):
            wait_cloud_connected(srv)
            c = OpenAI(base_url=srv.v1, api_key="unused", max_retries=0, timeout=600)
            origins: list[tuple[float, str]] = []
            stats: dict = {}
            t_back = 0.0
            for ch in c.completions.create(model="m", prompt="Write a long story about a lighthouse keeper and the sea.", max_tokens=N, temperature=0, stream=True,
                                           extra_body={"mode": "cloud", "ignore_eos": True}):
                extra = (ch.choices[0].model_extra or {}) if ch.choices else {}
                f = extra.get("fogline") or ch.model_extra.get("fogline") or {}
                if "origin" in f:
                    origins.append((time.monotonic(), f["origin"]))
                    if len(origins) == 20:
                        first.kill()  # mid-stream, SIGKILL

                        def back() -> None:
                            nonlocal t_back
                            wan.upstream = ("127.0.0.1", second.port)  # "restarted" at the same address
                            t_back = time.monotonic()
                        threading.Timer(OUTAGE_S, back).start()
                elif "mode" in f:
                    stats = f
            assert len(origins) >= N - 5 and stats, (len(origins), stats)  # a token with no visible text has no chunk
            print(f"\nfogline: {stats}")
            assert stats["fallback"], stats  # the first departure's reason stays in `fallback`
            fb = stats["fallbacks"]
            assert fb and fb[0]["at_token"] >= 20 and fb[0]["rejoined_at_token"] is not None, fb
            left, back_at = fb[0]["at_token"], fb[0]["rejoined_at_token"]
            after = [o for _, o in origins[back_at:]]
            during = [o for _, o in origins[left:back_at]]
            t_rejoin = origins[back_at][0]
            print(f"left at token {left}, rejoined at {back_at} ({t_rejoin - t_back:.2f} s after the link was back); "
                  f"{len(during)} edge tokens during the outage, {after.count('cloud')}/{len(after)} cloud after")
            assert during.count("edge") >= 0.95 * len(during)  # (chunk index ~ token index: see above)
            assert t_rejoin - t_back < 2.0, "rejoined too late"
            assert after and after.count("cloud") >= 0.9 * len(after), after
            assert stats["cloud_tokens"] >= N - len(during) - 5, stats
            log = srv.log()
            assert "lost the cloud link" in log and "rejoined the cloud" in log, log[-3000:]
    finally:
        first.kill()
        second.stop()
