"""Calibration text for the exit adapter: prompts, and the full model's own answers to them.

The exit adapter imitates the *full* model on the text the full model itself
writes, so calibration data is always a list of prompts answered by the full
model, run by llama.cpp on a full-depth GGUF (~8x faster here than
transformers' `generate`). Training answers are sampled (temperature, fixed
seed) and keep the full model's top-k log-probabilities at every generated
position ("teacher cache"); held-out answers are greedy, so that spec-drafting
acceptance can be replayed exactly on them. Positions inside the prompt
(system text, chat template, the user's words) are never targets.

Prompts come from a built-in, combinatorial set (`builtin_prompts`, no external data)
joined by requests the full model writes itself (`quantize.self_instruct`), or from the
user (`--calib-text FILE`):

* `.txt`   one prompt per paragraph (paragraphs are separated by blank lines);
           each is sent as a user message through the model's chat template.
* `.jsonl` one conversation per line: `{"messages": [{"role": ..., "content": ...}, ...]}`
           or a bare list of such messages. The conversation up to its last user
           message is the prompt; a trailing assistant answer is dropped (the
           full model writes its own).

Every `follow_up_every`-th training answer that ends its turn is followed by a second
user turn (`FOLLOW_UPS`) and the full model's answer to it, in the same llama.cpp sequence.

The split into training and held-out prompts is fixed (every
`HELDOUT_EVERY`-th prompt of a fixed shuffle is held out) and the held-out
prompts are never trained on.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fogline.errors import ConfigError, ExportError

HELDOUT_EVERY = 8
MIN_PROMPTS = 2 * HELDOUT_EVERY  # at least two held-out prompts
TOP_K = 32  # teacher log-probs kept per generated position
DATA_VERSION = 5  # bump when generation or storage changes

Messages = list[dict[str, str]]


# ---- the built-in prompt set ----------------------------------------------------------------

_TOPICS = [
    "photosynthesis", "black holes", "the water cycle", "volcanoes", "the Roman Empire", "machine learning",
    "the human heart", "climate change", "the printing press", "honeybees", "electricity", "the stock market",
    "coral reefs", "the French Revolution", "vaccines", "rainbows", "the internet", "earthquakes",
    "the Moon", "jazz music", "plate tectonics", "democracy", "the immune system", "solar panels",
    "the Great Wall of China", "DNA", "coffee", "the Olympic Games", "tides", "renewable energy",
    "ancient Egypt", "gravity", "recycling", "the Renaissance", "sleep", "chess", "bread baking",
    "the Amazon rainforest", "inflation", "electric cars", "dinosaurs", "the Silk Road", "friendship",
    "time zones", "penguins", "the periodic table", "meditation", "bridges", "the violin", "deserts",
]
_AUDIENCES = ["a five-year-old", "a high school student", "a busy manager", "a curious grandparent",
              "someone who has never heard of it", "a new employee"]
_THINGS = ["working from home", "electric cars", "social media", "online classes", "city life",
           "owning a dog", "nuclear power", "public transport", "learning a second language",
           "homeschooling", "open-plan offices", "smartphones for children", "four-day work weeks",
           "buying a house", "freelancing", "video games"]
_HOWTOS = ["make a cup of tea", "change a flat tyre", "plant tomatoes", "write a cover letter",
           "learn to juggle", "prepare for a job interview", "save money each month", "start running",
           "organize a small party", "clean a laptop keyboard", "make pancakes", "study for an exam",
           "fall asleep faster", "tie a tie", "set up a fish tank", "learn to touch type",
           "back up my photos", "make a budget", "care for a cactus", "improve my handwriting"]
_CHARACTERS = ["a lonely robot", "a brave mouse", "an old lighthouse keeper", "a young wizard",
               "a lost astronaut", "a talking cat", "a shy dragon", "a detective", "a baker",
               "a girl who can fly", "a retired pirate", "a curious fox"]
_EVENTS = ["finds a mysterious map", "learns to sing", "makes an unexpected friend", "gets lost in a city",
           "discovers a hidden door", "wins a competition", "loses their way home", "meets a ghost",
           "builds a boat", "opens a small shop"]
_CODE = ["reverses a string", "checks whether a number is prime", "returns the largest item in a list",
         "counts the vowels in a sentence", "computes the factorial of n", "removes duplicates from a list",
         "converts Celsius to Fahrenheit", "checks whether a word is a palindrome",
         "sums the even numbers in a list", "returns the n-th Fibonacci number",
         "sorts a list of names alphabetically", "counts how often each word appears in a text"]
_LANGS = ["Python", "JavaScript"]
_RECIPIENTS = ["my manager", "a landlord", "a teacher", "a customer", "my team", "a neighbour"]
_SUBJECTS = ["a delayed delivery", "a day off next Friday", "a broken heater", "the project deadline",
             "a thank-you for their help", "a meeting next week", "a noise complaint", "a new schedule"]
_CATEGORIES = ["fruits that are high in vitamin C", "famous painters", "board games for families",
               "ways to reduce stress", "countries in South America", "healthy breakfast ideas",
               "musical instruments", "programming languages", "indoor plants", "planets in our solar system",
               "tips for saving water", "hobbies you can do at home"]
_WORDS = ["serendipity", "resilient", "ephemeral", "meticulous", "ubiquitous", "candid", "benevolent",
          "pragmatic", "nostalgia", "ambiguous", "diligent", "eloquent"]
_PAIRS = [("cats", "dogs"), ("tea", "coffee"), ("trains", "planes"), ("books", "films"),
          ("summer", "winter"), ("Python", "JavaScript"), ("renting", "buying a home"),
          ("the sun", "the moon"), ("paper books", "e-readers"), ("running", "swimming")]
SYSTEM_PROMPTS = [None, None, None, "You are a concise assistant.", "You are a friendly teacher.",
            "Answer briefly and clearly."]


def _math_prompt(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 60), rng.randint(2, 40), rng.randint(2, 9)
    return rng.choice([
        f"What is {a} plus {b}? Explain your steps.",
        f"A shop sells pencils for {c} dollars each. How much do {a} pencils cost?",
        f"Tom has {a} apples and gives away {min(a - 1, b)}. How many are left?",
        f"What is {a} times {c}?",
        f"If a train travels {a * 10} km in {c} hours, what is its average speed?",
        f"Is {a * 2 + 1} a prime number? Explain.",
    ])


_TEMPLATES: list[Callable[[random.Random], str]] = [
    lambda r: f"Explain {r.choice(_TOPICS)} to {r.choice(_AUDIENCES)}.",
    lambda r: f"Give me three interesting facts about {r.choice(_TOPICS)}.",
    lambda r: f"Write a short poem about {r.choice(_TOPICS)}.",
    lambda r: f"What are the pros and cons of {r.choice(_THINGS)}?",
    lambda r: f"Summarize the history of {r.choice(_TOPICS)} in a few sentences.",
    lambda r: f"How do I {r.choice(_HOWTOS)}?",
    lambda r: f"Write a short story about {r.choice(_CHARACTERS)} who {r.choice(_EVENTS)}.",
    lambda r: f"Write a {r.choice(_LANGS)} function that {r.choice(_CODE)}.",
    _math_prompt,
    lambda r: f"Write a polite email to {r.choice(_RECIPIENTS)} about {r.choice(_SUBJECTS)}.",
    lambda r: "Compare {} and {}.".format(*r.choice(_PAIRS)),
    lambda r: f"List five {r.choice(_CATEGORIES)}.",
    lambda r: f"What does the word '{r.choice(_WORDS)}' mean? Use it in a sentence.",
    lambda r: f"Why is {r.choice(_TOPICS)} important?",
    lambda r: f"Give me some tips to {r.choice(_HOWTOS)}.",
    lambda r: f"What is a common misconception about {r.choice(_TOPICS)}?",
]


DEFAULT_PROMPTS = 360  # a default export's prompts: built-in templated ones + self-instruct requests


def builtin_prompts(n: int = DEFAULT_PROMPTS) -> list[Messages]:
    """`n` distinct chat prompts: the templates in turn, slots filled by a fixed RNG."""
    rng = random.Random(20240611)
    out: list[Messages] = []
    seen: set[str] = set()
    for i in itertools.count():
        if len(out) >= n or i > 50 * n:
            break
        text = _TEMPLATES[i % len(_TEMPLATES)](rng)
        if text in seen:
            continue
        seen.add(text)
        system = SYSTEM_PROMPTS[rng.randrange(len(SYSTEM_PROMPTS))]
        msgs: Messages = ([{"role": "system", "content": system}] if system else [])
        msgs.append({"role": "user", "content": text})
        out.append(msgs)
    return out


# ---- user-supplied prompts --------------------------------------------------------------------

def read_calib_text(path: str | Path) -> list[Messages]:
    """Prompts from a .txt or .jsonl file; any problem is one ConfigError naming file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--calib-text {p}: no such file")
    suffix = p.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise ConfigError(f"--calib-text {p}: expected a .txt (one prompt per paragraph) or "
                          f".jsonl (chat messages) file, not {suffix or 'no extension'!r}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--calib-text {p}: not UTF-8 text (byte {e.start})") from None
    prompts = _read_txt(text) if suffix == ".txt" else _read_jsonl(p, text)
    if len(prompts) < MIN_PROMPTS:
        raise ConfigError(f"--calib-text {p}: {len(prompts)} prompt(s); at least {MIN_PROMPTS} are needed "
                          f"(every {HELDOUT_EVERY}th is held out for calibration)")
    return prompts


def _read_txt(text: str) -> list[Messages]:
    paragraphs = [" ".join(par.split()) for par in text.replace("\r\n", "\n").split("\n\n")]
    return [[{"role": "user", "content": par}] for par in paragraphs if par]


def _read_jsonl(p: Path, text: str) -> list[Messages]:
    prompts: list[Messages] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"--calib-text {p} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        msgs = obj.get("messages") if isinstance(obj, dict) else obj
        if not isinstance(msgs, list) or not msgs:
            raise ConfigError(f"{where}: expected {{\"messages\": [...]}} or a list of chat messages")
        clean: Messages = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise ConfigError(f"{where}: message {j} must be an object with role system/user/assistant "
                                  "and a string content")
            clean.append({"role": m["role"], "content": m["content"]})
        last_user = max((j for j, m in enumerate(clean) if m["role"] == "user"), default=None)
        if last_user is None:
            raise ConfigError(f"{where}: the conversation has no user message")
        prompts.append(clean[: last_user + 1])
    return prompts


# ---- generated data ---------------------------------------------------------------------------

@dataclass
class Sample:
    """One prompt and the full model's answer. Targets are the answer tokens."""

    prompt: list[int]
    answer: list[int]
    topk_ids: np.ndarray | None = None  # [len(answer), TOP_K] int32: teacher's top-k at each answer step
    topk_logp: np.ndarray | None = None  # [len(answer), TOP_K] float16 log-probabilities
    turn: int = 0  # 1: a follow-up answer (the prompt holds the first turn and its answer)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.answer

    @property
    def first_target(self) -> int:
        """Position whose output predicts answer[0]; targets are [first_target, len(tokens) - 1)."""
        return len(self.prompt) - 1


@dataclass
class CalibrationSet:
    train: list[Sample]
    heldout: list[Sample]
    key: str  # content hash: identifies the data in cache keys and manifests
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def train_tokens(self) -> int:
        return sum(len(s.answer) for s in self.train)

    @property
    def heldout_tokens(self) -> int:
        return sum(len(s.answer) for s in self.heldout)


@dataclass(frozen=True)
class DataConfig:
    """What decides the calibration data (everything here is part of its cache key)."""

    train_tokens: int | None = None  # training answer tokens; None: one answer per training prompt
    heldout_prompts: int = 64  # held-out prompts answered greedily (at most)
    max_new_tokens: int = 160
    temperature: float = 0.8
    seed: int = 0
    n_parallel: int = 16  # llama.cpp sequences per worker
    # worker processes, one llama.cpp thread each: llama.cpp's decode of a 16-row batch is
    # compute-bound, and two 1-thread processes make 151 tok/s on a 2-core box where one
    # process makes 81 (1 thread) or 124 (2 threads, barrier waits); answer i always gets the
    # same RNG, but which answers a token budget cuts depends on the split, hence in the key
    workers: int = 1
    # stop an answer at its stop_lines-th line break (0: at end of generation or max_new_tokens);
    # self-instruct's numbered lists, where only the first lines are used
    stop_lines: int = 0
    # every follow_up_every-th training answer that ends its turn gets a second user turn (a
    # FOLLOW_UPS request) answered in the same llama.cpp sequence: multi-turn text at the cost of
    # the follow-up's tokens only (the first turn is already in that sequence's KV); 0: none
    follow_up_every: int = 4


FOLLOW_UPS = [
    "Can you make that shorter?", "Can you give me an example?", "Explain that more simply, please.",
    "Thanks! What else should I know?", "Can you put that in a list?", "Why is that?",
    "Can you say more about the first point?", "What would you do differently?",
    "Could you make it sound more friendly?", "What is a common mistake here?",
    "Now summarize your answer in one sentence.", "Is there another way to do it?",
    "Can you write that for a child?", "What are the risks?", "Give me two more ideas.",
    "How long does that usually take?",
]


def follow_up_suffixes(tokenizer: Any, model: Any, texts: list[str] = FOLLOW_UPS) -> list[list[int]] | None:
    """Per follow-up request, the tokens that continue a conversation from the assistant's
    end-of-turn token (included, first) to the next assistant turn's first token: what the chat
    template puts between the two answers. None (no follow-ups) when the template has no such
    fixed suffix, i.e. when it depends on the earlier turns' text."""
    out = []
    for f in texts:
        found = set()
        for u, a in (("Hello.", "Hi there."), ("What is 2 + 2?", "It is 4.")):
            first = render_prompt(tokenizer, [{"role": "user", "content": u}]) + a
            full = render_prompt(tokenizer, [{"role": "user", "content": u}, {"role": "assistant", "content": a},
                                             {"role": "user", "content": f}])
            if not full.startswith(first):
                return None
            found.add(full[len(first):])
        if len(found) != 1:
            return None
        toks = model.tokenize(found.pop(), add_special=False, parse_special=True)
        if len(toks) < 2 or not model.is_eog(toks[0]):
            return None
        out.append(toks)
    return out


def newline_tokens(model: Any) -> frozenset[int]:
    """Token ids whose text holds a line break."""
    return frozenset(t for t in range(model.n_vocab) if b"\n" in model.token_bytes(t))


def render_prompt(tokenizer: Any, msgs: Messages) -> str:
    """Chat-template the prompt with the HF tokenizer (its template is the GGUF's template)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in msgs) + "\n"


def split_prompts(prompts: list[Messages]) -> tuple[list[Messages], list[Messages]]:
    """Every HELDOUT_EVERY-th prompt of a fixed shuffle is held out (files are often grouped by kind)."""
    order = random.Random(7).sample(range(len(prompts)), len(prompts))
    held = {i for j, i in enumerate(order) if j % HELDOUT_EVERY == HELDOUT_EVERY - 1}
    heldout = [p for i, p in enumerate(prompts) if i in held]
    train = [p for i, p in enumerate(prompts) if i not in held]
    return train, heldout


def data_key(fingerprint: str, prompts: list[Messages], cfg: DataConfig) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": DATA_VERSION, "fp": fingerprint, "cfg": cfg.__dict__, "top_k": TOP_K,
                         "heldout_every": HELDOUT_EVERY}, sort_keys=True).encode())
    h.update(json.dumps(prompts, sort_keys=True).encode())
    return h.hexdigest()[:24]


def build_calibration_set(full_gguf: Path, tokenizer: Any, fingerprint: str, prompts: list[Messages],
                          cfg: DataConfig, cache_dir: Path | None, log: Callable[[str], None] = print,
                          progress: bool = True, threads: int | None = None) -> CalibrationSet:
    """Generate (or load from the cache) training and held-out answers of the full model."""
    key = data_key(fingerprint, prompts, cfg)
    path = cache_dir / f"calib-{key}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            cs = load_set(path, key)
            log(f"calibration data: cache hit {path.name} ({cs.train_tokens} training tokens, "
                f"{cs.heldout_tokens} held-out tokens)")
            return cs
        except (OSError, ValueError, KeyError) as e:
            log(f"calibration data: ignoring unreadable cache file {path.name} ({e})")
    train_p, held_p = split_prompts(prompts)
    held_p = held_p[: cfg.heldout_prompts]
    t0 = time.time()
    from edge_runtime.llama_backend import LlamaModel

    model = LlamaModel(full_gguf)
    try:
        def encode(ps: list[Messages]) -> list[list[int]]:
            return [model.tokenize(render_prompt(tokenizer, m), add_special=False, parse_special=True)
                    for m in ps]

        held_tok = [t for t in encode(held_p) if len(t) <= MAX_PROMPT_TOKENS]
        train_tok = [t for t in encode(train_p) if len(t) <= MAX_PROMPT_TOKENS]
        if not held_tok or not train_tok:
            raise ExportError(f"calibration prompts are longer than {MAX_PROMPT_TOKENS} tokens")
        prefill_rate, decode_rate = generation_rates(model, cfg)
        train_want = cfg.train_tokens if cfg.train_tokens else len(train_tok) * EXPECTED_ANSWER_TOKENS
        want = len(held_tok) * EXPECTED_ANSWER_TOKENS + train_want
        mean_prompt = sum(map(len, held_tok + train_tok)) / len(held_tok + train_tok)
        prompt_want = (len(held_tok) + train_want / EXPECTED_ANSWER_TOKENS) * mean_prompt
        est = (prompt_want / prefill_rate + want / decode_rate) / cfg.workers
        log(f"calibration data: ~{want} answer tokens (and ~{prompt_want:.0f} prompt tokens) to generate over "
            f"{cfg.workers} worker(s); estimated ~{est:.0f} s (measured per worker: {decode_rate:.0f} answer "
            f"tokens/s, {prefill_rate:.0f} prompt tokens/s)")
        follow = follow_up_suffixes(tokenizer, model) if cfg.follow_up_every else None
        if cfg.follow_up_every and follow is None:
            log("calibration data: the chat template's text between turns depends on the turns; "
                "no follow-up turns in the training answers")
        heldout, train = generate_parallel(full_gguf, held_tok, train_tok, cfg, model=model,
                                           token_budget=cfg.train_tokens, desc="answers", progress=progress,
                                           threads=threads, follow_ups=follow)
    finally:
        model.close()
    cs = CalibrationSet(train=train, heldout=heldout, key=key,
                        info={"prompts": len(prompts), "train_prompts": len(train), "heldout_prompts": len(heldout),
                              "follow_ups": sum(1 for smp in train if smp.turn),
                              "generate_seconds": round(time.time() - t0, 1), "temperature": cfg.temperature,
                              "max_new_tokens": cfg.max_new_tokens})
    log(f"calibration data: generated {cs.train_tokens} training tokens ({len(train)} answers, "
        f"{cs.info['follow_ups']} of them follow-up turns) and "
        f"{cs.heldout_tokens} held-out tokens ({len(heldout)} answers) in {time.time() - t0:.0f} s")
    if path is not None:
        save_set(path, cs)
    return cs


MAX_PROMPT_TOKENS = 384
MAX_PASSES = 8  # a token budget larger than one answer per prompt reuses prompts up to this often
EXPECTED_ANSWER_TOKENS = 125  # mean answer length on the built-in prompts (for the time estimate only)


def generation_rates(model: Any, cfg: DataConfig, threads: int = 1) -> tuple[float, float]:
    """(prompt tokens/s, answer tokens/s) of one worker here, from a timed prefill of
    `cfg.n_parallel` 32-token prompts and three decode steps of as many rows (the phase's time
    estimate; a second or two)."""
    from edge_runtime.llama_backend import BatchRow, LlamaContext

    n, p0 = cfg.n_parallel, 32
    ctx = LlamaContext(model, n_ctx=64 * n, n_batch=512, n_seq=n, n_threads=threads)
    try:
        ctx.decode([BatchRow(1, 0, 0, True)])  # warm-up: first-call costs are not the rate
        ctx.remove(0)
        t0 = time.perf_counter()
        ctx.decode([BatchRow(1, p, s, p == p0 - 1) for s in range(n) for p in range(p0)])
        t1 = time.perf_counter()
        for p in range(p0, p0 + 3):
            ctx.decode([BatchRow(1, p, s, True) for s in range(n)])
        t2 = time.perf_counter()
        return n * p0 / max(t1 - t0, 1e-6), 3 * n / max(t2 - t1, 1e-6)
    finally:
        ctx.close()


def generate_parallel(full_gguf: Path, heldout: list[list[int]], train: list[list[int]], cfg: DataConfig, *,
                      token_budget: int | None, desc: str, progress: bool = True,
                      threads: int | None = None, model: Any = None,
                      follow_ups: list[list[int]] | None = None) -> tuple[list[Sample], list[Sample]]:
    """`generate` over `cfg.workers` processes (spawned, one llama.cpp thread each): held-out
    answer j goes to worker j % workers and training answer i to worker i % workers; each
    worker gets an equal share of the token budget. With one worker it runs in this process,
    on `model` when the caller has it loaded."""
    if cfg.workers <= 1:
        from edge_runtime.llama_backend import LlamaModel

        own = model is None
        model = LlamaModel(full_gguf) if own else model
        try:
            return generate(model, heldout, train, cfg, token_budget=token_budget, desc=desc,
                            progress=progress, threads=threads, follow_ups=follow_ups)
        finally:
            if own:
                model.close()
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from concurrent.futures import FIRST_EXCEPTION, wait

    from tqdm import tqdm

    w = cfg.workers
    share = None if token_budget is None else -(-token_budget // w)
    spawn = mp.get_context("spawn")
    counter = spawn.Value("q", 0)  # answer tokens written by all workers: the parent's progress bar
    per_answer = min(cfg.max_new_tokens, EXPECTED_ANSWER_TOKENS)
    total = (token_budget or len(train) * per_answer) + len(heldout) * per_answer
    with ProcessPoolExecutor(w, mp_context=spawn, initializer=_init_worker, initargs=(counter,)) as pool, \
            tqdm(total=total, desc=desc, unit="tok", disable=not progress, leave=False) as bar:
        futs = [pool.submit(_generate_worker, str(full_gguf), heldout, train, cfg, share, k, w, follow_ups)
                for k in range(w)]
        while True:
            done, pending = wait(futs, timeout=0.5, return_when=FIRST_EXCEPTION)
            bar.update(counter.value - bar.n)
            if not pending or any(f.exception() for f in done):
                break
        parts = [f.result() for f in futs]
    held = {i: smp for part in parts for i, smp in part[0]}
    tr = {i: smp for part in parts for i, smp in part[1]}
    return [held[i] for i in sorted(held)], [tr[i] for i in sorted(tr)]


_WORKER_COUNTER: Any = None  # in a worker process: the shared token counter (`_init_worker`)


def _init_worker(counter: Any) -> None:
    global _WORKER_COUNTER
    _WORKER_COUNTER = counter


def _generate_worker(full_gguf: str, heldout: list[list[int]], train: list[list[int]], cfg: DataConfig,
                     token_budget: int | None, k: int, w: int,
                     follow_ups: list[list[int]] | None) -> tuple[list[tuple[Any, Sample]], ...]:
    """One worker process: the answers with index % w == k, on one llama.cpp thread."""
    from edge_runtime.llama_backend import LlamaModel

    model = LlamaModel(Path(full_gguf))
    try:
        return generate(model, heldout, train, cfg, token_budget=token_budget, desc="", progress=False,
                        threads=1, shard=(k, w), indexed=True, counter=_WORKER_COUNTER, follow_ups=follow_ups)
    finally:
        model.close()


def generate(model: Any, heldout: list[list[int]], train: list[list[int]], cfg: DataConfig, *,
             token_budget: int | None, desc: str, progress: bool = True, threads: int | None = None,
             shard: tuple[int, int] = (0, 1), indexed: bool = False, counter: Any = None,
             follow_ups: list[list[int]] | None = None) -> Any:
    """Answer the held-out prompts greedily and the training prompts by sampling, in one pass of
    continuous batching over `cfg.n_parallel` llama.cpp sequences (one pass: one set of worker
    processes and model loads, and the batch drains once, after the training budget is met;
    the held-out answers take the first slots). Returns (held-out samples, training samples), each in index order.

    Sampling uses one RNG per training answer (seeded by `cfg.seed` and the answer's index).
    With a token budget, training prompts are answered again (new samples) until the budget
    of *training* tokens is met, at most MAX_PASSES times each; the training answers then in
    flight are kept as they are (prefixes of the full model's answers). Held-out answers are
    always complete.
    shard (k, w): answer only the jobs with index % w == k (a worker's share).
    indexed: return ([(index, Sample)], [((index, turn), Sample)]) instead.
    counter: a shared multiprocessing Value that gets the answer tokens written (progress).
    follow_ups: `follow_up_suffixes` (see DataConfig.follow_up_every); a training answer's
    follow-up comes right after it in the returned training samples.
    """
    from tqdm import tqdm

    from edge_runtime.llama_backend import BatchRow, LlamaContext

    n_train = len(train) * (MAX_PASSES if token_budget is not None else 1) if train else 0
    jobs = ([(True, j) for j in range(shard[0], len(heldout), shard[1])]
            + [(False, i) for i in range(shard[0], n_train, shard[1])])
    results: tuple[dict[Any, Sample], dict[Any, Sample]] = ({}, {})  # (training by (i, turn), held-out by j)
    if not jobs:
        return [], []
    n_par = min(cfg.n_parallel, len(jobs))
    seq_ctx = MAX_PROMPT_TOKENS + cfg.max_new_tokens + 8
    if follow_ups and cfg.follow_up_every:
        seq_ctx += max(map(len, follow_ups)) + cfg.max_new_tokens
    ctx = LlamaContext(model, n_ctx=seq_ctx * n_par, n_batch=512, n_seq=n_par, n_threads=threads)
    slots: list[dict[str, Any] | None] = [None] * n_par
    breaks = newline_tokens(model) if cfg.stop_lines else frozenset()
    fed: list[list[int]] = [[] for _ in range(n_par)]  # the tokens in each slot's KV, by position
    next_job = 0
    produced = 0  # training answer tokens
    budget_met = False
    bar = tqdm(total=(token_budget or n_train * cfg.max_new_tokens) + len(heldout) * cfg.max_new_tokens,
               desc=desc, unit="tok", disable=not progress, leave=False)

    def new_state(i: int, greedy: bool, prompt: list[int], turn: int = 0, pos: int = 0,
                  pending: list[int] | None = None) -> dict[str, Any]:
        return {"i": i, "greedy": greedy, "turn": turn, "prompt": prompt, "pos": pos, "answer": [], "ids": [],
                "logp": [], "lines": 0, "pending": list(prompt if pending is None else pending),
                "rng": None if greedy else np.random.default_rng([cfg.seed, i] + ([turn] if turn else []))}

    def follow_up(st: dict[str, Any]) -> dict[str, Any] | None:
        """The second turn of a training answer that ended its turn, or None."""
        every = cfg.follow_up_every
        if (st["greedy"] or st["turn"] or not follow_ups or not every or budget_met
                or st["i"] % every != every - 1 or not st["answer"]):
            return None
        sfx = follow_ups[int(np.random.default_rng([cfg.seed, st["i"], 99]).integers(len(follow_ups)))]
        if st["answer"][-1] != sfx[0] or st["pos"] + len(sfx) + cfg.max_new_tokens > seq_ctx:
            return None
        # the end-of-turn token was sampled but not fed yet: it is the suffix's first token
        return new_state(st["i"], False, st["prompt"] + st["answer"] + sfx[1:], turn=1, pos=st["pos"], pending=sfx)

    def finish(s: int) -> None:
        st = slots[s]
        assert st is not None
        key = st["i"] if st["greedy"] else (st["i"], st["turn"])
        results[st["greedy"]][key] = _finish(st["prompt"], st, st["greedy"])
        slots[s] = follow_up(st)

    try:
        while True:
            for s in range(n_par):  # refill free slots
                while slots[s] is None and next_job < len(jobs):
                    greedy, i = jobs[next_job]
                    next_job += 1
                    if budget_met and not greedy:
                        continue
                    prompt = heldout[i] if greedy else train[i % len(train)]
                    # keep the KV of what this prompt shares with the slot's last sequence (the chat
                    # template's system turn, mostly), as llama.cpp's server does: ~half the prompt tokens
                    keep = _common_prefix(fed[s], prompt, len(prompt) - 1)
                    ctx.remove(s, keep)
                    del fed[s][keep:]
                    slots[s] = new_state(i, greedy, prompt, pos=keep, pending=prompt[keep:])
            active = [s for s in range(n_par) if slots[s] is not None]
            if not active:
                break
            rows, owners = [], []
            for s in active:  # decoding slots give one row, prefilling ones a chunk of their prompt
                st = slots[s]
                room = ctx.n_batch - len(rows)
                if room <= 0:
                    break
                take = st["pending"][:room]
                done = len(take) == len(st["pending"])
                rows.extend(BatchRow(t, st["pos"] + j, s, done and j == len(take) - 1) for j, t in enumerate(take))
                fed[s].extend(take)
                st["pos"] += len(take)
                st["pending"] = st["pending"][len(take):]
                if done:
                    owners.append(s)
            res = ctx.decode(rows)
            if counter is not None and owners:
                with counter.get_lock():
                    counter.value += len(owners)
            for row, s in enumerate(owners):
                st = slots[s]
                z = res.logits[row].astype(np.float64)
                if st["greedy"]:
                    tok = int(np.argmax(z))
                else:
                    m = z.max()
                    logp = z - (m + np.log(np.exp(z - m).sum()))
                    g = st["rng"].gumbel(size=z.shape[0])
                    tok = int(np.argmax(z / cfg.temperature + g))
                    top = np.argpartition(-logp, TOP_K)[:TOP_K]
                    top = top[np.argsort(-logp[top])]
                    st["ids"].append(top.astype(np.int32))
                    st["logp"].append(logp[top].astype(np.float16))
                    produced += 1
                st["answer"].append(tok)
                bar.update(1)
                if tok in breaks:
                    st["lines"] += model.token_bytes(tok).count(b"\n")
                if model.is_eog(tok) or len(st["answer"]) >= cfg.max_new_tokens \
                        or (cfg.stop_lines and st["lines"] >= cfg.stop_lines):
                    finish(s)
                else:
                    st["pending"] = [tok]
            if token_budget is not None and not budget_met and produced >= token_budget:
                # Budget reached: training answers in flight end here (a prefix of an answer
                # is still the full model's own text) and no new one starts; held-out ones go on.
                budget_met = True
                for s in range(n_par):
                    st = slots[s]
                    if st is not None and not st["greedy"]:
                        if st["answer"]:
                            finish(s)
                        slots[s] = None
    finally:
        bar.close()
        ctx.close()
    train_r, held_r = results[False], results[True]
    if indexed:
        return sorted(held_r.items()), sorted(train_r.items())
    return [held_r[i] for i in sorted(held_r)], [train_r[i] for i in sorted(train_r)]


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    for x, y in zip(a[:limit], b[:limit]):
        if x != y:
            break
        n += 1
    return n


def _finish(prompt: list[int], st: dict[str, Any], greedy: bool) -> Sample:
    if greedy:
        return Sample(prompt=list(prompt), answer=st["answer"])
    return Sample(prompt=list(prompt), answer=st["answer"], topk_ids=np.stack(st["ids"]),
                  topk_logp=np.stack(st["logp"]), turn=st["turn"])


# ---- cache files ---------------------------------------------------------------------------------

def save_set(path: Path, cs: CalibrationSet) -> None:
    def pack(samples: list[Sample], prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}_prompt": np.concatenate([np.asarray(s.prompt, np.int32) for s in samples]),
                f"{prefix}_prompt_len": np.asarray([len(s.prompt) for s in samples], np.int32),
                f"{prefix}_answer": np.concatenate([np.asarray(s.answer, np.int32) for s in samples]),
                f"{prefix}_answer_len": np.asarray([len(s.answer) for s in samples], np.int32)}

    arrays = {**pack(cs.train, "train"), **pack(cs.heldout, "heldout"),
              "train_topk_ids": np.concatenate([s.topk_ids for s in cs.train]),
              "train_topk_logp": np.concatenate([s.topk_logp for s in cs.train]),
              "train_turn": np.asarray([s.turn for s in cs.train], np.int8),
              "meta": np.frombuffer(json.dumps({"key": cs.key, "info": cs.info}).encode(), np.uint8)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load_set(path: Path, key: str) -> CalibrationSet:
    with np.load(path) as z:
        meta = json.loads(z["meta"].tobytes().decode())
        if meta["key"] != key:
            raise ValueError("key mismatch")

        def unpack(prefix: str, with_topk: bool) -> list[Sample]:
            pl, al = z[f"{prefix}_prompt_len"], z[f"{prefix}_answer_len"]
            po, ao = np.concatenate([[0], np.cumsum(pl)]), np.concatenate([[0], np.cumsum(al)])
            prompt, answer = z[f"{prefix}_prompt"], z[f"{prefix}_answer"]
            ids = z["train_topk_ids"] if with_topk else None
            logp = z["train_topk_logp"] if with_topk else None
            turn = z["train_turn"] if with_topk else np.zeros(len(pl), np.int8)
            return [Sample(prompt=prompt[po[i]:po[i + 1]].tolist(), answer=answer[ao[i]:ao[i + 1]].tolist(),
                           topk_ids=ids[ao[i]:ao[i + 1]] if with_topk else None,
                           topk_logp=logp[ao[i]:ao[i + 1]] if with_topk else None, turn=int(turn[i]))
                    for i in range(len(pl))]

        return CalibrationSet(train=unpack("train", True), heldout=unpack("heldout", False), key=key,
                              info=meta["info"])
