"""Calibration data beyond the templates: requests the full model writes itself (self-instruct)
and follow-up turns answered in the same llama.cpp sequence. Real llama.cpp, the demo model."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest

HELDOUT_DIVERSE = Path(__file__).resolve().parent.parent / "quantize" / "data" / "heldout_diverse.jsonl"


def _heldout_user_texts() -> list[str]:
    from quantize.calibration_data import read_calib_text

    return [x["content"] for m in read_calib_text(HELDOUT_DIVERSE) for x in m if x["role"] == "user"]


def test_the_list_continuation_is_parsed_into_requests():
    from quantize.self_instruct import LINES_PER_META, parse_lines

    text = " How do I fix a squeaky door?\n7. Translate into German: good morning.\nnot numbered\n8. late"
    assert parse_lines(text) == ["How do I fix a squeaky door?", "Translate into German: good morning."]
    assert len(parse_lines("a?\n" + "".join(f"{i}. b{i}?\n" for i in range(9)))) == LINES_PER_META


def test_malformed_and_near_duplicate_requests_are_rejected():
    from quantize.self_instruct import Deduper, acceptable

    assert acceptable("How do I make a paper plane that flies far?")
    assert not acceptable("Hi?")  # too short
    assert not acceptable("How do I make a paper plane that")  # cut mid-sentence
    assert not acceptable("Here are some more requests:")
    d = Deduper(["What is the best way to learn to cook?"])
    assert not d.add("What is the best way to learn to cook?")
    assert not d.add("what is the best way to learn to cook")  # case and punctuation
    assert not d.add("What is the best way to learn to cook rice?")  # near duplicate
    assert d.add("Write a haiku about a quiet harbour.")


def test_interleave_keeps_both_orders_and_spreads_the_second_list():
    from quantize.self_instruct import interleave

    out = interleave(list(range(10)), ["a", "b"])
    assert [x for x in out if isinstance(x, int)] == list(range(10)) and [x for x in out if isinstance(x, str)] == ["a", "b"]
    assert 2 <= out.index("a") <= 4 and 7 <= out.index("b") <= 10


def test_the_seed_pool_is_not_the_diverse_heldout_set():
    """The seeds steer what the model writes; none may be (close to) a held-out prompt."""
    from quantize.self_instruct import SEEDS, _bigrams, all_seeds, overlap

    held = [_bigrams(t) for t in _heldout_user_texts()]
    for s in all_seeds():
        worst = max(overlap(_bigrams(s), h) for h in held)
        assert worst < 0.5, (s, worst)  # shares at most a phrase such as "write a limerick about"
    assert len(SEEDS) >= 8 and all(len(v) >= 5 for v in SEEDS.values())


def test_the_full_model_writes_new_distinct_requests_and_they_are_cached(tmp_path):
    from quantize.self_instruct import (MAX_BIGRAM_OVERLAP, SelfInstructConfig, _bigrams, acceptable, all_seeds,
                                        cached_requests, overlap)
    from quantize.source import demo_gguf_path

    cfg = SelfInstructConfig(requests=24, seed=3)
    log: list[str] = []
    reqs = cached_requests(demo_gguf_path(), "fp-test", cfg, tmp_path, workers=1, n_parallel=16, log=log.append,
                           progress=False, threads=1)
    assert len(reqs) == 24 and len(set(reqs)) == 24
    assert all(acceptable(r) for r in reqs)
    seeds = [_bigrams(s) for s in all_seeds()]
    held = [_bigrams(t) for t in _heldout_user_texts()]
    for i, r in enumerate(reqs):
        g = _bigrams(r)
        assert max(overlap(g, s) for s in seeds) <= MAX_BIGRAM_OVERLAP, r  # new, not a copied seed
        assert max((overlap(g, _bigrams(o)) for o in reqs[:i]), default=0) <= MAX_BIGRAM_OVERLAP, r
        assert max(overlap(g, h) for h in held) < 0.9, r  # nothing the diverse set asks, word for word
    assert "wrote 24 new requests" in log[-1]
    files = list(tmp_path.glob("self-instruct-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["requests"] == reqs
    t0 = time.time()
    again = cached_requests(demo_gguf_path(), "fp-test", cfg, tmp_path, workers=1, n_parallel=16, log=log.append,
                            progress=False, threads=1)
    assert again == reqs and "cache hit" in log[-1] and time.time() - t0 < 1.0
    other = SelfInstructConfig(requests=24, seed=4)
    assert other.key("fp-test") != cfg.key("fp-test") != cfg.key("fp-other")


def test_follow_up_suffix_is_the_templates_text_between_turns(demo_source):
    from transformers import AutoTokenizer

    from edge_runtime.llama_backend import LlamaModel
    from quantize.calibration_data import FOLLOW_UPS, follow_up_suffixes, render_prompt
    from quantize.source import demo_gguf_path

    tok = AutoTokenizer.from_pretrained(demo_source.tokenizer_dir)
    model = LlamaModel(demo_gguf_path())
    try:
        sfx = follow_up_suffixes(tok, model)
        assert sfx is not None and len(sfx) == len(FOLLOW_UPS)
        first = [{"role": "user", "content": "Name a colour."}]
        answer = model.tokenize("Blue.", add_special=False, parse_special=False)
        prompt = model.tokenize(render_prompt(tok, first), add_special=False, parse_special=True)
        for text, s in zip(FOLLOW_UPS, sfx):
            assert model.is_eog(s[0])
            conv = first + [{"role": "assistant", "content": "Blue."}, {"role": "user", "content": text}]
            # what the sequence holds after a follow-up is what the template renders for the conversation
            assert model.detokenize(prompt + answer + s) == model.detokenize(
                model.tokenize(render_prompt(tok, conv), add_special=False, parse_special=True))
    finally:
        model.close()


@pytest.mark.slow
def test_follow_up_turns_continue_the_answer_in_its_sequence(demo_source):
    """Every answer that ends its turn gets a follow-up (follow_up_every=1): right after it, its
    prompt is the first turn + that answer + a follow-up request, and one worker or two write the
    same samples."""
    from transformers import AutoTokenizer

    from edge_runtime.llama_backend import LlamaModel
    from quantize.calibration_data import (DataConfig, builtin_prompts, follow_up_suffixes, generate_parallel,
                                           render_prompt)
    from quantize.source import demo_gguf_path

    tok = AutoTokenizer.from_pretrained(demo_source.tokenizer_dir)
    model = LlamaModel(demo_gguf_path())
    try:
        sfx = follow_up_suffixes(tok, model)
        math = builtin_prompts()[8::16][:6]  # the arithmetic template: short answers that end their turn
        prompts = [model.tokenize(render_prompt(tok, m), add_special=False, parse_special=True) for m in math]
    finally:
        model.close()
    cfg = DataConfig(max_new_tokens=96, n_parallel=6, follow_up_every=1)
    _, one = generate_parallel(demo_gguf_path(), [], prompts, cfg, token_budget=None, desc="", progress=False,
                               threads=1, follow_ups=sfx)
    _, two = generate_parallel(demo_gguf_path(), [], prompts, dataclasses.replace(cfg, workers=2),
                               token_budget=None, desc="", progress=False, follow_ups=sfx)
    assert [(s.prompt, s.answer, s.turn) for s in one] == [(s.prompt, s.answer, s.turn) for s in two]
    firsts = [s for s in one if s.turn == 0]
    assert [s.prompt for s in firsts] == prompts
    follows = [(a, b) for a, b in zip(one, one[1:]) if b.turn == 1]
    assert follows and len(follows) == sum(1 for s in firsts if s.answer[-1] == sfx[0][0])
    for a, b in follows:
        assert a.turn == 0 and b.prompt[: len(a.prompt) + len(a.answer)] == a.prompt + a.answer
        assert any(b.prompt[len(a.prompt) + len(a.answer):] == s[1:] for s in sfx)
        assert b.topk_ids.shape == (len(b.answer), 32) and np.all(b.topk_logp[:, 0] >= b.topk_logp[:, -1])
    none = generate_parallel(demo_gguf_path(), [], prompts, dataclasses.replace(cfg, follow_up_every=0),
                             token_budget=None, desc="", progress=False, threads=1, follow_ups=sfx)[1]
    assert [s.answer for s in none] == [s.answer for s in firsts]  # the first turns do not depend on it
