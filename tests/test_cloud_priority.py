"""Cloud-side priority: value-density (VDF) scheduling against FIFO in the real batcher.

The real Batcher runs the real deep model of the demo bundle. Time is virtual, so the test
does not depend on this machine's speed: a pass "takes" PASS_MS + ROW_MS per row on the
batcher's clock (advanced by the steps' finish callbacks, which run inside each pass), every
step gets a deadline on that clock, and a step misses when the pass that answered it ends
past its deadline. More sessions arrive at once than the cloud can answer in time; both
schedules serve the same workload in the same run.
"""

from __future__ import annotations

import asyncio
import json
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

D = 576
PASS_MS, ROW_MS = 5.0, 0.5  # virtual cost of a pass
MAX_TOKENS = 64  # rows per pass: the workload needs many passes


@pytest.fixture(scope="module")
def deep_model(demo_bundle_adapter):
    import torch
    from safetensors.torch import load_file

    from cloud_runtime.deep_model import load_deep_model
    from fogline.arch import ArchSpec
    from fogline.manifest import load_manifest

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    cloud = demo_bundle_adapter / "cloud"
    manifest = load_manifest(cloud, role="cloud")
    spec = ArchSpec.from_hf_config(json.loads((cloud / "config.json").read_text()))
    yield load_deep_model(spec, manifest.split, load_file(str(cloud / "deep.safetensors")))
    torch.set_num_threads(old)


def workload(seed: int = 0, n: int = 48) -> list[tuple[int, float]]:
    """(rows, deadline ms) per session: mostly one-token decode steps, some verify blocks and
    prompt uploads; deadlines as edges with different SLOs would send them."""
    rng = random.Random(seed)
    return [(rng.choice([1, 1, 1, 2, 5, 8, 24, 48]), rng.uniform(15.0, 160.0)) for _ in range(n)]


class VirtualClock:
    def __init__(self) -> None:
        self.ms = 0.0
        self.pass_seen = -1

    def __call__(self) -> float:
        return self.ms / 1000.0


def run_schedule(model, schedule: str, jobs: list[tuple[int, float]]) -> dict:
    from cloud_runtime.batcher import Batcher, Step
    from cloud_runtime.metrics import CloudMetrics
    from cloud_runtime.sessions import Session

    clock = VirtualClock()
    done: dict[int, float] = {}  # job -> virtual time its pass ended
    order: list[int] = []

    async def main() -> None:
        executor = ThreadPoolExecutor(max_workers=1)
        batcher = Batcher(model, CloudMetrics(), window_s=0.002, max_tokens=MAX_TOKENS, max_queue=1000,
                          executor=executor, schedule=schedule, clock=clock)
        pass_rows: dict[int, int] = {}
        pass_members: dict[int, list[int]] = {}

        def finish_for(i: int, rows: int):
            def finish(_logits):  # model thread, inside the pass that answered job i
                p = batcher.passes
                if p != clock.pass_seen:  # first step of a new pass: the pass's overhead
                    clock.pass_seen = p
                    clock.ms += PASS_MS
                clock.ms += ROW_MS * rows
                pass_rows[p] = pass_rows.get(p, 0) + rows
                pass_members.setdefault(p, []).append(i)
                order.append(i)
            return finish

        rng = np.random.default_rng(0)
        steps = []
        for i, (rows, deadline_ms) in enumerate(jobs):
            s = Session(f"s{i}", model.new_cache(), 0.0)
            h = rng.standard_normal((rows, D)).astype(np.float32)
            steps.append(Step(s, 0, h, "last", finish_for(i, rows), deadline=deadline_ms / 1000.0))
        # every session's step is queued before the batcher takes the first one
        tasks = [asyncio.ensure_future(batcher.submit(st)) for st in steps]
        await asyncio.sleep(0)
        assert batcher.queued == len(jobs)
        batcher.start()
        await asyncio.gather(*tasks)
        await batcher.stop()
        executor.shutdown(wait=True)
        # a step's answer leaves when its whole pass ends
        t = 0.0
        for p in sorted(pass_rows):
            assert pass_rows[p] <= MAX_TOKENS
            t += PASS_MS + ROW_MS * pass_rows[p]
            for i in pass_members[p]:
                done[i] = t

    asyncio.run(main())
    misses = sum(done[i] > deadline for i, (_rows, deadline) in enumerate(jobs))
    return {"misses": misses, "order": order, "done": done}


def test_vdf_misses_fewer_deadlines_than_fifo_under_overload(deep_model):
    jobs = workload()
    total_ms = sum(r for r, _ in jobs) * ROW_MS + PASS_MS * (sum(r for r, _ in jobs) / MAX_TOKENS)
    assert total_ms > max(d for _, d in jobs)  # more work than the deadlines leave room for: overload
    fifo = run_schedule(deep_model, "fifo", jobs)
    vdf = run_schedule(deep_model, "vdf", jobs)
    assert sorted(fifo["order"]) == sorted(vdf["order"]) == list(range(len(jobs)))  # all answered
    assert fifo["order"][:5] == [0, 1, 2, 3, 4]  # fifo is arrival order
    assert fifo["misses"] > 0, fifo
    assert vdf["misses"] < fifo["misses"], (vdf["misses"], fifo["misses"])
    # VDF's first pass is the densest steps (least slack x rows; all can still make it at t=0)
    t1 = min(vdf["done"].values())
    first = {i for i in vdf["order"] if vdf["done"][i] == t1}
    density = {i: rows * dl for i, (rows, dl) in enumerate(jobs)}
    assert max(density[i] for i in first) <= min(density[i] for i in range(len(jobs)) if i not in first)
    print(f"deadline misses of {len(jobs)} steps: fifo {fifo['misses']}, vdf {vdf['misses']}")


def test_full_queue_is_overloaded_with_retry_after(deep_model):
    from cloud_runtime.batcher import Batcher, Step
    from cloud_runtime.metrics import CloudMetrics
    from cloud_runtime.sessions import Session
    from fogline.wire.errors import ErrorCode, Overloaded

    async def main() -> None:
        executor = ThreadPoolExecutor(max_workers=1)
        batcher = Batcher(deep_model, CloudMetrics(), window_s=0.002, max_tokens=MAX_TOKENS, max_queue=3,
                          executor=executor)  # not started: nothing drains the queue
        h = np.zeros((1, D), np.float32)
        waiting = [asyncio.ensure_future(batcher.submit(Step(Session(f"s{i}", deep_model.new_cache(), 0.0), 0, h,
                                                             "last", lambda _lg: None))) for i in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as e:
            await batcher.submit(Step(Session("late", deep_model.new_cache(), 0.0), 0, h, "last", lambda _lg: None))
        assert e.value.code == ErrorCode.OVERLOADED and 0.05 <= e.value.retry_after <= 5.0
        await batcher.stop()  # the queued ones are refused with shutting_down, not dropped silently
        for w in waiting:
            with pytest.raises(Exception):
                await w
        executor.shutdown(wait=True)

    asyncio.run(main())
