"""A random-weight Phi3ForCausalLM with Phi-3.5-mini's exact shape, written shard by shard.

    .venv/bin/python bench/fullsize_model.py OUT_DIR

32 layers, hidden 3072, FFN 8192, 32 heads (32 KV heads), vocab 32064: 3.82B parameters,
7.6 GB in bf16. Tensor names and shapes come from transformers' own Phi3ForCausalLM built on
the meta device (no memory); each tensor is drawn (normal, std 0.02) only when its shard is
written, so at most one shard (<= 2 GB) is ever in memory. The tokenizer is the real Phi-3.5
one (``phi3_tokenizer``). Quality numbers on it mean nothing; sizes, times and memory are real.
The config is the published one (``tiny.reference_phi3_config``): LongRoPE with the real 48
short and 48 long factors, 131,072 positions (4,096 original), the sliding window, pad/BOS/EOS,
and the hub's generation config.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SHARD_BYTES = 2 * 10**9


def phi35_mini_config():
    from qlora_pipeline.tiny import reference_phi3_config

    return reference_phi3_config()  # the published sizes: nothing changed


def build(out: Path) -> dict:
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import GenerationConfig, Phi3ForCausalLM

    from qlora_pipeline.paths import atomic_dir
    from qlora_pipeline.phi3_tokenizer import build_phi35_tokenizer, phi35_reference

    config = phi35_mini_config()
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in Phi3ForCausalLM(config).state_dict().items()}
    total = sum(torch.Size(s).numel() for s in shapes.values())
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    with atomic_dir(out) as tmp:
        for i, names in enumerate(tqdm(shards, desc="shards", unit="shard")):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name in names:
                if name.endswith("norm.weight"):
                    tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
                else:
                    tensors[name] = (torch.randn(shapes[name], generator=generator) * 0.02).to(torch.bfloat16)
                weight_map[name] = file
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            del tensors
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total * 2}, "weight_map": weight_map}, indent=1)
        )
        config.save_pretrained(tmp)
        GenerationConfig(**phi35_reference()["generation_config"]).save_pretrained(tmp)
        build_phi35_tokenizer(tmp)
    return {"parameters": total, "shards": len(shards), "bytes": total * 2}


if __name__ == "__main__":
    print(json.dumps(build(Path(sys.argv[1]))))
