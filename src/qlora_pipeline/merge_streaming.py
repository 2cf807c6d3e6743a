"""Merge a LoRA adapter into a base checkpoint one shard at a time, never holding the whole model.

peft's ``merge_and_unload`` needs the whole base in memory (7.6 GB in bf16 for Phi-3.5-mini,
plus what loading costs), which is what kills the usual recipe on Colab's free tier. The update
itself is simple: each adapted weight W becomes W + s·B·A with s = alpha/r (alpha/√r with
rsLoRA). peft has no shard-wise merge, so this module does that arithmetic by hand: read one
safetensors shard, add the update to the adapted weights (computed in fp32, stored in the
shard's dtype), write the shard, free it. Peak memory is one shard plus one fp32 weight.
A test checks the result equals peft's ``merge_and_unload`` on the tiny model.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from qlora_pipeline.errors import ModelError

CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "chat_template.jinja", "added_tokens.json")


def read_adapter(adapter_dir: Path) -> tuple[dict, dict]:
    """The adapter's config and its LoRA pairs keyed by the base weight's name: {name: (A, B)}."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("use_dora"):
        raise ModelError(f"{adapter_dir} is a DoRA adapter; the streaming merge handles plain LoRA only "
                         "(set merge.streaming=false)")
    if config.get("fan_in_fan_out"):
        raise ModelError(f"{adapter_dir} uses fan_in_fan_out (Conv1D layers); set merge.streaming=false")
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs: dict[str, dict] = {}
    for key, tensor in tensors.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if key.endswith(marker):
                base_name = key[: -len(marker)].removeprefix("base_model.model.") + ".weight"
                pairs.setdefault(base_name, {})[part] = tensor
                break
        else:
            raise ModelError(f"{adapter_dir} holds {key!r}, which is not a LoRA A/B matrix (modules_to_save?); "
                             "set merge.streaming=false to merge it with peft")
    incomplete = [name for name, pair in pairs.items() if len(pair) != 2]
    if incomplete:
        raise ModelError(f"{adapter_dir} lacks A or B for {incomplete[0]}; the adapter file is damaged")
    return config, {name: (pair["lora_A"], pair["lora_B"]) for name, pair in pairs.items()}


def lora_scale(config: dict) -> float:
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def shard_files(base_dir: Path) -> list[str]:
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (base_dir / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise ModelError(f"{base_dir} has no safetensors weights (model.safetensors or an index); the streaming "
                     "merge reads safetensors checkpoints only")


def stream_merge(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype=None, log=print) -> dict:
    """Write base + adapter into ``out_dir``: the base's shards and names; its dtypes, or ``dtype``."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    config, pairs = read_adapter(adapter_dir)
    scale = lora_scale(config)
    files = shard_files(base_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged = 0
    for file in tqdm(files, desc="merging shards", unit="shard"):
        tensors = {}
        with safe_open(str(base_dir / file), framework="pt") as shard:
            metadata = shard.metadata()
            for name in shard.keys():
                weight = shard.get_tensor(name)
                if name in pairs:
                    lora_a, lora_b = pairs[name]
                    if (lora_b.shape[0], lora_a.shape[1]) != tuple(weight.shape):
                        raise ModelError(f"the adapter's {name} is {lora_b.shape[0]}x{lora_a.shape[1]} but the base's "
                                         f"is {tuple(weight.shape)}; merge with the base it was trained on")
                    delta = (lora_b.float() @ lora_a.float()) * scale
                    weight = (weight.float() + delta).to(dtype or weight.dtype)
                    del delta
                    merged += 1
                elif dtype is not None and weight.is_floating_point():
                    weight = weight.to(dtype)
                tensors[name] = weight
        save_file(tensors, str(out_dir / file), metadata=metadata or {"format": "pt"})
        del tensors
    if merged != len(pairs):
        raise ModelError(f"{len(pairs) - merged} adapted weights of {adapter_dir} are not in {base_dir}; "
                         "merge with the base it was trained on")
    if (base_dir / "model.safetensors.index.json").is_file():
        shutil.copy2(base_dir / "model.safetensors.index.json", out_dir / "model.safetensors.index.json")
    for name in CONFIG_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out_dir / name)
    if dtype is not None:  # the config says what the weights are stored in
        model_config = json.loads((out_dir / "config.json").read_text())
        model_config["dtype"] = str(dtype).replace("torch.", "")
        model_config.pop("torch_dtype", None)
        (out_dir / "config.json").write_text(json.dumps(model_config, indent=2))
    log(f"streaming merge: {merged} weights updated (scale {scale:g}) across {len(files)} shard(s)")
    return {"merged_weights": merged, "shards": len(files), "scale": scale}
