"""`auto` mode inside the edge daemon: live measurements -> AutoPolicy -> one concrete mode.

Per request the HTTP layer asks `AutoMode.choose` for a `Decision` (which arm, and why),
runs the arm as an ordinary request (`plan`: mode, collab τ, spec γ), puts the decision in
the response's `fogline.auto`, and reports the finished request with `finish`, which the
policy learns from. The policy itself (edge_runtime.policy) is pure; this module is where
its inputs come from:

* edge tokens/s — an EMA over finished `edge`-mode requests (first to last token, one
  sequence's decode speed as the client saw it);
* RTT and "connected" — the CloudBridge's ping EMA and link state (no bridge: cloud down);
* cloud step and queue time — EMAs of what the cloud itself reports in every reply to a
  deep-layer step (`step_ms`: its batched pass, `queue_ms`: its wait in the batcher queue), so
  a loaded cloud looks slower to the policy before any request misses its SLO;
* spec acceptance — the CloudBridge's discounted count of accepted / rejected drafts,
  which SpecSource records per verdict;
* collab agreement of the exit's own tokens — per request, the cloud's agreement checks
  (`fogline.agreement`: a sample of the edge-emitted tokens compared with the deep model's
  greedy token in the same pass), which the policy learns each τ's a_τ from;
* device state — `device_state(monitor.latest)`: hot/throttling or on battery.

Everything runs on the event loop (no locks). Torch-free.
"""

from __future__ import annotations

import logging
from typing import Any

from edge_runtime.device_monitor import DeviceMonitor, device_state
from edge_runtime.engine import FoglineStats
from edge_runtime.policy import (DEFAULT_ARMS, AutoPolicy, Decision, Measurements, Outcome, PolicyConfig,
                                 RequestContext, TauPoint)

log = logging.getLogger("fogline.edge.auto")

EDGE_TPS_EMA = 0.2  # weight of the newest request in the edge speed estimate


def policy_config(cfg: Any, calibration: dict[str, Any] | None = None) -> PolicyConfig:
    """The policy's config from EdgeConfig (+ the bundle's calibration table when it has one)."""
    points: list[TauPoint] = []
    prior_acceptance = PolicyConfig.prior_acceptance
    if isinstance(calibration, dict):
        for p in calibration.get("curve") or ():
            try:
                if p.get("agreement") is not None:
                    points.append(TauPoint(float(p["tau"]), float(p["exit_rate"]), float(p["agreement"])))
            except (AttributeError, KeyError, TypeError, ValueError):
                continue
        top1 = calibration.get("agreement_top1")
        if isinstance(top1, (int, float)) and 0.0 < top1 < 1.0:
            prior_acceptance = float(top1)
    return PolicyConfig(arms=DEFAULT_ARMS, slo_ms=cfg.slo_ms, min_quality=cfg.min_quality, seed=cfg.policy_seed,
                        prior_acceptance=prior_acceptance, calibration=tuple(points))


class AutoMode:
    """One per daemon: the policy plus where its measurements come from."""

    def __init__(self, cfg: Any, monitor: DeviceMonitor) -> None:
        self.cfg, self.monitor = cfg, monitor
        self.policy = AutoPolicy(policy_config(cfg))
        self.bridge: Any = None  # CloudBridge once the runtime is loaded with a cloud_url
        self.edge_tps: float | None = None
        self.decisions = 0

    def seed(self, calibration: dict[str, Any] | None, bridge: Any) -> None:
        """Once the bundle is loaded (before any request): its calibration priors, the cloud link."""
        self.bridge = bridge
        if calibration:
            self.policy = AutoPolicy(policy_config(self.cfg, calibration))

    # ----------------------------------------------------------------- inputs

    def observe_edge_speed(self, tokens: int, decode_s: float) -> None:
        """A finished edge-mode request: `tokens` generated over `decode_s` (first to last token)."""
        if tokens < 2 or decode_s <= 0:
            return
        tps = (tokens - 1) / decode_s
        self.edge_tps = tps if self.edge_tps is None else (1 - EDGE_TPS_EMA) * self.edge_tps + EDGE_TPS_EMA * tps

    def measurements(self) -> Measurements:
        b = self.bridge
        if b is None:
            return Measurements(edge_tps=self.edge_tps, cloud_up=False)
        return Measurements(edge_tps=self.edge_tps,
                            rtt_ms=None if b.rtt_s is None else b.rtt_s * 1000.0,
                            cloud_step_ms=b.cloud_step_ms, cloud_queue_ms=b.cloud_queue_ms,
                            cloud_up=bool(b.connected),
                            acceptance=b.acceptance)

    # ----------------------------------------------------------------- decide / learn

    def choose(self, slo_ms: float | None) -> Decision:
        dev = device_state(self.monitor.latest, self.cfg.hot_c)
        d = self.policy.choose(self.measurements(), dev, RequestContext(slo_ms=slo_ms))
        self.decisions += 1
        log.debug("auto: %s (%s)", d.arm.name, d.reason)
        return d

    @staticmethod
    def plan(decision: Decision) -> tuple[str, float | None, int | None]:
        """(engine mode, collab τ, spec γ) that run the decision's arm."""
        arm = decision.arm
        if arm.mode == "collab":
            return "collab", arm.param, None
        if arm.mode == "spec":
            return "spec", None, int(arm.param)
        return arm.mode, None, None

    def finish(self, decision: Decision, stats: FoglineStats, tokens: int, decode_s: float) -> None:
        """Report what the request did; its `fogline.auto` object is `decision.to_fogline()`."""
        spec = decision.arm.mode == "spec"
        outcome = Outcome(
            tokens=tokens, decode_ms=decode_s * 1000.0,
            cloud_passes=stats.cloud_round_trips,
            cloud_decided=stats.cloud_tokens if decision.arm.mode == "collab" else None,
            drafted=stats.drafted if spec else None,
            accepted=stats.accepted if spec and stats.drafted else None,
            rejections=stats.rejections if spec and stats.drafted else None,
            checked=stats.checked or None, agreed=stats.agreed if stats.checked else None,
            fell_back=stats.fallback is not None,
            measured=self.measurements())
        self.policy.update(decision, outcome)
