"""`auto` learns from what the daemon really sees (issue 12.5), end to end.

Real processes: `fogline cloud serve` and `fogline edge serve` on the production export (exit
adapter on), the edge's link going through tools/wanem.py. The policy's inputs are live: the
link RTT (pings), the cloud's own step and queue times (in every reply), spec acceptance
(verdicts) and collab agreement (the cloud's checks of the exit's tokens). On a fast link
`auto` must pick an arm that uses the cloud (the edge alone is below the quality floor); when
the link slows to an 800 ms round trip no cloud arm can meet the SLO and it must switch to
`edge`; when the link is fast again it must go back to the cloud.
"""

from __future__ import annotations

import time

import pytest

from tests.edge_server_util import edge_env, edge_server, free_port, wait_cloud_connected, wan_proxy
from tests.test_collab_modes import Cloud

pytestmark = pytest.mark.slow

SLO_MS = 120.0
FAST_DELAY_MS, SLOW_DELAY_MS = 2.0, 400.0  # one way: RTT 4 ms, then 800 ms
PROMPT = "Explain in a few sentences how a bicycle gear works."


def _rtt(srv) -> float | None:
    return srv.health()[1]["cloud"].get("rtt_ms")


def _wait_rtt(srv, ok, timeout: float = 60.0) -> float:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        rtt = _rtt(srv)
        if rtt is not None and ok(rtt):
            return rtt
        time.sleep(0.2)
    raise AssertionError(f"the edge's RTT estimate never settled: {_rtt(srv)}")


def test_auto_switches_to_edge_when_the_link_slows_and_back_when_it_recovers(demo_bundle_adapter, tmp_path):
    from openai import OpenAI

    from tools.wanem import LinkShape

    cloud = Cloud(demo_bundle_adapter, free_port(), tmp_path / "cloud.log")
    cloud.start()
    try:
        with (wan_proxy(cloud.port, LinkShape(delay_ms=FAST_DELAY_MS)) as wan,
              edge_server(demo_bundle_adapter / "edge", tmp_path / "edge.log",
                          env=edge_env(f"ws://127.0.0.1:{wan.port}/ws", FOGLINE_EDGE_CLOUD_PING_S="0.3",
                                       FOGLINE_EDGE_CLOUD_DEADLINE_MS="20000")) as srv):
            wait_cloud_connected(srv)
            c = OpenAI(base_url=srv.v1, api_key="unused", max_retries=0, timeout=600)

            def ask(mode: str, n: int = 24, **extra) -> dict:
                r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}], max_tokens=n,
                                              temperature=0, extra_body={"mode": mode, "ignore_eos": True, **extra})
                return r.model_extra["fogline"]

            for _ in range(2):  # the edge's own speed (auto measures it on edge-mode requests)
                ask("edge")
            # collab's agreement comes back measured by the cloud (a share of the exit's tokens checked)
            f = ask("collab", 48, fogline_tau=0.3)
            agreement = f.get("agreement")
            assert agreement and 0 < agreement["checked"] <= f["edge_tokens"], f
            assert 0 <= agreement["agreed"] <= agreement["checked"], f

            fast = [ask("auto", fogline_slo_ms=SLO_MS)["auto"] for _ in range(4)]
            print("\nfast link:", [(a["arm"], a["measured"]["rtt_ms"], a["measured"]["cloud_step_ms"]) for a in fast])
            assert all(a["arm"] != "edge" for a in fast), fast  # the edge alone is below the quality floor
            last = fast[-1]["measured"]
            assert last["cloud_step_ms"] is not None and last["cloud_step_ms"] > 0, last  # reported by the cloud
            assert last["cloud_queue_ms"] is not None and last["rtt_ms"] < 100, last
            assert last["edge_tps"] is not None, last

            wan.shape.delay_ms = SLOW_DELAY_MS
            rtt = _wait_rtt(srv, lambda r: r > 600)
            slow = [ask("auto", fogline_slo_ms=SLO_MS)["auto"] for _ in range(3)]
            print(f"slow link (ping EMA {rtt:.0f} ms):", [(a["arm"], a["reason"]) for a in slow])
            assert all(a["arm"] == "edge" for a in slow), slow
            assert all(a["measured"]["rtt_ms"] > 600 for a in slow), slow
            assert "SLO" in slow[0]["reason"], slow[0]

            wan.shape.delay_ms = FAST_DELAY_MS
            _wait_rtt(srv, lambda r: r < 30)
            back = [ask("auto", fogline_slo_ms=SLO_MS)["auto"] for _ in range(3)]
            print("fast again:", [a["arm"] for a in back])
            assert all(a["arm"] != "edge" for a in back), back
    finally:
        cloud.stop()
