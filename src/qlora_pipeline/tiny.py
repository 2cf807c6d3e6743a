"""The built-in tiny Phi-3.5: a small ``Phi3ForCausalLM`` with the real Phi-3.5 tokenizer.

    python -m qlora_pipeline.tiny            # build (or find) the cached base; prints its folder

It stands in for ``microsoft/Phi-3.5-mini-instruct`` wherever the real one cannot be had (no
GPU, no hub): same architecture class, same tokenizer, chat template and special tokens,
sizes that llama.cpp's K-quants accept. It is a real, if small, base language model: the first
build pre-trains it on the bundled prose (``sample_data/base_corpus.txt``) so that fine-tuning
has something to build on and quality numbers mean something. The result is cached under a
hash of its recipe, so later runs reuse it.
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

RECIPE_VERSION = 1  # bump when the build below changes in a way the config does not show
END_TOKEN_IDS = (32000, 32001, 32007)  # <|endoftext|>, <|assistant|>, <|end|>: Phi-3.5's generation_config


def base_corpus_path() -> Path:
    return Path(str(resources.files("qlora_pipeline") / "sample_data" / "base_corpus.txt"))


def recipe_hash(cfg: TinyConfig) -> str:
    from qlora_pipeline.llamacpp import installed_version

    payload = {
        "config": dataclasses.asdict(cfg),
        "recipe_version": RECIPE_VERSION,
        "corpus_sha256": hashlib.sha256(base_corpus_path().read_bytes()).hexdigest(),
        "tokenizer_source": f"llama-cpp-python {installed_version()}",
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def tiny_base_dir(cfg: TinyConfig) -> Path:
    return cache_root() / "tiny" / f"phi35-tiny-{recipe_hash(cfg)}"


def tiny_phi3_config(cfg: TinyConfig):
    from transformers import Phi3Config

    return Phi3Config(
        vocab_size=32064,  # Phi-3.5's: 32,000 SentencePiece pieces + 64 added tokens
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        original_max_position_embeddings=cfg.max_position_embeddings,  # llama.cpp's converter needs it
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=32000,
        pad_token_id=0,  # <unk>, as the tokenizer: never EOS
        tie_word_embeddings=False,
        attention_dropout=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    )


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
        batch = torch.stack([data[s: s + cfg.pretrain_seq_len] for s in starts.tolist()])
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

    from qlora_pipeline.phi3_tokenizer import build_phi35_tokenizer

    started = time.time()
    tokenizer = build_phi35_tokenizer(out_dir)
    torch.manual_seed(cfg.seed)
    model = Phi3ForCausalLM(tiny_phi3_config(cfg))
    losses = _pretrain(model, tokenizer, cfg) if cfg.pretrain_steps else []
    model.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=list(END_TOKEN_IDS), pad_token_id=0, do_sample=False,
    )
    model.save_pretrained(out_dir)  # safetensors
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
    log(f"tiny base: {record['parameters'] / 1e6:.1f}M parameters, built in {record['build_seconds']} s"
        + (f", pre-training loss {record['pretrain_first_loss']:.2f} -> {loss:.2f}" if loss else ", untrained"))
    return final


if __name__ == "__main__":
    from qlora_pipeline.runtime import tune_allocator

    tune_allocator()
    print(ensure_tiny_base(TinyConfig()))
