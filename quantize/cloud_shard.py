"""Write the cloud half: layers [K, L), final norm and LM head as safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quantize.source import SourceModel, copy_tokenizer_files

SHARD_FILE = "deep.safetensors"


def cloud_tensors(src: SourceModel, split: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in src.state.items():
        if name.startswith("model.layers."):
            if int(name.split(".")[2]) >= split:
                out[name] = t
        elif name == "model.norm.weight":
            out[name] = t
    out["lm_head.weight"] = src.lm_head()
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def write_cloud_shard(src: SourceModel, split: int, out_dir: Path,
                      dtype: torch.dtype = torch.float32) -> list[str]:
    from safetensors.torch import save_file

    save_file(cloud_tensors(src, split, dtype), str(out_dir / SHARD_FILE),
              metadata={"fogline.split": str(split)})
    (out_dir / "config.json").write_text(json.dumps(src.config, indent=2, sort_keys=True, default=str))
    return [SHARD_FILE, "config.json", *copy_tokenizer_files(src.tokenizer_dir, out_dir)]
