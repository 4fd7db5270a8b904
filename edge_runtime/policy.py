"""The `auto` mode: pick, per request, how much of it the cloud decides (a constrained UCB bandit).

Arms are the concrete modes: `edge`, `collab@τ` for a few exit thresholds τ,
`spec@γ` for a few draft lengths γ, and `cloud`. For each request the policy
returns one arm and a one-line reason; after the request the daemon reports
what happened (`update`). No I/O, no clocks, no threads: plain dataclasses in
and out, deterministic given the seed and the sequence of calls.

The rule (PerLLM's constraint-satisfying UCB, on fogline's cost model)
-----------------------------------------------------------------------
Per generated token, for every arm the policy estimates

* latency (ms/token) from the live measurements — edge time per token
  t_e = 1000 / edge_tps, the edge's shallow-layers-only share s·t_e, and a cloud
  round trip T = RTT + cloud step + cloud queueing:

      edge      t_e
      collab@τ  t_e + q_τ·T                     q_τ: share of tokens the cloud decides
      spec@γ    [α^γ·max(γ·t_e, T) + (1 − α^γ)·(γ·t_e + T)] / n(α, γ)
                the next block is drafted while this one is verified (PicoSpec), which
                pays off only when the whole block is accepted (probability α^γ);
                n = (1 − α^(γ+1)) / (1 − α) tokens per cycle
      cloud     s·t_e + T

  multiplied by a learned per-arm correction ρ;
* cloud cost — deep-layer passes per token: edge 0, collab q_τ, spec 1/n, cloud 1;
* quality — expected agreement with the full model's tokens: edge α (the exit
  head's agreement, the same quantity as the per-token draft acceptance),
  collab q_τ + (1 − q_τ)·a_τ (a_τ: agreement of the tokens emitted at the edge),
  spec and cloud 1 (lossless);
* local share — tokens decided by the edge head: edge 1, collab 1 − q_τ,
  spec (n − 1)/n, cloud 0.

What is learned from outcomes (`update`): q_τ, α and a_τ as discounted Beta
counts (priors from the bundle's calibration table when it has one; α from
accepted / (accepted + rejected cycles), since drafts after a rejection are never
judged; the live `acceptance` measurement, when given, sets α's centre); ρ per arm
= observed ms/token ÷ the formula at the request's *own* measured link and edge
speed, q and α — what the formula misses (serialization, partial pipelining);
and σ, the relative noise of observed latency around the decision-time
prediction, pooled over arms (jitter and measurement lag are the environment's).

The rule, with lo/hi the β-standard-error bounds of the learned means:

1. **Available arms**: cloud unreachable → only `edge`. A `lossless` request
   allows only `spec@γ` and `cloud`.
2. **Feasible**: the pessimistic latency — formula(q_hi, α_lo) · ρ ·
   (1 + z·σ + β·σ/√n_arm), about a request's p95 — meets the SLO, and the
   expected quality is at least `min_quality`.
3. Pick the feasible arm with the least **optimistic** objective (q_lo, α_hi):

       objective = cloud passes/token + λ · local share,
       λ = hot_penalty (device hot or throttling) + battery_penalty (on battery)

   λ = 0 normally; λ > 1 makes a local token dearer than a cloud pass, so a hot
   or battery-powered board shifts tokens to the cloud when the SLO allows.
4. **Safe exploration**: an arm with fewer than `explore_plays` plays (or none in
   `reexplore_after` requests) whose *optimistic* latency (q_lo, α_hi, ρ) meets
   the SLO, whose quality meets the floor and whose optimistic objective beats
   the pick is played instead — on at most `explore_budget` (2%) of requests,
   part of the 5% the SLO target leaves. Without it an arm whose pessimistic
   bound starts above the SLO would never be tried, so its bound would never shrink.
5. Nothing feasible: among arms that meet the SLO, the best quality; if no arm
   meets the SLO, the fastest (by mean estimate). The reason says which case it was.

Why there is a quality floor at all: every fogline mode runs the shallow layers
on the edge, so the cloud mostly *adds* round trips; without a quality term the
cheapest arm meeting a latency target is nearly always `edge`. With
`min_quality = 0` the policy is exactly "meet the SLO at the least cloud cost".
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

MODES = ("edge", "collab", "spec", "cloud")


@dataclass(frozen=True, order=True)
class Arm:
    mode: str
    param: float = 0.0  # τ for collab, γ for spec, unused otherwise

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}")
        if self.mode == "collab" and not 0.0 < self.param <= 1.0:
            raise ValueError(f"collab needs 0 < tau <= 1, got {self.param}")
        if self.mode == "spec" and (self.param < 1 or self.param != int(self.param)):
            raise ValueError(f"spec needs an integer gamma >= 1, got {self.param}")

    @property
    def name(self) -> str:
        if self.mode == "collab":
            return f"collab@{self.param:g}"
        if self.mode == "spec":
            return f"spec@{int(self.param)}"
        return self.mode

    @property
    def lossless(self) -> bool:
        return self.mode in ("spec", "cloud")

    @classmethod
    def parse(cls, text: str) -> Arm:
        mode, _, param = text.partition("@")
        return cls(mode, float(param) if param else 0.0)

    def __str__(self) -> str:
        return self.name


EDGE, CLOUD = Arm("edge"), Arm("cloud")
DEFAULT_ARMS: tuple[Arm, ...] = (EDGE, Arm("collab", 0.6), Arm("collab", 0.8), Arm("collab", 0.9),
                                 Arm("spec", 2), Arm("spec", 4), Arm("spec", 6), CLOUD)


@dataclass(frozen=True)
class TauPoint:
    """One row of a bundle's calibration table: at threshold τ, the share of tokens the
    exit emits and how often those emitted tokens agree with the full model."""

    tau: float
    exit_rate: float
    agreement: float


@dataclass(frozen=True)
class Measurements:
    """What the daemon currently knows about the link, the cloud and itself (EWMAs). None: not measured yet."""

    edge_tps: float | None = None  # one sequence's decode speed through the exit head, tokens/s
    rtt_ms: float | None = None  # link round trip
    cloud_step_ms: float | None = None  # one deep-layer pass on the cloud (as the cloud reports it)
    cloud_queue_ms: float | None = None  # time a step waits in the cloud's queue (or its Retry-After)
    cloud_up: bool = True  # connected, handshake done, not refusing us
    acceptance: float | None = None  # per-token agreement of the exit head with the full model


@dataclass(frozen=True)
class DeviceState:
    hot: bool = False  # hot or throttling (DeviceSnapshot.is_hot())
    on_battery: bool = False


@dataclass(frozen=True)
class RequestContext:
    slo_ms: float | None = None  # per-token latency target; None: the config's
    min_quality: float | None = None  # None: the config's
    lossless: bool = False  # only spec/cloud (output identical to the full model)


@dataclass(frozen=True)
class PolicyConfig:
    arms: tuple[Arm, ...] = DEFAULT_ARMS
    slo_ms: float = 100.0
    min_quality: float = 0.9
    seed: int = 0
    # the edge's time per token without the exit adapter and head (cloud mode skips them)
    shallow_share: float = 0.75
    # PicoSpec-style overlap of drafting and verification (the design's spec mode)
    spec_pipelined: bool = True
    hot_penalty: float = 1.5  # λ while hot: a local token costs this many cloud passes
    battery_penalty: float = 1.25  # λ on battery
    # (λ > 1 is what shifts tokens to the cloud: passes + local tokens = tokens in every mode,
    # so at λ = 1 all arms cost the same)
    # confidence: β standard errors for the learned means, z for the latency noise quantile (p95)
    beta: float = 1.0
    z: float = 1.645
    # ρ, per arm (observed / predicted latency): prior weight (pseudo-requests), per-update discount
    rho_prior_weight: float = 1.0
    rho_discount: float = 0.95
    # relative latency noise, pooled over arms: prior sd, prior weight, per-update discount
    spread_prior_sd: float = 0.12
    spread_prior_weight: float = 3.0
    spread_discount: float = 0.98
    # safe exploration: an arm whose optimistic latency meets the SLO and whose optimistic
    # objective beats the pick is tried until it has `explore_plays` plays, on at most
    # `explore_budget` of all requests (the SLO target leaves 5% of room; use part of it)
    explore_plays: int = 3
    # ... and again when it has not been played for this many requests (its ρ may be stale)
    reexplore_after: int = 200
    explore_budget: float = 0.02
    explore_burst: int = 2  # explorations allowed before the budget has accrued
    # Beta counts (tokens) decay per update so a changing model/prompt mix is followed
    count_discount: float = 0.9
    # priors when nothing is measured yet
    prior_edge_tps: float = 20.0
    prior_rtt_ms: float = 50.0
    prior_cloud_step_ms: float = 20.0
    prior_acceptance: float = 0.7
    # prior weight (in tokens) of α, and of each collab arm's consult share and agreement;
    # the collab priors are weak on purpose so an untried τ looks promising enough to try
    prior_weight_tokens: float = 50.0
    collab_prior_weight_tokens: float = 10.0
    calibration: tuple[TauPoint, ...] = ()

    def __post_init__(self) -> None:
        if not self.arms:
            raise ValueError("at least one arm")
        if EDGE not in self.arms:
            raise ValueError("the edge arm is required: it is where every request ends when the cloud is gone")
        if self.slo_ms <= 0:
            raise ValueError("slo_ms must be positive")


@dataclass(frozen=True)
class Estimate:
    arm: Arm
    latency_ms: float  # mean prediction, ms/token
    latency_hi_ms: float  # pessimistic (p95-ish) prediction
    latency_lo_ms: float  # optimistic (parameters at their favourable bounds, ρ at its mean)
    cost: float  # expected cloud passes per token
    cost_lo: float  # optimistic
    quality: float  # expected agreement with the full model
    local_share: float  # tokens decided at the edge
    objective_lo: float  # cost_lo + λ·local_share


@dataclass(frozen=True)
class Decision:
    arm: Arm
    reason: str
    slo_ms: float
    min_quality: float
    estimate: Estimate
    measurements: Measurements
    device: DeviceState
    estimates: tuple[Estimate, ...] = ()

    def to_fogline(self) -> dict[str, Any]:
        """The response's `fogline.auto` object."""
        e, m = self.estimate, self.measurements

        def r(v: float | None, nd: int = 1) -> float | None:
            return None if v is None else round(v, nd)
        return {"arm": self.arm.name, "mode": self.arm.mode, "reason": self.reason, "slo_ms": self.slo_ms,
                "predicted_ms_per_token": round(e.latency_ms, 1), "p95_ms_per_token": round(e.latency_hi_ms, 1),
                "cloud_passes_per_token": round(e.cost, 3), "expected_quality": round(e.quality, 3),
                # what the decision was made on (null: not measured yet, the policy's prior was used)
                "measured": {"edge_tps": r(m.edge_tps), "rtt_ms": r(m.rtt_ms), "cloud_step_ms": r(m.cloud_step_ms),
                             "cloud_queue_ms": r(m.cloud_queue_ms), "cloud_up": m.cloud_up,
                             "acceptance": r(m.acceptance, 3)}}


@dataclass(frozen=True)
class Outcome:
    """What one request did. Counts that the mode does not produce stay None."""

    tokens: int  # generated tokens
    decode_ms: float  # wall time of the generation (first to last token)
    cloud_passes: int = 0  # deep-layer passes the cloud ran for it
    cloud_decided: int | None = None  # collab: tokens decided by the cloud
    drafted: int | None = None  # spec: draft tokens sent for verification
    accepted: int | None = None  # spec: of those, accepted
    # spec: cycles that ended in a rejected draft. Drafts after a rejection are never judged,
    # so the per-token acceptance is accepted / (accepted + rejections), not accepted / drafted.
    rejections: int | None = None
    checked: int | None = None  # edge-emitted tokens whose agreement the cloud checked (lazy upload)
    agreed: int | None = None  # of those, equal to the full model's token
    fell_back: bool = False  # the cloud failed mid-request; finished in edge mode
    # the link and edge speed as measured *during* this request (None: use the decision's);
    # lets ρ learn the formula's bias rather than the measurements' lag
    measured: Measurements | None = None


# --------------------------------------------------------------------------- learned statistics


@dataclass
class _Rate:
    """A Beta-like rate from discounted counts; bounds by normal approximation."""

    a: float
    b: float

    @classmethod
    def prior(cls, mean: float, weight: float) -> _Rate:
        mean = min(max(mean, 1e-3), 1 - 1e-3)
        return cls(mean * weight, (1 - mean) * weight)

    @property
    def n(self) -> float:
        return self.a + self.b

    @property
    def mean(self) -> float:
        return self.a / self.n

    def bounds(self, beta: float) -> tuple[float, float]:
        m = self.mean
        half = beta * math.sqrt(m * (1 - m) / (self.n + 1))
        return max(0.0, m - half), min(1.0, m + half)

    def update(self, hits: int, trials: int, discount: float) -> None:
        if trials <= 0:
            return
        self.a = self.a * discount + hits
        self.b = self.b * discount + (trials - hits)


@dataclass
class _Mean:
    """A discounted mean with a prior worth `w` pseudo-observations."""

    w: float
    mean: float

    def update(self, x: float, discount: float) -> None:
        self.w = self.w * discount + 1.0
        self.mean += (x - self.mean) / self.w


@dataclass
class _Spread:
    """Pooled, discounted mean square of relative residuals: how noisy a request's latency is
    around its arm's corrected prediction. The noise (link jitter, edge speed) is mostly the
    environment's, common to all arms, so pooling learns it from every request."""

    w: float
    var: float

    @property
    def sd(self) -> float:
        return math.sqrt(self.var)

    def update(self, residual: float, discount: float) -> None:
        self.w = self.w * discount + 1.0
        self.var += (residual * residual - self.var) / self.w


@dataclass
class _State:
    rho: dict[Arm, _Mean]  # per arm: observed / predicted latency (the formula's bias)
    spread: _Spread  # pooled relative noise around ρ-corrected predictions
    consult: dict[float, _Rate]  # collab τ -> share of tokens the cloud decides
    emitted_agree: dict[float, _Rate]  # collab τ -> agreement of edge-emitted tokens
    alpha: _Rate  # per-token acceptance / exit-head agreement
    plays: dict[Arm, int] = field(default_factory=dict)
    last_played: dict[Arm, int] = field(default_factory=dict)
    requests: int = 0
    explorations: int = 0


def tokens_per_cycle(alpha: float, gamma: int) -> float:
    """Expected tokens one spec cycle yields: accepted drafts plus the cloud's correction/bonus token."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


# --------------------------------------------------------------------------- the policy


class AutoPolicy:
    """`choose(measurements, device, request) -> Decision`, then `update(decision, outcome)`."""

    def __init__(self, config: PolicyConfig = PolicyConfig()) -> None:
        self.cfg = config
        self._rng = random.Random(config.seed)
        cal = {p.tau: p for p in config.calibration}
        wt = config.prior_weight_tokens
        wc = config.collab_prior_weight_tokens
        consult, agree = {}, {}
        for arm in config.arms:
            if arm.mode != "collab":
                continue
            tau = arm.param
            if tau in cal:
                consult[tau] = _Rate.prior(1.0 - cal[tau].exit_rate, wc)
                agree[tau] = _Rate.prior(cal[tau].agreement, wc)
            else:  # uninformed: harder thresholds defer more, and what passes them is mostly right
                consult[tau] = _Rate.prior(min(0.95, 0.1 + 0.6 * tau), wc)
                agree[tau] = _Rate.prior(max(config.prior_acceptance, tau), wc)
        self._s = _State(rho={a: _Mean(config.rho_prior_weight, 1.0) for a in config.arms},
                         spread=_Spread(config.spread_prior_weight, config.spread_prior_sd ** 2),
                         consult=consult, emitted_agree=agree,
                         alpha=_Rate.prior(config.prior_acceptance, wt))

    # ----------------------------------------------------------------- model

    def _env(self, m: Measurements) -> tuple[float, float]:
        c = self.cfg
        tps = m.edge_tps if m.edge_tps and m.edge_tps > 0 else c.prior_edge_tps
        rtt = m.rtt_ms if m.rtt_ms is not None else c.prior_rtt_ms
        step = m.cloud_step_ms if m.cloud_step_ms is not None else c.prior_cloud_step_ms
        return 1000.0 / tps, max(0.0, rtt) + max(0.0, step) + max(0.0, m.cloud_queue_ms or 0.0)

    def latency_model(self, arm: Arm, t_e: float, trip: float, q: float, alpha: float) -> float:
        """ms/token of `arm` for edge time/token t_e, cloud round trip `trip`, consult share q, acceptance α."""
        if arm.mode == "edge":
            return t_e
        if arm.mode == "cloud":
            return self.cfg.shallow_share * t_e + trip
        if arm.mode == "collab":
            return t_e + q * trip
        g = int(arm.param)
        n = tokens_per_cycle(alpha, g)
        serial = g * t_e + trip
        if self.cfg.spec_pipelined:
            # the next block is drafted while this one is verified; the overlap only
            # pays off when the whole block is accepted (probability α^γ)
            full = alpha ** g
            return (full * max(g * t_e, trip) + (1 - full) * serial) / n
        return serial / n

    def _alpha(self, m: Measurements) -> tuple[float, float, float]:
        lo, hi = self._s.alpha.bounds(self.cfg.beta)
        mean = self._s.alpha.mean
        if m.acceptance is not None:  # the live measurement sets the centre; our counts set the width
            shift = min(max(m.acceptance, 0.0), 1.0) - mean
            mean, lo, hi = mean + shift, max(0.0, lo + shift), min(1.0, hi + shift)
        return mean, lo, hi

    def estimate(self, arm: Arm, m: Measurements, device: DeviceState) -> Estimate:
        c, s = self.cfg, self._s
        t_e, trip = self._env(m)
        a_mean, a_lo, a_hi = self._alpha(m)
        lam = (c.hot_penalty if device.hot else 0.0) + (c.battery_penalty if device.on_battery else 0.0)
        q = q_lo = q_hi = 0.0
        if arm.mode == "collab":
            rate = s.consult[arm.param]
            q = rate.mean
            q_lo, q_hi = rate.bounds(c.beta)
        rho = s.rho[arm]
        lat = self.latency_model(arm, t_e, trip, q, a_mean) * rho.mean
        sd = s.spread.sd
        lat_hi = self.latency_model(arm, t_e, trip, q_hi, a_lo) * rho.mean * (1 + c.z * sd + c.beta * sd / math.sqrt(rho.w))
        lat_lo = self.latency_model(arm, t_e, trip, q_lo, a_hi) * rho.mean
        if arm.mode == "edge":
            cost = cost_lo = 0.0
            quality, local = a_mean, 1.0
        elif arm.mode == "cloud":
            cost = cost_lo = 1.0
            quality, local = 1.0, 0.0
        elif arm.mode == "collab":
            cost, cost_lo = q, q_lo
            quality = q + (1 - q) * s.emitted_agree[arm.param].mean
            local = 1 - q
        else:
            g = int(arm.param)
            n = tokens_per_cycle(a_mean, g)
            cost, cost_lo = 1 / n, 1 / tokens_per_cycle(a_hi, g)
            quality, local = 1.0, (n - 1) / n
        return Estimate(arm, lat, lat_hi, lat_lo, cost, cost_lo, quality, local, cost_lo + lam * local)

    # ----------------------------------------------------------------- decide / learn

    def choose(self, m: Measurements, device: DeviceState = DeviceState(),
               request: RequestContext = RequestContext()) -> Decision:
        c = self.cfg
        slo = request.slo_ms if request.slo_ms is not None and request.slo_ms > 0 else c.slo_ms
        floor = c.min_quality if request.min_quality is None else request.min_quality
        notes = []
        if not m.cloud_up:
            arms = [EDGE]
            notes.append("cloud unreachable")
        elif request.lossless:
            arms = [a for a in c.arms if a.lossless] or [EDGE]
            if arms == [EDGE]:
                notes.append("no lossless arm configured")
        else:
            arms = list(c.arms)
        if device.hot:
            notes.append(f"device hot: local tokens cost {c.hot_penalty:g} cloud passes")
        if device.on_battery:
            notes.append(f"on battery: local tokens cost {c.battery_penalty:g} cloud passes")
        ests = [self.estimate(a, m, device) for a in arms]
        meets_slo = [e for e in ests if e.latency_hi_ms <= slo]
        good = [e for e in meets_slo if e.quality >= floor]
        if len(arms) == 1:
            pick = ests[0]
            why = f"{pick.arm.name}: the only arm available (~{pick.latency_ms:.0f} ms/token)"
        elif good:
            pick = self._least(good, key=lambda e: (e.objective_lo, e.latency_hi_ms))
            why = (f"{pick.arm.name}: cheapest arm meeting SLO {slo:g} ms/token (p95 ~{pick.latency_hi_ms:.0f}) "
                   f"at quality >= {floor:g} (~{pick.quality:.2f}); ~{pick.cost:.2f} cloud passes/token")
            slower = [e for e in ests if e.objective_lo < pick.objective_lo and e.quality >= floor]
            if slower:
                best = min(slower, key=lambda e: e.objective_lo)
                why += f"; cheaper {best.arm.name} would take p95 ~{best.latency_hi_ms:.0f} ms"
        elif meets_slo:
            pick = self._least(meets_slo, key=lambda e: (-e.quality, e.objective_lo))
            why = (f"{pick.arm.name}: no arm reaches quality {floor:g} within SLO {slo:g} ms/token; "
                   f"best quality that does (~{pick.quality:.2f}, p95 ~{pick.latency_hi_ms:.0f} ms)")
        else:
            pick = self._least(ests, key=lambda e: (e.latency_ms, e.objective_lo))
            why = f"{pick.arm.name}: no arm meets SLO {slo:g} ms/token; fastest (~{pick.latency_ms:.0f} ms/token)"
        explore = self._explore_candidate(ests, pick, slo, floor) if len(arms) > 1 else None
        if explore is not None:
            self._s.explorations += 1
            why = (f"{explore.arm.name}: exploring (played {self._s.plays.get(explore.arm, 0)}x; optimistic "
                   f"~{explore.latency_lo_ms:.0f} ms/token, ~{explore.cost_lo:.2f} cloud passes/token) instead of "
                   + why)
            pick = explore
        reason = "; ".join(notes + [why]) if notes else why
        self._s.plays[pick.arm] = self._s.plays.get(pick.arm, 0) + 1
        self._s.last_played[pick.arm] = self._s.requests
        self._s.requests += 1
        return Decision(pick.arm, reason, slo, floor, pick, m, device, tuple(ests))

    def _explore_candidate(self, ests: list[Estimate], pick: Estimate, slo: float, floor: float) -> Estimate | None:
        """An under-played arm that might be both feasible and cheaper than `pick`, if the budget allows."""
        c, s = self.cfg, self._s
        if s.explorations + 1 > c.explore_budget * (s.requests + 1) + c.explore_burst:
            return None
        cands = [e for e in ests
                 if e.arm != pick.arm
                 and (s.plays.get(e.arm, 0) < c.explore_plays
                      or s.requests - s.last_played.get(e.arm, 0) >= c.reexplore_after)
                 and e.latency_lo_ms <= slo and e.quality >= floor and e.objective_lo < pick.objective_lo]
        return self._least(cands, key=lambda e: (e.objective_lo, e.latency_lo_ms)) if cands else None

    def _least(self, ests: list[Estimate], key: Any) -> Estimate:
        best = min(key(e) for e in ests)
        ties = [e for e in ests if key(e) == best]
        return ties[0] if len(ties) == 1 else self._rng.choice(ties)

    def update(self, decision: Decision, outcome: Outcome) -> None:
        """Learn from one finished request."""
        c, s, arm = self.cfg, self._s, decision.arm
        d = c.count_discount
        if outcome.accepted is not None and outcome.rejections is not None:
            s.alpha.update(outcome.accepted, outcome.accepted + outcome.rejections, d)
        if arm.mode == "edge" and outcome.checked:
            s.alpha.update(min(outcome.agreed or 0, outcome.checked), outcome.checked, d)
        if arm.mode == "collab" and outcome.tokens > 0 and outcome.cloud_decided is not None and not outcome.fell_back:
            s.consult[arm.param].update(min(outcome.cloud_decided, outcome.tokens), outcome.tokens, d)
            if outcome.checked:
                s.emitted_agree[arm.param].update(min(outcome.agreed or 0, outcome.checked), outcome.checked, d)
        if outcome.fell_back or outcome.tokens <= 0 or outcome.decode_ms <= 0:
            return  # an outage says nothing about the arm's speed; cloud_up covers it
        observed = outcome.decode_ms / outcome.tokens
        # the noise the SLO margin must cover: what happened against what we predicted
        # (only for arms whose ρ is established: a fresh arm's miss is bias, learned by ρ below)
        if decision.estimate.latency_ms > 0 and s.rho[arm].w >= c.explore_plays:
            s.spread.update(observed / decision.estimate.latency_ms - 1.0, c.spread_discount)
        # ρ: observed against the formula with this request's own measurements, q and α,
        # so it learns what the formula misses, not the parameters (learned above)
        t_e, trip = self._env(outcome.measured or decision.measurements)
        q = (outcome.cloud_decided / outcome.tokens) if arm.mode == "collab" and outcome.cloud_decided is not None \
            else (s.consult[arm.param].mean if arm.mode == "collab" else 0.0)
        if outcome.accepted is not None and outcome.rejections is not None and outcome.accepted + outcome.rejections:
            alpha = outcome.accepted / (outcome.accepted + outcome.rejections)
        else:
            alpha = self._alpha(decision.measurements)[0]
        predicted = self.latency_model(arm, t_e, trip, q, min(alpha, 0.999))
        if predicted > 0:
            s.rho[arm].update(observed / predicted, c.rho_discount)

    def snapshot(self) -> dict[str, Any]:
        """What the policy has learned (for /health or a debug endpoint)."""
        s = self._s
        return {
            "alpha": round(s.alpha.mean, 3),
            "consult": {f"{t:g}": round(r.mean, 3) for t, r in s.consult.items()},
            "rho": {a.name: round(r.mean, 3) for a, r in s.rho.items()},
            "noise_sd": round(s.spread.sd, 3),
            "plays": {a.name: n for a, n in sorted(s.plays.items())},
        }
