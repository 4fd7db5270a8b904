"""How often the split model's greedy output equals the full model's, per edge quant type.

    python tools/bench_identical.py [--split 20] [--quants F32,Q8_0,Q4_0] [--tokens 48] [--json PATH]

What README's "identical" means, measured: spec and cloud mode reproduce the *exported split
model* (edge GGUF layers [0, K) + cloud shard layers [K, L)); they equal the full model only when
the edge's h_K does, i.e. for an unquantized edge. One invocation exports a bundle per quant type
(`--exit-adapter 0`: the adapter never touches h_K, so cloud mode is the same with it), lets the
full transformers model (fp32, its own KV cache) answer each held-out prompt greedily, and then
runs the split model teacher-forced on prompt + that answer: llama.cpp on the edge GGUF through
the edge runtime's h_K tap, h_K through the wire codec (`--codec`, the edge's default fp16), the
deep layers of the cloud shard. Greedy decoding of the split model follows the full model's
answer exactly up to the first position where the teacher-forced argmax differs, so per prompt:
`identical` (no position differs), `prefix` (share of the answer before the first difference,
what bench_collab calls agreement) and `token_agreement` (all positions). One caveat, stated
in the output: the daemon decodes h_K one token at a time where this prefills it in one batch;
llama.cpp's batched and single-row kernels may round differently.

Prompts: the diverse hand-written held-out set (quantize/data/heldout_diverse.jsonl) when it is
there, else the prompts below, which are not drawn from the export's calibration templates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FALLBACK_PROMPTS = [
    "How do I change a flat tyre on a bicycle?", "Write a Python function that reverses a linked list.",
    "Translate 'the library opens at nine' into French.", "If a train leaves at 3:40 and the trip takes "
    "85 minutes, when does it arrive?", "Give me a recipe for a quick tomato soup.",
    "Rewrite this more politely: send me the report now.", "Explain what a hash table is.",
    "Write a four-line poem about autumn rain.", "List five things to pack for a day hike.",
    "Why do cats purr?", "What is the difference between weather and climate?",
    "Summarise the plot of Romeo and Juliet in two sentences.", "How many minutes are in a week? Show the steps.",
    "Suggest three names for a coffee shop by the sea.", "What does HTTP status 404 mean?",
    "How can I improve my sleep?", "Explain recursion to a ten-year-old.",
    "Write a short thank-you note to a neighbour who watered my plants.",
    "What are the main causes of inflation?", "Convert 72 degrees Fahrenheit to Celsius, step by step.",
]
DIVERSE = REPO / "quantize" / "data" / "heldout_diverse.jsonl"


def held_out_messages(limit: int) -> list[list[dict[str, str]]]:
    """Chat message lists: the diverse held-out set if present (its `messages` or `prompt`)."""
    out: list[list[dict[str, str]]] = []
    if DIVERSE.exists():
        for line in DIVERSE.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                msgs = row.get("messages") or [{"role": "user", "content": row.get("prompt") or row["text"]}]
                out.append(msgs)
    else:
        out = [[{"role": "user", "content": p}] for p in FALLBACK_PROMPTS]
    return out[:limit]


def export(split: int, quant: str, out: Path) -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "fogline.cli", "export", "--source", "demo", "--split", str(split),
                    "--quant", quant, "--exit-adapter", "0", "--out", str(out), "--force"],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


def full_answers(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """The full model's greedy answer to each prompt (EOS ignored), with its own KV cache."""
    import torch

    answers = []
    with torch.inference_mode():
        for ids in prompts:
            out = model(torch.tensor([ids]), use_cache=True)
            toks = [int(out.logits[0, -1].argmax())]
            for _ in range(n - 1):
                out = model(torch.tensor([[toks[-1]]]), past_key_values=out.past_key_values, use_cache=True)
                toks.append(int(out.logits[0, -1].argmax()))
            answers.append(toks)
    return answers


def split_argmax(bundle: Path, split: int, seqs: list[list[int]], codec: str) -> list[list[int]]:
    """Teacher-forced next-token argmax of the split model at every position of each sequence."""
    import torch
    from safetensors.torch import load_file

    from cloud_runtime.deep_model import Segment, load_deep_model
    from fogline.arch import ArchSpec
    from fogline.wire.codecs import decode_hidden, encode_hidden
    from quantize.verify import edge_hidden

    cloud = bundle / "cloud"
    spec = ArchSpec.from_hf_config(json.loads((cloud / "config.json").read_text()))
    shard = next(cloud.glob("*.safetensors"))
    deep = load_deep_model(spec, split, load_file(str(shard)))
    out = []
    with torch.inference_mode():
        for ids in seqs:
            h = decode_hidden(encode_hidden(edge_hidden(bundle / "edge" / "edge.gguf", split, ids, threads=2), codec))
            normed = deep.forward_ragged([Segment(hidden=torch.from_numpy(h.astype("float32")),
                                                  cache=deep.new_cache(), start=0)])
            out.append([int(t) for t in deep.logits(normed).argmax(-1)])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", type=int, default=20)
    ap.add_argument("--quants", default="F32,Q8_0,Q4_0")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--codec", default="fp16", choices=("fp16", "fp32", "int8"))
    ap.add_argument("--work", default=None, help="where the bundles go (default: a temporary dir)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from quantize.source import load_source
    from quantize.verify import build_reference_model

    torch.set_num_threads(2)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_identical_"))
    work.mkdir(parents=True, exist_ok=True)
    quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    secs = {q: export(args.split, q, work / q) for q in quants}
    tok = AutoTokenizer.from_pretrained(str(work / quants[0] / "cloud"))
    prompts = [list(tok(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
                        add_special_tokens=False).input_ids) for m in held_out_messages(args.prompts)]
    src = load_source("demo")
    answers = full_answers(build_reference_model(src), prompts, args.tokens)
    rows = []
    for q in quants:
        preds = split_argmax(work / q, args.split, [p + a[:-1] for p, a in zip(prompts, answers)], args.codec)
        identical, prefix, agree = 0, [], []
        for p, a, pr in zip(prompts, answers, preds):
            got = pr[len(p) - 1:]  # argmax at the last prompt position predicts answer[0]
            same = [int(x == y) for x, y in zip(got, a)]
            first = same.index(0) if 0 in same else len(same)
            identical += int(first == len(a))
            prefix.append(first / len(a))
            agree.append(sum(same) / len(a))
        rows.append({"quant": q, "prompts": len(prompts), "identical": identical,
                     "prefix_agreement": statistics.mean(prefix), "token_agreement": statistics.mean(agree),
                     "export_s": round(secs[q], 1)})
    print(f"split model vs the full model, greedy, K={args.split}, {len(prompts)} held-out prompts × "
          f"{args.tokens} tokens, h_K codec {args.codec} (teacher-forced on the full model's answer; "
          "the daemon decodes h_K one token at a time, which llama.cpp may round differently)")
    print(f"{'edge quant':<10} {'identical':>10} {'prefix agreement':>17} {'token agreement':>16}")
    for r in rows:
        print(f"{r['quant']:<10} {r['identical']:>5}/{r['prompts']:<4} {r['prefix_agreement']:>17.3f} "
              f"{r['token_agreement']:>16.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"split": args.split, "tokens": args.tokens, "codec": args.codec,
                                               "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
