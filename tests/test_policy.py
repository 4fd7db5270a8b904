"""The `auto` policy: its rules one by one, then the simulation over synthetic latency traces."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from edge_runtime.policy import (CLOUD, EDGE, Arm, AutoPolicy, DeviceState, Measurements, Outcome, PolicyConfig,
                                 RequestContext, TauPoint, tokens_per_cycle)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import policy_sim  # noqa: E402

GOOD_LINK = Measurements(edge_tps=25, rtt_ms=10, cloud_step_ms=5, cloud_queue_ms=0)
SLOW_LINK = Measurements(edge_tps=25, rtt_ms=300, cloud_step_ms=5, cloud_queue_ms=0)


def cfg(**kw) -> PolicyConfig:
    """A config without exploration, so each rule can be checked on one decision."""
    return PolicyConfig(**{"explore_budget": 0.0, "explore_burst": 0, **kw})


def test_arms() -> None:
    assert [a.name for a in PolicyConfig().arms] == ["edge", "collab@0.6", "collab@0.8", "collab@0.9",
                                                     "spec@2", "spec@4", "spec@6", "cloud"]
    assert Arm.parse("collab@0.8") == Arm("collab", 0.8) and Arm.parse("cloud") == CLOUD
    for bad in ("fog", "collab@1.5", "spec@2.5", "spec@0"):
        with pytest.raises(ValueError):
            Arm.parse(bad)
    with pytest.raises(ValueError, match="edge arm"):
        PolicyConfig(arms=(CLOUD,))


def test_tokens_per_cycle() -> None:
    assert tokens_per_cycle(0.0, 4) == 1.0  # every draft rejected: the correction token only
    assert tokens_per_cycle(1.0, 4) == 5.0  # all accepted plus the bonus token
    assert tokens_per_cycle(0.5, 2) == pytest.approx(1.75)


def test_cloud_down_means_edge() -> None:
    d = AutoPolicy().choose(Measurements(edge_tps=25, cloud_up=False), request=RequestContext(lossless=True))
    assert d.arm == EDGE and "cloud unreachable" in d.reason


def test_cheapest_arm_meeting_slo_and_quality_on_a_good_link() -> None:
    d = AutoPolicy(cfg(slo_ms=80)).choose(GOOD_LINK)
    assert d.arm.mode in ("collab", "spec") and "cheapest arm meeting SLO 80" in d.reason
    assert d.estimate.latency_hi_ms <= 80 and d.estimate.quality >= 0.9
    cheaper = [e for e in d.estimates if e.objective_lo < d.estimate.objective_lo]
    assert all(e.latency_hi_ms > 80 or e.quality < 0.9 for e in cheaper)  # it really is the cheapest feasible


def test_slow_link_falls_back_to_the_edge_with_a_reason() -> None:
    d = AutoPolicy(cfg(slo_ms=80)).choose(SLOW_LINK)
    assert d.arm == EDGE and "no arm reaches quality 0.9 within SLO 80" in d.reason


def test_no_arm_meets_the_slo_then_the_fastest() -> None:
    d = AutoPolicy(cfg(slo_ms=5)).choose(GOOD_LINK)
    assert d.arm == min(d.estimates, key=lambda e: e.latency_ms).arm
    assert "no arm meets SLO 5" in d.reason


def test_request_slo_and_quality_override_the_config() -> None:
    p = AutoPolicy(cfg(slo_ms=5))
    d = p.choose(GOOD_LINK, request=RequestContext(slo_ms=80, min_quality=0.0))
    assert d.slo_ms == 80 and d.arm == EDGE  # no quality floor: the edge costs nothing
    assert "cheapest arm meeting SLO 80" in d.reason


def test_lossless_requests_get_spec_or_cloud() -> None:
    d = AutoPolicy(cfg(slo_ms=80)).choose(GOOD_LINK, request=RequestContext(lossless=True))
    assert d.arm.lossless and all(e.arm.lossless for e in d.estimates)


def test_hot_or_on_battery_means_fewer_local_tokens() -> None:
    c = cfg(slo_ms=80)
    cool = AutoPolicy(c).choose(GOOD_LINK)
    hot = AutoPolicy(c).choose(GOOD_LINK, DeviceState(hot=True))
    battery = AutoPolicy(c).choose(GOOD_LINK, DeviceState(on_battery=True))
    assert hot.estimate.local_share < cool.estimate.local_share
    assert battery.estimate.local_share < cool.estimate.local_share
    assert hot.arm == CLOUD and "device hot" in hot.reason and "on battery" in battery.reason


def test_exploration_is_optimistic_and_budgeted() -> None:
    p = AutoPolicy(PolicyConfig(slo_ms=80, explore_budget=0.02, explore_burst=2))
    decisions = [p.choose(GOOD_LINK) for _ in range(500)]
    explored = [d for d in decisions if "exploring" in d.reason]
    assert 1 <= len(explored) <= 2 + 0.02 * 500
    for d in explored:  # only arms that might be cheaper and might meet the SLO
        assert d.estimate.latency_lo_ms <= 80 and d.estimate.quality >= 0.9


def test_deterministic_given_seed() -> None:
    a = policy_sim.simulate(policy_sim.SCENARIOS[2], requests=150, seed=7)
    b = policy_sim.simulate(policy_sim.SCENARIOS[2], requests=150, seed=7)
    assert a == b


def test_learns_consult_share_and_acceptance() -> None:
    p = AutoPolicy(cfg(slo_ms=80))
    collab = Arm("collab", 0.8)
    spec = Arm("spec", 4)
    for _ in range(20):
        d = p.choose(GOOD_LINK)
        d = replace(d, arm=collab, estimate=p.estimate(collab, GOOD_LINK, DeviceState()))
        p.update(d, Outcome(tokens=100, decode_ms=100 * 47.0, cloud_passes=20, cloud_decided=20,
                            checked=80, agreed=78))
        d = replace(d, arm=spec, estimate=p.estimate(spec, GOOD_LINK, DeviceState()))
        # 50 cycles: 150 drafts accepted, 40 cycles ended in a rejection (10 were fully accepted)
        p.update(d, Outcome(tokens=200, decode_ms=200 * 30.0, cloud_passes=50, drafted=200, accepted=150,
                            rejections=40))
    snap = p.snapshot()
    assert snap["consult"]["0.8"] == pytest.approx(0.2, abs=0.01)
    assert snap["alpha"] == pytest.approx(150 / 190, abs=0.01)  # not accepted / drafted = 0.75
    assert json.dumps(snap)


def test_calibration_table_sets_the_priors() -> None:
    cal = (TauPoint(0.6, exit_rate=0.9, agreement=0.97), TauPoint(0.8, exit_rate=0.8, agreement=0.99),
           TauPoint(0.9, exit_rate=0.7, agreement=0.995))
    p = AutoPolicy(PolicyConfig(calibration=cal))
    e = p.estimate(Arm("collab", 0.6), GOOD_LINK, DeviceState())
    assert e.cost == pytest.approx(0.1, abs=0.01) and e.quality == pytest.approx(0.1 + 0.9 * 0.97, abs=0.01)


def test_fell_back_requests_do_not_teach_latency() -> None:
    p = AutoPolicy(cfg(slo_ms=80))
    d = p.choose(GOOD_LINK)
    before = p.snapshot()["rho"][d.arm.name]
    p.update(d, Outcome(tokens=50, decode_ms=50 * 500.0, fell_back=True))
    assert p.snapshot()["rho"][d.arm.name] == before


def test_decision_goes_into_the_response() -> None:
    d = AutoPolicy(cfg(slo_ms=80)).choose(GOOD_LINK)
    f = d.to_fogline()
    assert f["arm"] == d.arm.name and f["reason"] == d.reason and f["slo_ms"] == 80
    json.dumps(f)


# --------------------------------------------------------------------------- the simulation


@pytest.mark.parametrize("scenario", policy_sim.SCENARIOS, ids=lambda s: s.name)
def test_simulation(scenario: policy_sim.Scenario) -> None:
    v = policy_sim.simulate(scenario, requests=400, seed=0)
    p = v["policy"]
    assert p["slo_rate"] >= 0.95, policy_sim.format_report(v)
    if v["best_fixed"] is not None:
        assert p["objective"] <= 1.10 * v["fixed"][v["best_fixed"]]["objective"] + 0.005, policy_sim.format_report(v)
    assert all(v["checks"].values()), policy_sim.format_report(v)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_simulation_other_seeds(seed: int) -> None:
    for scenario in policy_sim.SCENARIOS:
        v = policy_sim.simulate(scenario, requests=300, seed=seed)
        assert all(v["checks"].values()), policy_sim.format_report(v)


def test_simulation_checks_can_fail() -> None:
    """A policy that ignores the link (always collab@0.9) fails the slow-link and degrading scenarios."""
    always = PolicyConfig(arms=(EDGE, Arm("collab", 0.9)), slo_ms=60, min_quality=0.9, explore_budget=0.0,
                          z=-10.0)  # treats every arm as punctual
    v = policy_sim.simulate(policy_sim.SCENARIOS[2], requests=300, seed=0, config=always)
    assert not v["checks"]["slo"]


def test_policy_sim_cli() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "tools/policy_sim.py"), "--requests", "200"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("checks: slo ok, cost ok, quality ok") == len(policy_sim.SCENARIOS)


def test_runtime_modules_stay_torch_free() -> None:
    code = ("import sys; import edge_runtime.policy, edge_runtime.device_monitor, fogline.sd_notify, "
            "fogline.service_install; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
