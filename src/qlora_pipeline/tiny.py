"""The built-in tiny Phi-3.5: a scaled-down twin of ``microsoft/Phi-3.5-mini-instruct``.

    python -m qlora_pipeline.tiny            # build (or find) the cached base; prints its folder

It stands in for the real model wherever that cannot be had (no GPU, no hub), and differs from
it only in size. Every other field of the published ``config.json`` is kept (LongRoPE with the
real short and long factors, resampled to the twin's head size; 131,072 positions, 4,096
original; the sliding window; pad, BOS and EOS ids; bf16), the weights are bf16 safetensors in
two shards with an index, ``generation_config.json`` is the hub's, and the tokenizer files are
in the hub's format and class (see ``phi3_tokenizer``), so ``from_pretrained`` takes the same
code path as for the real repository. Sizes are multiples of 256 so llama.cpp's K-quants apply.

It is a real, if small, base language model: the first build pre-trains it on the bundled
prose (``sample_data/base_corpus.txt``) so that fine-tuning has something to build on and
quality numbers mean something. The result is cached under a hash of its recipe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from importlib import resources
from pathlib import Path

from qlora_pipeline.config import TinyConfig
from qlora_pipeline.paths import atomic_dir, cache_root, write_json_atomic

RECIPE_VERSION = 2  # bump when the build below changes in a way the config does not show
# Shards: the hub's Phi-3.5 comes as two; the twin's bf16 weights are ~40 MB.
TWIN_SHARD_SIZE = "25MB"


def base_corpus_path() -> Path:
    return Path(str(resources.files("qlora_pipeline") / "sample_data" / "base_corpus.txt"))


def recipe_hash(cfg: TinyConfig) -> str:
    from qlora_pipeline.gguf.llamacpp import installed_version

    payload = {
        "config": dataclasses.asdict(cfg),
        "recipe_version": RECIPE_VERSION,
        "corpus_sha256": hashlib.sha256(base_corpus_path().read_bytes()).hexdigest(),
        "tokenizer_source": f"llama-cpp-python {installed_version()}",
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def tiny_base_dir(cfg: TinyConfig) -> Path:
    return cache_root() / "tiny" / f"phi35-tiny-{recipe_hash(cfg)}"


def resample_factors(factors: list[float], size: int) -> list[float]:
    """LongRoPE factors for another head size: the curve of ``factors`` (one per rotary
    frequency pair) sampled at ``size`` evenly spaced points, first and last values kept."""
    import numpy as np

    source = np.linspace(0.0, 1.0, len(factors))
    return [float(v) for v in np.interp(np.linspace(0.0, 1.0, size), source, np.asarray(factors, dtype=np.float64))]


def reference_config_dict(**sizes) -> dict:
    """Phi-3.5-mini-instruct's published config.json, with ``sizes`` (hidden_size,
    intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads) changed and
    the LongRoPE factors resampled to the new head size."""
    from qlora_pipeline.phi3_tokenizer import phi35_reference

    config = dict(phi35_reference()["config"])
    config.update(sizes)
    rope = dict(config["rope_scaling"])
    pairs = config["hidden_size"] // config["num_attention_heads"] // 2
    for key in ("short_factor", "long_factor"):
        if len(rope[key]) != pairs:
            rope[key] = resample_factors(rope[key], pairs)
    config["rope_scaling"] = rope
    return config


def reference_phi3_config(**sizes):
    """A transformers ``Phi3Config`` of :func:`reference_config_dict`, bf16 as the hub's."""
    from transformers import Phi3Config

    values = reference_config_dict(**sizes)
    for key in ("architectures", "model_type", "torch_dtype"):
        values.pop(key, None)
    config = Phi3Config(**values, dtype="bfloat16")
    config.architectures = ["Phi3ForCausalLM"]  # llama.cpp's converter picks its model class by it
    return config


def twin_sizes(cfg: TinyConfig) -> dict:
    """The only config.json fields in which the twin differs from Phi-3.5-mini."""
    return {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
    }


def tiny_phi3_config(cfg: TinyConfig):
    """The twin's config: the real one at the sizes of ``cfg``."""
    return reference_phi3_config(**twin_sizes(cfg))


def _pretrain(model, tokenizer, cfg: TinyConfig) -> list[float]:
    """Plain next-token pre-training on the packed prose; returns the loss curve."""
    import torch
    from tqdm.auto import tqdm

    lines = [line.strip() for line in base_corpus_path().read_text(encoding="utf-8").splitlines() if line.strip()]
    stream: list[int] = []
    for line in lines:
        stream += tokenizer(line)["input_ids"] + [tokenizer.eos_token_id]
    data = torch.tensor(stream, dtype=torch.long)
    n_windows = len(data) - cfg.pretrain_seq_len - 1
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, cfg.pretrain_steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, cfg.pretrain_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    losses = []
    bar = tqdm(range(cfg.pretrain_steps), desc="pre-training tiny base", unit="step")
    for _ in bar:
        starts = torch.randint(0, n_windows, (cfg.pretrain_batch_size,), generator=generator)
        batch = torch.stack([data[s : s + cfg.pretrain_seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def build_tiny_base(cfg: TinyConfig, out_dir: Path) -> dict:
    """Build the tiny base into ``out_dir`` (tokenizer, weights, configs); return its recipe record."""
    import torch
    from transformers import GenerationConfig, Phi3ForCausalLM

    from qlora_pipeline.phi3_tokenizer import build_phi35_tokenizer, phi35_reference

    started = time.time()
    tokenizer = build_phi35_tokenizer(out_dir)
    torch.manual_seed(cfg.seed)
    model = Phi3ForCausalLM(tiny_phi3_config(cfg)).float()  # pre-trained in fp32, stored in bf16 as the hub's
    losses = _pretrain(model, tokenizer, cfg) if cfg.pretrain_steps else []
    model.generation_config = GenerationConfig(**phi35_reference()["generation_config"])
    model.to(torch.bfloat16).save_pretrained(out_dir, max_shard_size=TWIN_SHARD_SIZE)  # safetensors
    # config.json as the hub publishes it (``rope_scaling``, ``torch_dtype``), not as transformers 5
    # re-saves it (``rope_parameters``), so loading it takes the path the real file takes.
    write_json_atomic(out_dir / "config.json", reference_config_dict(**twin_sizes(cfg)))
    record = {
        "recipe": dataclasses.asdict(cfg),
        "recipe_hash": recipe_hash(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "pretrain_first_loss": losses[0] if losses else None,
        "pretrain_last_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "pretrain_losses": losses,
        "build_seconds": round(time.time() - started, 1),
    }
    write_json_atomic(out_dir / "tiny_recipe.json", record)
    return record


def ensure_tiny_base(cfg: TinyConfig, log=print) -> Path:
    """The cached tiny base for this recipe, built on first use."""
    final = tiny_base_dir(cfg)
    if (final / "tiny_recipe.json").is_file():
        return final
    log(f"building the tiny Phi-3.5 base (first run only; cached in {final})")
    with atomic_dir(final) as tmp:
        record = build_tiny_base(cfg, tmp)
    loss = record["pretrain_last_loss"]
    log(
        f"tiny base: {record['parameters'] / 1e6:.1f}M parameters, built in {record['build_seconds']} s"
        + (f", pre-training loss {record['pretrain_first_loss']:.2f} -> {loss:.2f}" if loss else ", untrained")
    )
    return final


if __name__ == "__main__":
    from qlora_pipeline.runtime import tune_allocator

    tune_allocator()
    print(ensure_tiny_base(TinyConfig()))
