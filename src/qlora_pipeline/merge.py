"""The ``merge`` stage: fold the LoRA adapter into a full-precision copy of the base.

    qlora-pipeline merge --run-dir runs/demo

The adapter was trained against the 4-bit base, but it is merged into the 16/32-bit base:
merging into NF4 layers would re-quantize W + (alpha/r)·B·A and throw away most of the update.
After merging we check that the merged model computes what base + adapter computed
(``RUN/merge_check.json``) and save a plain transformers model to ``RUN/merged/``, with the
tokenizer files llama.cpp's converter needs (``tokenizer.model`` included).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from qlora_pipeline.base import base_bytes_guess, local_base_dir
from qlora_pipeline.config import PipelineConfig
from qlora_pipeline.errors import ModelError
from qlora_pipeline.layout import RunLayout
from qlora_pipeline.model import check_adapter_files, compare_logits, load_adapter, merge_dtype, model_logits
from qlora_pipeline.paths import atomic_dir, write_json_atomic


def copy_sentencepiece_model(base: str, dest: Path, revision: str | None = None) -> bool:
    """Put the base's ``tokenizer.model`` beside the merged weights (llama.cpp's Phi-3 converter reads it)."""
    local = Path(base) / "tokenizer.model"
    if local.is_file():
        shutil.copy2(local, dest / "tokenizer.model")
        return True
    try:
        from transformers.utils import cached_file

        found = cached_file(base, "tokenizer.model", revision=revision, _raise_exceptions_for_missing_entries=False)
    except OSError:
        found = None
    if found:
        shutil.copy2(found, dest / "tokenizer.model")
        return True
    return False


def merge(cfg: PipelineConfig, run_dir: Path, log=print) -> dict:
    """Merge RUN/adapter (RUN/adapter-dpo when the prefer stage left one) into the full-precision
    base; write RUN/merged and RUN/merge_check.json (which names the adapter merged)."""
    from qlora_pipeline.base import resolve_base
    from qlora_pipeline.chat_format import ChatEncoder
    from qlora_pipeline.data import read_split, tokenize_conversations
    from qlora_pipeline.model import load_base_full_precision, load_tokenizer

    run_dir = Path(run_dir)
    adapter_dir = RunLayout(run_dir).adapter_for(cfg.prefer.enabled)
    check_adapter_files(adapter_dir)  # before a base of gigabytes is loaded
    base = resolve_base(cfg, log=log)
    dtype = merge_dtype(cfg, base)
    tokenizer = load_tokenizer(base, cfg.model.revision)
    encoder = ChatEncoder.from_hf(tokenizer)
    check_examples, _ = tokenize_conversations(
        encoder, read_split(run_dir, "val")[: cfg.merge.check_samples], cfg.data.max_seq_len, cfg.data.overlong
    )

    device = merge_device(cfg, base, log)
    if use_streaming(cfg, base, log, device):
        return _merge_streaming(cfg, run_dir, adapter_dir, base, dtype, tokenizer, check_examples, log)
    model = load_base_full_precision(base, cfg.model, dtype=dtype, device=device)
    with_adapter = load_adapter(model, adapter_dir)
    # Reference logits of base + adapter, taken before merge_and_unload folds the weights in place
    # (keeping logits, not a second model, keeps memory at one model for Phi-3.5 too).
    reference = model_logits(with_adapter, check_examples, device=device)
    merged = with_adapter.merge_and_unload()
    check = compare_logits(reference, model_logits(merged, check_examples, device=device))
    del reference
    _report_check(check, dtype, len(check_examples), log, device=device, adapter=adapter_dir.name)

    with atomic_dir(RunLayout(run_dir).merged) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if not copy_sentencepiece_model(base, tmp, cfg.model.revision):
            raise ModelError(f"the base {base!r} has no tokenizer.model; llama.cpp's Phi-3 converter needs it")
    write_json_atomic(RunLayout(run_dir).merge_check, check)
    return check


def _report_check(check: dict, dtype, samples: int, log, **extra) -> None:
    """Complete the merge check's record and log it (both merge paths)."""
    check.update({"dtype": str(dtype).replace("torch.", ""), "samples": samples, **extra})
    log(
        f"merge check: max |logit diff| {check.get('max_abs_logit_diff', float('nan')):.2e}, "
        f"argmax agreement {100 * check.get('argmax_agreement', 0):.2f}% on {check.get('tokens', 0)} tokens"
    )


def merge_device(cfg: PipelineConfig, base: str, log=print) -> str:
    """The GPU when the base fits in its free memory with a quarter to spare (a T4 holds the 7.6 GB
    Phi-3.5 in fp16: the merge and its check take seconds there), else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    free, _total = torch.cuda.mem_get_info()
    size = base_bytes_guess(base, cfg.model.revision)
    if size * 1.25 > free:
        log(f"merging on the CPU: the base ({size / 1e9:.1f} GB) does not fit the GPU's free {free / 1e9:.1f} GB")
        return "cpu"
    return "cuda"


def use_streaming(cfg: PipelineConfig, base: str, log=print, device: str = "cpu") -> bool:
    """Shard by shard when a CPU merge would hold a base larger than half the free RAM."""
    if cfg.merge.streaming != "auto":
        return bool(cfg.merge.streaming)
    if device != "cpu":
        return False  # the weights go to the GPU, not the RAM
    import psutil

    size = base_bytes_guess(base, cfg.model.revision)
    free = psutil.virtual_memory().available
    streaming = size > free / 2
    if streaming:
        log(
            f"streaming merge: the base ({size / 1e9:.1f} GB) is larger than half the free memory ({free / 1e9:.1f} GB)"
        )
    return streaming


def _merge_streaming(
    cfg: PipelineConfig, run_dir: Path, adapter_dir: Path, base: str, dtype, tokenizer, check_examples, log
) -> dict:
    """Shard-by-shard merge; the check then loads one model at a time (base + adapter, then merged)."""
    from qlora_pipeline.merge_streaming import stream_merge
    from qlora_pipeline.model import free_memory, load_base_full_precision

    base_dir = local_base_dir(base, cfg.model.revision)
    with atomic_dir(RunLayout(run_dir).merged) as tmp:
        info = stream_merge(base_dir, adapter_dir, tmp, dtype=dtype, log=log)
        tokenizer.save_pretrained(tmp)
        if not copy_sentencepiece_model(str(base_dir), tmp, cfg.model.revision):
            raise ModelError(f"the base {base!r} has no tokenizer.model; llama.cpp's Phi-3 converter needs it")
        reference = model_logits(
            load_adapter(load_base_full_precision(base, cfg.model, dtype=dtype), adapter_dir),
            check_examples,
        )
        free_memory()  # base + adapter is gone before the merged model loads: one model in RAM at a time
        merged = load_base_full_precision(str(tmp), cfg.model, dtype=dtype)
        check = compare_logits(reference, model_logits(merged, check_examples))
        del merged, reference
        free_memory()
    _report_check(check, dtype, len(check_examples), log, streaming=True, adapter=adapter_dir.name, **info)
    write_json_atomic(RunLayout(run_dir).merge_check, check)
    return check


def run(cfg: PipelineConfig, run_dir: Path, *, log=print, resume: bool = False) -> dict:
    """The stage interface (``pipeline.Stage``): merge has nothing to resume."""
    return merge(cfg, run_dir, log=log)
