"""GGUF logits against transformers in fp32: at the serving context and past LongRoPE's original one."""

from __future__ import annotations

from pathlib import Path

from qlora_pipeline.config import PipelineConfig
from qlora_pipeline.errors import ConfigError
from qlora_pipeline.evaluation.report import parity_line
from qlora_pipeline.evaluation.scoring import llama_logits, take_examples
from qlora_pipeline.layout import RunLayout
from qlora_pipeline.runtime import usable_cpus

# Relative parity bounds: max |logit difference| / max |reference logit| (and top-1 agreement).
# F32 checks the converter and runtime alone; F16 adds the rounding of the stored weights.
PARITY_BOUNDS = {"F32": 1e-3, "F16": 3e-3}


def compare_gguf_logits(
    path: Path, sequences: list[list[int]], references: list, n_ctx: int, threads: int, lora: Path | None = None
) -> dict:
    """Logits of a GGUF (F32 KV cache; with the LoRA GGUF ``lora`` applied) against reference
    logits for the same ids."""
    import numpy as np

    from qlora_pipeline.serve.chat import LlamaChat

    max_abs, max_ref, agree, total, widest_flip = 0.0, 0.0, 0, 0, 0.0
    opened = LlamaChat(path, n_ctx=n_ctx, n_threads=threads, logits_all=True, f32_kv_cache=True, lora_path=lora)
    with opened as chat:
        for ids, ref in zip(sequences, references):
            got = llama_logits(chat.llm, ids)
            ref = ref[0].numpy() if hasattr(ref, "numpy") else ref
            max_abs = max(max_abs, float(np.abs(got - ref).max()))
            max_ref = max(max_ref, float(np.abs(ref).max()))
            same = got.argmax(-1) == ref.argmax(-1)
            agree += int(same.sum())
            total += len(ids)
            if not same.all():  # how close the reference's first two choices were where they flipped
                top2 = np.sort(ref[~same], axis=-1)[:, -2:]
                widest_flip = max(widest_flip, float((top2[:, 1] - top2[:, 0]).max()))
    return {
        "n_ctx": n_ctx,
        "tokens": total,
        "max_abs_logit_diff": max_abs,
        "max_abs_logit": max_ref,
        "relative_diff": max_abs / max(max_ref, 1e-30),
        "top1": agree / max(1, total),
        "top1_flips": total - agree,
        "widest_flipped_margin": widest_flip,
    }


def long_parity_ids(examples: list[dict], length: int) -> list[int]:
    """One sequence of ``length`` ids: the test conversations one after another, from the start
    again if they are shorter (past the original context, both runtimes use the long factors)."""
    if not examples:
        raise ConfigError(
            "the test split is empty, so there is nothing to compare past the original context; "
            "set eval.long_parity_tokens=0"
        )
    ids: list[int] = []
    while len(ids) < length:
        for ex in examples:
            ids += ex["input_ids"]
    return ids[:length]


def _hf_reference(run_dir: Path, cfg: PipelineConfig, sequences: list[list[int]], round_to_fp16: bool) -> list:
    """Logits of the merged model computed in fp32 (matrices optionally rounded to fp16, as the
    F16 file stores them), on the GPU when there is one. The model stays at its saved 16 bits and
    is widened a layer at a time, so no fp32 copy of a full-size model is ever made."""
    import torch

    from qlora_pipeline.evaluation.fp32_reference import layerwise_fp32
    from qlora_pipeline.model import free_memory, load_base_full_precision, model_logits

    device = "cuda" if torch.cuda.is_available() else "cpu"
    merged = load_base_full_precision(str(RunLayout(run_dir).merged), cfg.model, device=device)
    with layerwise_fp32(merged, round_to_fp16):
        logits = model_logits(merged, [{"input_ids": ids} for ids in sequences], device=device)
    del merged
    free_memory()
    return logits


def measure_parity(cfg: PipelineConfig, run_dir: Path, examples: list[dict], log=print) -> dict:
    """F16 (and, with eval.f32_parity, a temporary F32) GGUF against transformers, on test
    conversations at the serving context and on one sequence longer than the original context
    at a context above it. The reference is fp32 even when the merged model is saved in 16 bits."""
    from qlora_pipeline.gguf.convert import convert_to_gguf, default_model_name, end_of_turn_id
    from qlora_pipeline.gguf.variants import F16, gguf_path
    from qlora_pipeline.serve.chat import LlamaChat, original_context_length

    ecfg = cfg.eval
    run_dir = Path(run_dir)
    cases = {"short": ([ex["input_ids"] for ex in take_examples(examples, ecfg.parity_tokens)], ecfg.n_ctx)}
    if ecfg.long_parity_tokens:
        with LlamaChat(gguf_path(run_dir, F16), n_ctx=64) as probe:
            original = original_context_length(probe.llm.metadata)
        if original is None or ecfg.long_parity_tokens <= original:
            raise ConfigError(
                f"eval.long_parity_tokens={ecfg.long_parity_tokens} must exceed the GGUF's original "
                f"context ({original}); raise it or set it to 0"
            )
        cases["long"] = ([long_parity_ids(examples, ecfg.long_parity_tokens)], 2 * original)
    files = {"F16": (gguf_path(run_dir, F16), True)}
    f32_path = RunLayout(run_dir).gguf_dir / ".parity-F32.gguf"
    if ecfg.f32_parity:
        merged = RunLayout(run_dir).merged
        name = cfg.export.model_name or default_model_name(cfg)
        convert_to_gguf(merged, f32_path, name, end_of_turn_id(merged), "f32")
        files["F32"] = (f32_path, False)
    parity: dict = {"bounds": {"relative": PARITY_BOUNDS, "min_top1": PARITY_MIN_TOP1}}
    try:
        for file_type, (path, rounded) in files.items():
            # One load of the reference model per file type, for every case: transformers picks the
            # long factors by sequence length, llama.cpp by n_ctx.
            every = [ids for sequences, _ in cases.values() for ids in sequences]
            logits = iter(_hf_reference(run_dir, cfg, every, round_to_fp16=rounded))
            for case, (sequences, n_ctx) in cases.items():
                references = [next(logits) for _ in sequences]
                # On the CPU always: llama.cpp's CPU kernels are the reference implementation and
                # what the Space runs; a GPU build's fp16 accumulation would blur the bound.
                result = compare_gguf_logits(path, sequences, references, n_ctx, ecfg.threads or usable_cpus())
                result["passes"] = (
                    result["relative_diff"] <= PARITY_BOUNDS[file_type] and result["top1"] >= PARITY_MIN_TOP1
                )
                # Near-ties: a flip where the reference's two best logits are closer than the largest
                # difference measured is rounding, not a wrong computation.
                result["flips_within_error"] = result["widest_flipped_margin"] <= result["max_abs_logit_diff"]
                parity[f"{file_type.lower()}_{case}"] = result
                log(parity_line(f"{file_type.lower()}_{case}", result))
    finally:
        f32_path.unlink(missing_ok=True)
    return parity


PARITY_MIN_TOP1 = 0.999
