"""Calibration prompts written on this machine by the full model itself (self-instruct), no hub.

The built-in prompts (`calibration_data.builtin_prompts`) are 16 templates with their slots
filled; an adapter trained only on them learns those templates' answers and does worse on
what people really ask. Here the full model (llama.cpp, the same full-depth GGUF that writes
the answers) continues a numbered list of requests people send an assistant, a few at a time
drawn from a hand-written seed pool that covers how-to and explanations, code, lists and
recipes, rewriting and translation, arithmetic with reasoning, short creative writing, advice
and questions with a passage to work on. Every line it writes becomes a candidate; candidates
are cleaned, length-checked and deduplicated (exactly, and by word-bigram overlap with the
seeds and with each other, as in Self-Instruct). Follow-up turns are added later, while the
answers are written (`calibration_data.DataConfig.follow_up_every`).

The seed pool is not the diverse held-out set (`data/heldout_diverse.jsonl`); a test checks
that no seed and no generated request is close to one of its prompts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import time
from pathlib import Path
from typing import Any, Callable

SI_VERSION = 1  # bump when the seed pool, the meta prompt or the filters change
SELF_INSTRUCT_DEFAULT = 160  # requests written for a default export (with the built-in prompts)

# One request per line; categories only steer the mix of examples in each meta prompt.
SEEDS: dict[str, list[str]] = {
    "howto": [
        "How do I get rid of fruit flies in my kitchen?",
        "What is the best way to learn the basics of drawing as an adult?",
        "How can I keep my houseplants alive while I am away for two weeks?",
        "Explain how a credit score is calculated.",
        "How does a dishwasher get plates clean without scrubbing?",
        "What should I check before buying a used bicycle?",
        "How do I make my old laptop run faster?",
        "Why do cats purr?",
        "What causes thunder?",
    ],
    "code": [
        "Write a Python script that renames all .txt files in a folder to .md.",
        "What is the difference between a list and a tuple in Python?",
        "My JavaScript loop prints undefined. Here is the code: for (let i = 0; i <= arr.length; i++) "
        "{ console.log(arr[i]); } What is wrong?",
        "Write a SQL query that finds the ten customers who spent the most last year.",
        "Explain what a recursive function is, with a short example.",
        "How do I read a CSV file with pandas and print the first five rows?",
        "Write a bash command that counts the lines in every .py file in a directory.",
        "Write a function in C that swaps two integers using pointers.",
    ],
    "lists": [
        "Give me a shopping list for a week of vegetarian dinners.",
        "What are ten things to pack for a weekend camping trip?",
        "Suggest five names for a small bakery.",
        "Give me a simple recipe for tomato soup.",
        "List the steps to make fried rice with leftover rice.",
        "What are some good exercises I can do at my desk?",
        "Give me a recipe for banana bread without eggs.",
        "Name six birds that live in cities.",
    ],
    "rewrite": [
        "Rewrite this sentence to sound more professional: hey, can u send me the report asap?",
        "Translate into Spanish: Where is the nearest train station?",
        "Summarize this in one sentence: The town council met on Monday and voted to close the old library, "
        "citing repair costs, but promised to open a new reading room in the community centre next spring.",
        "Fix the grammar: Me and him goes to the store yesterday and buyed three apple.",
        "Make this paragraph shorter: Our company has been working very hard for many years in order to "
        "provide the best possible service to all of our valued customers across the whole country.",
        "Translate into French: I would like a table for two, please.",
        "Turn these notes into a short email: meeting moved to Thursday, 3 pm, room 204, bring slides.",
        "Say this more politely: Your package is late because you gave us the wrong address.",
    ],
    "math": [
        "A recipe needs 3 eggs for 12 cookies. How many eggs do I need for 30 cookies?",
        "If I save 45 dollars a week, how long until I have 1000 dollars?",
        "What is 15% of 80? Show how you work it out.",
        "A rectangle is 7 cm wide and 12 cm long. What are its area and perimeter?",
        "I drove 180 km and used 12 litres of fuel. How many km per litre is that?",
        "A shirt costs 40 dollars and is on sale for 25% off. What is the sale price?",
        "How many minutes are there in a week?",
        "Sara is twice as old as her brother, who is 7. How old will Sara be in 5 years?",
    ],
    "creative": [
        "Write a haiku about a cup of morning coffee.",
        "Write a four-line poem about a cat sleeping in the sun.",
        "Write the opening paragraph of a mystery story set on a train.",
        "Write a short dialogue between a customer and a grumpy waiter.",
        "Tell me a short bedtime story about a turtle who wants to fly.",
        "Write a limerick about a penguin who hates the cold.",
        "Describe a rainy city street at night in three sentences.",
        "Write a funny birthday message for my brother.",
    ],
    "advice": [
        "I have a job interview tomorrow and I am nervous. Any tips?",
        "How can I politely say no when a friend asks to borrow money?",
        "What should I do if I cannot sleep before an exam?",
        "My roommate never does the dishes. How should I bring it up?",
        "How do I stay motivated when studying alone?",
        "What are good questions to ask at the end of a job interview?",
        "How can I be more productive in the morning?",
        "Is it better to pay off debt or to save first?",
    ],
    "facts": [
        "Who invented the telephone?",
        "What is the difference between a comet and an asteroid?",
        "Why is the sky blue?",
        "What was the Cold War?",
        "How far is the Sun from the Earth?",
        "What is the largest ocean on Earth?",
        "Why do leaves change colour in autumn?",
        "What is the difference between a virus and a bacterium?",
    ],
}

META_HEADER = "Here is a list of different requests that people send to an AI assistant:\n"
EXAMPLES_PER_META = 5
LINES_PER_META = 6  # the model continues the list; its first few lines are kept
META_MAX_TOKENS = 160
KEPT_PER_META = 2.5
TOKENS_PER_META = 57  # written per list before LINES_PER_META line breaks (measured mean, 64 lists; estimate only)
TEMPERATURE = 0.7
MIN_WORDS, MAX_WORDS = 3, 80
MAX_BIGRAM_OVERLAP = 0.6  # Jaccard of word bigrams above this: a near-duplicate


@dataclasses.dataclass(frozen=True)
class SelfInstructConfig:
    """What decides the generated requests (the cache key)."""

    requests: int = 200
    seed: int = 0

    def key(self, fingerprint: str) -> str:
        blob = json.dumps({"v": SI_VERSION, "fp": fingerprint, "cfg": dataclasses.asdict(self),
                           "seeds": SEEDS, "header": META_HEADER}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


def all_seeds() -> list[str]:
    return [s for group in SEEDS.values() for s in group]


def meta_prompt(rng: random.Random, category: str) -> str:
    """A numbered list of EXAMPLES_PER_META seed requests of one category (a 135M model writes
    questions whatever the mix; one kind per list keeps every kind in the output), left open."""
    lines = [f"{i + 1}. {s}" for i, s in enumerate(rng.sample(SEEDS[category], EXAMPLES_PER_META))]
    return META_HEADER + "\n".join(lines) + f"\n{EXAMPLES_PER_META + 1}."


_NUMBER = re.compile(r"^\s*\d+\s*[.)]\s*")


def parse_lines(text: str) -> list[str]:
    """The requests in a continuation of the numbered list: its first line (the open item) and the
    numbered lines after it."""
    out = []
    for j, line in enumerate(text.split("\n")[:LINES_PER_META]):
        if j > 0:
            if not _NUMBER.match(line):
                break
            line = _NUMBER.sub("", line, count=1)
        out.append(line.strip())
    return out


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _bigrams(text: str) -> set[tuple[str, str]]:
    w = _words(text)
    return set(zip(w, w[1:])) if len(w) > 1 else {(w[0], "")} if w else set()


def overlap(a: set[Any], b: set[Any]) -> float:
    return len(a & b) / max(1, len(a | b))


def acceptable(text: str) -> bool:
    """A plausible request: a sentence of MIN..MAX words, not a fragment of the list itself."""
    n = len(_words(text))
    if not MIN_WORDS <= n <= MAX_WORDS or len(text) > 600:
        return False
    if text[-1] not in ".?!:\"')" or "http" in text.lower():
        return False
    return not text.lower().startswith(("here is", "here are", "request", "a list", "list of different"))


class Deduper:
    """Rejects exact and near duplicates (word-bigram Jaccard > MAX_BIGRAM_OVERLAP) of anything added."""

    def __init__(self, reference: list[str]) -> None:
        self.seen: set[str] = set()
        self.grams: list[set[tuple[str, str]]] = []
        for r in reference:
            self.add(r)

    def add(self, text: str) -> bool:
        norm = " ".join(_words(text))
        g = _bigrams(text)
        if norm in self.seen or any(overlap(g, x) > MAX_BIGRAM_OVERLAP for x in self.grams):
            return False
        self.seen.add(norm)
        self.grams.append(g)
        return True


def write_requests(full_gguf: Path, cfg: SelfInstructConfig, *, workers: int, n_parallel: int,
                   log: Callable[[str], None] = print, progress: bool = True,
                   threads: int | None = None) -> tuple[list[str], dict[str, Any]]:
    """`cfg.requests` new requests written by the full model (fewer if it stops producing new ones)."""
    from quantize.calibration_data import DataConfig, generate_parallel, generation_rates

    from edge_runtime.llama_backend import LlamaModel

    rng = random.Random(cfg.seed)
    dedup = Deduper(all_seeds())
    kept: list[str] = []
    candidates = rejected = lists = written = 0
    t0 = time.time()
    model = LlamaModel(full_gguf)
    try:
        # about KEPT_PER_META kept per list here; rounds until enough (each round is one batch pass)
        for round_ in range(4):
            want = cfg.requests - len(kept)
            if want <= 0:
                break
            cats = sorted(SEEDS)
            metas = [meta_prompt(rng, cats[j % len(cats)]) for j in range(max(16, int(want / KEPT_PER_META)))]
            enc = [model.tokenize(m, add_special=True, parse_special=False) for m in metas]
            dcfg = DataConfig(max_new_tokens=META_MAX_TOKENS, temperature=TEMPERATURE,
                              seed=cfg.seed * 1000 + round_, n_parallel=n_parallel, workers=workers,
                              stop_lines=LINES_PER_META)
            if round_ == 0:
                prefill_rate, decode_rate = generation_rates(model, dcfg)
                est = (sum(map(len, enc)) / prefill_rate + len(enc) * TOKENS_PER_META / decode_rate) / workers
                log(f"self-instruct: the full model continues {len(enc)} lists of requests for {want} new ones; "
                    f"estimated ~{est:.0f} s over {workers} worker(s)")
            _, answers = generate_parallel(full_gguf, [], enc, dcfg, token_budget=None, model=model,
                                           desc=f"self-instruct requests ({round_ + 1})", progress=progress,
                                           threads=threads)
            lists += len(answers)
            written += sum(len(s.answer) for s in answers)
            for s in answers:
                for line in parse_lines(model.detokenize(s.answer)):
                    candidates += 1
                    if len(kept) < cfg.requests and acceptable(line) and dedup.add(line):
                        kept.append(line)
                    else:
                        rejected += 1
    finally:
        model.close()
    info = {"requests": len(kept), "candidates": candidates, "rejected": rejected, "lists": lists,
            "tokens_per_list": round(written / max(1, lists), 1),
            "seconds": round(time.time() - t0, 1)}
    log(f"self-instruct: the full model wrote {len(kept)} new requests ({candidates} candidates, "
        f"{rejected} rejected as malformed or near-duplicate) in {info['seconds']} s")
    return kept, info


def cached_requests(full_gguf: Path, fingerprint: str, cfg: SelfInstructConfig, cache_dir: Path | None, *,
                    workers: int, n_parallel: int, log: Callable[[str], None] = print, progress: bool = True,
                    threads: int | None = None) -> list[str]:
    """`write_requests`, cached per (model, config, seed pool) under `cache_dir`."""
    path = cache_dir / f"self-instruct-{cfg.key(fingerprint)}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            reqs = json.loads(path.read_text())["requests"]
            log(f"self-instruct: cache hit {path.name} ({len(reqs)} requests)")
            return reqs
        except (OSError, ValueError, KeyError) as e:
            log(f"self-instruct: ignoring unreadable cache file {path.name} ({e})")
    reqs, info = write_requests(full_gguf, cfg, workers=workers, n_parallel=n_parallel, log=log,
                                progress=progress, threads=threads)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"requests": reqs, "info": info}, indent=0))
        tmp.replace(path)
    return reqs



def as_prompts(requests: list[str], seed: int) -> list[list[dict[str, str]]]:
    """Chat prompts of the requests, with the built-in set's mix of system prompts."""
    from quantize.calibration_data import SYSTEM_PROMPTS

    rng = random.Random(f"self-instruct-systems-{seed}")
    out = []
    for r in requests:
        system = SYSTEM_PROMPTS[rng.randrange(len(SYSTEM_PROMPTS))]
        out.append(([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": r}])
    return out


def interleave(a: list[Any], b: list[Any]) -> list[Any]:
    """a and b merged evenly, each in its order: a token budget that stops before the last
    training prompts then cuts both kinds alike."""
    keyed = [((i + 0.5) / len(a), 0, x) for i, x in enumerate(a)] + [((j + 0.5) / len(b), 1, x) for j, x in enumerate(b)]
    return [x for _, _, x in sorted(keyed, key=lambda t: (t[0], t[1]))]
