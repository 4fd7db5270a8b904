"""Simulate the `auto` policy on synthetic latency traces and compare it with every fixed mode.

    python tools/policy_sim.py [--seed 0] [--requests 400] [--json]

Each scenario is a sequence of requests over a world that changes (link RTT,
cloud step time and queueing, cloud up or down, edge speed, device hot or on
battery). For every request the simulator computes what *each* arm would have
done in that same world, with the same random draws (per-token confidences,
agreement and acceptance draws, link jitter), so "could any arm have met the
SLO?" and "what would the best fixed arm have cost?" have exact answers.

The policy only sees what the daemon would: EWMAs of past measurements (it
learns of a link change or an outage one request late), the device state, and
the outcomes of the arms it actually played. The simulated system also differs
from the policy's formula on purpose (per-consult serialization overhead, a
cycle overhead for spec, a different shallow share), which the policy's per-arm
correction ρ must learn.

Checks, per scenario:
* SLO: among requests where at least one arm met the SLO, the policy met it on
  >= 95%;
* cost: no fixed arm that is as punctual (SLO on >= 95% of those requests) and
  at least as good (mean quality >= min(floor, the policy's quality)) is cheaper
  by more than 10% — cost being cloud passes per token, plus the device penalty
  λ per local token while the board is hot or on battery (the policy's objective);
* quality: the policy's quality is at least min(floor, the best quality of any
  punctual fixed arm) − 0.02.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_runtime.policy import (Arm, AutoPolicy, DeviceState, Measurements, Outcome,  # noqa: E402
                                 PolicyConfig)


@dataclass(frozen=True)
class World:
    """The true state of everything during one request."""

    edge_tps: float
    rtt_ms: float
    step_ms: float
    queue_ms: float = 0.0
    cloud_up: bool = True
    hot: bool = False
    on_battery: bool = False


@dataclass(frozen=True)
class Truth:
    """How the simulated system really behaves (the policy is not told any of this)."""

    alpha: float = 0.72  # exit head agrees with the full model / a draft token is accepted
    consult: dict[float, float] = field(default_factory=lambda: {0.6: 0.22, 0.8: 0.38, 0.9: 0.55})
    emitted_agree: dict[float, float] = field(default_factory=lambda: {0.6: 0.86, 0.8: 0.94, 0.9: 0.975})
    shallow_share: float = 0.7
    consult_overhead_ms: float = 1.5  # msgpack + h_K serialization per cloud-decided token
    cycle_overhead_ms: float = 2.0  # per spec cycle
    edge_noise_sd: float = 0.05  # per-request lognormal on edge speed
    rtt_jitter_sd: float = 0.12  # per-request lognormal on the mean RTT
    fallback_deadline_ms: float = 1500.0  # a request that meets a dead cloud waits this, then runs at the edge


@dataclass(frozen=True)
class Scenario:
    name: str
    about: str
    world: Callable[[int, int], World]  # (request index, number of requests) -> World
    slo_ms: float = 60.0
    min_quality: float = 0.9


def _ramp(i: int, n: int, start: float, end: float, a: float, b: float) -> float:
    """a before fraction `start` of the run, b after `end`, linear in between."""
    x = i / n
    if x <= start:
        return a
    if x >= end:
        return b
    return a + (b - a) * (x - start) / (end - start)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("good_link", "LAN-class link (15 ms RTT), fast cloud: cheap quality from collab/spec",
             lambda i, n: World(edge_tps=25, rtt_ms=15, step_ms=8)),
    Scenario("slow_link", "cellular link (90 ms RTT): only few round trips per token fit the SLO",
             lambda i, n: World(edge_tps=25, rtt_ms=90, step_ms=8)),
    Scenario("degrading_link", "RTT climbs from 15 to 200 ms over the middle of the run",
             lambda i, n: World(edge_tps=25, rtt_ms=_ramp(i, n, 0.35, 0.6, 15, 200), step_ms=8)),
    Scenario("hot_device", "second half: the board reports hot and throttles (25 -> 18 tok/s)",
             lambda i, n: World(edge_tps=25 if i < n // 2 else 18, rtt_ms=15, step_ms=8, hot=i >= n // 2),
             slo_ms=75.0),
    Scenario("cloud_outage", "the cloud is unreachable for the middle quarter of the run",
             lambda i, n: World(edge_tps=25, rtt_ms=15, step_ms=8, cloud_up=not (0.4 * n <= i < 0.65 * n))),
    Scenario("busy_cloud_on_battery", "on battery; cloud queueing rises from 0 to 60 ms",
             lambda i, n: World(edge_tps=25, rtt_ms=20, step_ms=8, queue_ms=_ramp(i, n, 0.3, 0.7, 0, 60),
                                on_battery=True)),
)


@dataclass
class Result:
    """What one arm (or the policy) did on one request."""

    ms_per_token: float
    passes: int
    tokens: int
    agreed: float  # tokens equal to the full model's (expected count)
    local: int  # tokens decided at the edge
    outcome: Outcome


def run_arm(arm: Arm, w: World, truth: Truth, draws: dict[str, np.ndarray | float], tokens: int) -> Result:
    """One request of `tokens` tokens through `arm` in world `w`."""
    t_e = 1000.0 / w.edge_tps * float(draws["edge_noise"])
    trip = w.rtt_ms * float(draws["rtt_factor"]) + w.step_ms + w.queue_ms
    agree_edge = draws["agree"][:tokens] < truth.alpha  # type: ignore[index]
    if arm.mode != "edge" and not w.cloud_up:  # wait for the dead cloud, then finish at the edge
        agreed = int(agree_edge.sum())
        ms = t_e + truth.fallback_deadline_ms / tokens
        return Result(ms, 0, tokens, agreed, tokens, Outcome(tokens, ms * tokens, fell_back=True))
    if arm.mode == "edge":
        agreed = int(agree_edge.sum())
        return Result(t_e, 0, tokens, agreed, tokens,
                      Outcome(tokens, t_e * tokens, checked=tokens, agreed=agreed))
    if arm.mode == "cloud":
        ms = truth.shallow_share * t_e + trip + truth.consult_overhead_ms
        return Result(ms, tokens, tokens, tokens, 0, Outcome(tokens, ms * tokens, cloud_passes=tokens))
    if arm.mode == "collab":
        tau = arm.param
        conf = draws["conf"][:tokens]  # type: ignore[index]
        consult = conf < truth.consult[tau]
        n_cloud = int(consult.sum())
        emitted_ok = (draws["emit_agree"][:tokens] < truth.emitted_agree[tau]) & ~consult  # type: ignore[index]
        agreed = n_cloud + int(emitted_ok.sum())
        ms = t_e + n_cloud * (trip + truth.consult_overhead_ms) / tokens
        return Result(ms, n_cloud, tokens, agreed, tokens - n_cloud,
                      Outcome(tokens, ms * tokens, cloud_passes=n_cloud, cloud_decided=n_cloud,
                              checked=tokens - n_cloud, agreed=int(emitted_ok.sum())))
    # spec@γ: cycles of γ drafts, verified in one pass; drafting the next block overlaps the
    # verification only when the whole block was accepted
    g = int(arm.param)
    acc = draws["accept"]
    made = passes = drafted = accepted = rejections = local = 0
    elapsed, pos, prev_full = 0.0, 0, False
    while made < tokens:
        a = 0
        while a < g and acc[pos % len(acc)] < truth.alpha:  # type: ignore[index,arg-type]
            a += 1
            pos += 1
        pos += 1
        elapsed += (max(g * t_e, trip) if prev_full else g * t_e + trip) + truth.cycle_overhead_ms
        prev_full = a == g
        rejections += not prev_full
        passes += 1
        drafted += g
        accepted += a
        local += a
        made += a + 1
    ms = elapsed / made
    return Result(ms, passes, made, made, local,
                  Outcome(made, elapsed, cloud_passes=passes, drafted=drafted, accepted=accepted,
                          rejections=rejections))


@dataclass
class Tally:
    hits: int = 0
    achievable: int = 0
    tokens: int = 0
    passes: int = 0
    agreed: float = 0.0
    penalised: float = 0.0  # passes + λ·local tokens
    plays: dict[str, int] = field(default_factory=dict)

    def add(self, r: Result, slo: float, achievable: bool, lam: float, name: str) -> None:
        if achievable:
            self.achievable += 1
            self.hits += r.ms_per_token <= slo
        self.tokens += r.tokens
        self.passes += r.passes
        self.agreed += r.agreed
        self.penalised += r.passes + lam * r.local
        self.plays[name] = self.plays.get(name, 0) + 1

    @property
    def slo_rate(self) -> float:
        return self.hits / self.achievable if self.achievable else 1.0

    @property
    def cost(self) -> float:
        return self.passes / self.tokens

    @property
    def objective(self) -> float:
        return self.penalised / self.tokens

    @property
    def quality(self) -> float:
        return self.agreed / self.tokens


def simulate(scenario: Scenario, *, requests: int = 400, seed: int = 0, truth: Truth = Truth(),
             config: PolicyConfig | None = None) -> dict:
    cfg = config or PolicyConfig(slo_ms=scenario.slo_ms, min_quality=scenario.min_quality, seed=seed)
    policy = AutoPolicy(cfg)
    rng = np.random.default_rng(seed)
    arms = list(cfg.arms)
    tallies = {a.name: Tally() for a in arms}
    pol = Tally()
    ewma: dict[str, float] = {}
    cloud_seen_up = True
    unachievable = 0

    def lam(w: World) -> float:
        return (cfg.hot_penalty if w.hot else 0.0) + (cfg.battery_penalty if w.on_battery else 0.0)

    for i in range(requests):
        w = scenario.world(i, requests)
        tokens = int(rng.integers(48, 200))
        max_tok = 4 * tokens  # spec consumes draws past `tokens`
        draws = {"edge_noise": math.exp(rng.normal(0, truth.edge_noise_sd)),
                 "rtt_factor": math.exp(rng.normal(0, truth.rtt_jitter_sd)),
                 "agree": rng.random(max_tok), "conf": rng.random(max_tok), "emit_agree": rng.random(max_tok),
                 "accept": rng.random(max_tok)}
        results = {a.name: run_arm(a, w, truth, draws, tokens) for a in arms}
        achievable = min(r.ms_per_token for r in results.values()) <= scenario.slo_ms
        unachievable += not achievable
        for a in arms:
            tallies[a.name].add(results[a.name], scenario.slo_ms, achievable, lam(w), a.name)

        # the policy sees yesterday's news: EWMAs of earlier requests, the link state as last seen
        m = Measurements(edge_tps=ewma.get("tps"), rtt_ms=ewma.get("rtt"), cloud_step_ms=ewma.get("step"),
                         cloud_queue_ms=ewma.get("queue"), cloud_up=cloud_seen_up)
        decision = policy.choose(m, DeviceState(hot=w.hot, on_battery=w.on_battery))
        r = results[decision.arm.name]
        pol.add(r, scenario.slo_ms, achievable, lam(w), decision.arm.name)
        # what the engine measured while the request ran (its own speed, the consults' round trips)
        during = Measurements(edge_tps=w.edge_tps / float(draws["edge_noise"]),
                              rtt_ms=w.rtt_ms * float(draws["rtt_factor"]), cloud_step_ms=w.step_ms,
                              cloud_queue_ms=w.queue_ms, cloud_up=w.cloud_up)
        policy.update(decision, replace(r.outcome, measured=during))

        for key, value in (("tps", w.edge_tps / float(draws["edge_noise"])), ("rtt", w.rtt_ms * float(draws["rtt_factor"])),
                           ("step", w.step_ms), ("queue", w.queue_ms)):
            ewma[key] = value if key not in ewma else 0.7 * ewma[key] + 0.3 * value
        cloud_seen_up = w.cloud_up

    return _verdict(scenario, pol, tallies, unachievable, requests)


def _verdict(scenario: Scenario, pol: Tally, tallies: dict[str, Tally], unachievable: int, requests: int) -> dict:
    floor = scenario.min_quality
    punctual = {n: t for n, t in tallies.items() if t.slo_rate >= 0.95}
    peers = {n: t for n, t in punctual.items() if t.quality >= min(floor, pol.quality) - 1e-9}
    best_name = min(peers, key=lambda n: (peers[n].objective, n)) if peers else None
    best = peers[best_name] if best_name else None
    cost_ok = best is None or pol.objective <= 1.10 * best.objective + 0.005
    best_q = max((t.quality for t in punctual.values()), default=0.0)
    quality_ok = pol.quality >= min(floor, best_q) - 0.02
    return {
        "scenario": scenario.name, "about": scenario.about, "requests": requests,
        "slo_ms": scenario.slo_ms, "min_quality": floor, "unachievable": unachievable,
        "policy": {"slo_rate": pol.slo_rate, "cost": pol.cost, "objective": pol.objective,
                   "quality": pol.quality, "plays": dict(sorted(pol.plays.items()))},
        "fixed": {n: {"slo_rate": t.slo_rate, "cost": t.cost, "objective": t.objective, "quality": t.quality}
                  for n, t in tallies.items()},
        "best_fixed": best_name,
        "checks": {"slo": pol.slo_rate >= 0.95, "cost": cost_ok, "quality": quality_ok},
    }


def format_report(v: dict) -> str:
    p = v["policy"]
    lines = [f"== {v['scenario']}: {v['about']}",
             f"   SLO {v['slo_ms']:g} ms/token, quality floor {v['min_quality']:g}, {v['requests']} requests, "
             f"{v['unachievable']} where no arm could meet the SLO",
             f"   {'arm':<12} {'SLO met':>8} {'passes/tok':>10} {'objective':>9} {'quality':>8}"]
    rows = [("AUTO", p)] + list(v["fixed"].items())
    for name, r in rows:
        mark = "  <- best fixed" if name == v["best_fixed"] else ""
        lines.append(f"   {name:<12} {r['slo_rate']:>8.1%} {r['cost']:>10.3f} {r['objective']:>9.3f} "
                     f"{r['quality']:>8.3f}{mark}")
    lines.append("   auto played: " + ", ".join(f"{k} x{n}" for k, n in p["plays"].items()))
    c = v["checks"]
    lines.append("   checks: " + ", ".join(f"{k} {'ok' if ok else 'FAIL'}" for k, ok in c.items())
                 + ("" if v["best_fixed"] else " (no fixed arm is as punctual and as good: auto dominates)"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    args = ap.parse_args(argv)
    verdicts = [simulate(s, requests=args.requests, seed=args.seed) for s in SCENARIOS]
    if args.json:
        print(json.dumps(verdicts, indent=1))
    else:
        print("\n\n".join(format_report(v) for v in verdicts))
    return 0 if all(all(v["checks"].values()) for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
