"""Cloud-produced tokens report the cloud's own logprobs, equal to the full model's on an F32 edge.

Real processes (`fogline cloud serve`, `fogline edge serve`) over real sockets, the official
`openai` client, and the full transformers model as the independent reference (teacher-forced
on the same tokens). Before, a cloud token's logprob was log(top-1 prob) or a made-up 0.0.
"""

from __future__ import annotations

import pytest

from tests.edge_server_util import start_edge_server
from tests.edge_server_util import edge_env as _edge_env
from tests.edge_server_util import free_port as _free_port
from tests.edge_server_util import wait_cloud_connected as _wait_connected
from tests.test_collab_modes import Cloud

N = 8
TOP = 5
# h_K travels as fp32 here (an unquantized edge end to end). The target was 1e-3; measured
# on this box: the chosen token's logprob up to 3.0e-3 off the full model's (spec, token 0), the
# alternatives' (down to ~-8.7) up to 8.2e-3 — llama.cpp's F32 layers [0, K) round differently from
# torch's, and differently again for a prompt prefilled in one batch or after a reused prefix.
# A made-up value (0.0, log of the top-1 prob) is off by far more than these bounds.
TOL = 5e-3  # the chosen token's logprob
TOL_TOP = 1e-2  # the alternatives' logprobs

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def lp_edge(demo_bundle_f32, tmp_path_factory):
    c = Cloud(demo_bundle_f32, _free_port(), tmp_path_factory.mktemp("cloudlog") / "cloud.log")
    c.start()
    srv = start_edge_server(demo_bundle_f32 / "edge", tmp_path_factory.mktemp("edgelog") / "edge.log",
                            env=_edge_env(f"ws://127.0.0.1:{c.port}/ws", FOGLINE_EDGE_CLOUD_DEADLINE_MS="90000",
                                      FOGLINE_EDGE_CLOUD_CODEC="fp32"))
    _wait_connected(srv)
    yield srv
    srv.stop()
    c.stop()


def _settled(demo_bundle_f32, tokens: list[int]) -> int:
    """Tokens before the first special one (an end-of-generation token carries no logprobs entry)."""
    from transformers import AutoTokenizer

    special = set(AutoTokenizer.from_pretrained(demo_bundle_f32 / "cloud").all_special_ids)
    return next((i for i, t in enumerate(tokens) if t in special), len(tokens))


def _reference_logprobs(demo_source, prompt: list[int], tokens: list[int]):
    """Full model, teacher-forced: per position (log p(token), the TOP best logprobs)."""
    import torch

    from quantize.verify import build_reference_model

    model = build_reference_model(demo_source)
    with torch.inference_mode():
        lg = model(torch.tensor([prompt + tokens])).logits[0].float()
    lp = torch.log_softmax(lg[len(prompt) - 1:len(prompt) - 1 + len(tokens)], dim=-1)
    chosen = [float(lp[i, t]) for i, t in enumerate(tokens)]
    tops = [sorted(torch.topk(lp[i], TOP).values.tolist(), reverse=True) for i in range(len(tokens))]
    return chosen, tops


def _greedy_logprobs(edge, prompt: list[int], mode: str):
    """One greedy completion with top-TOP logprobs through the official client; it must not fall back."""
    from openai import OpenAI

    client = OpenAI(base_url=edge.v1, api_key="unused", max_retries=0, timeout=600)
    r = client.completions.create(model="fogline-edge-k20", prompt=prompt, max_tokens=N, temperature=0,
                                  logprobs=TOP, extra_body={"mode": mode, "ignore_eos": True})
    assert r.model_extra["fogline"].get("fallback") in (None, "")
    return r.choices[0].logprobs


def test_cloud_mode_logprobs_are_the_full_models(lp_edge, demo_source, demo_bundle_f32, chat_prompts, full_reference):
    prompt, (ref_tokens, _) = chat_prompts[0], full_reference[0]
    lp = _greedy_logprobs(lp_edge, prompt, "cloud")
    chosen, tops = _reference_logprobs(demo_source, prompt, ref_tokens[:N])
    n = _settled(demo_bundle_f32, ref_tokens[:N])
    assert n >= 4 and len(lp.token_logprobs) >= n
    for i in range(n):
        assert lp.token_logprobs[i] is not None
        assert abs(lp.token_logprobs[i] - chosen[i]) < TOL, (i, lp.token_logprobs[i], chosen[i])
        got = sorted(lp.top_logprobs[i].values(), reverse=True)
        # distinct ids can share a text piece (a dict key): compare the values that came back
        assert all(min(abs(g - t) for t in tops[i]) < TOL_TOP for g in got), (i, got, tops[i])
        assert abs(got[0] - tops[i][0]) < TOL


def test_spec_mode_reports_cloud_logprobs_for_every_settled_token(lp_edge, demo_source, demo_bundle_f32, chat_prompts,
                                                                 full_reference):
    """Spec: accepted drafts and corrections carry the cloud's values (greedy, F32: the full model's)."""
    prompt, (ref_tokens, _) = chat_prompts[0], full_reference[0]
    lp = _greedy_logprobs(lp_edge, prompt, "spec")
    chosen, _ = _reference_logprobs(demo_source, prompt, ref_tokens[:N])
    for i in range(_settled(demo_bundle_f32, ref_tokens[:N])):
        assert abs(lp.token_logprobs[i] - chosen[i]) < TOL, (i, lp.token_logprobs[i], chosen[i])
