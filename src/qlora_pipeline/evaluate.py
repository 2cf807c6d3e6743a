"""The ``evaluate`` stage: what did fine-tuning buy, measured on held-out conversations.

    qlora-pipeline evaluate --run-dir runs/demo

For the base, base + adapter and merged model (all at full precision): the loss per assistant
token on the validation split and the perplexity on the test split, with the same masking as
training. Results go to ``RUN/report.json`` (section ``hf``) and ``RUN/report.md``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_pipeline.chat_format import ChatEncoder
from qlora_pipeline.config import PipelineConfig
from qlora_pipeline.errors import StageOrderError
from qlora_pipeline.evaluation.parity import PARITY_BOUNDS, PARITY_MIN_TOP1, compare_gguf_logits, measure_parity
from qlora_pipeline.evaluation.report import (
    heldout_section,
    loss_line,
    plot_scorecard,
    read_report,
    scorecard_table,
    update_report,
)
from qlora_pipeline.evaluation.routes import chat_prompt_routes, format_routes, stock_tokenizers
from qlora_pipeline.evaluation.scoring import (
    generation_speed,
    gguf_gpu_layers,
    gguf_quality,
    llama_logits,
    take_examples,
)
from qlora_pipeline.layout import RunLayout
from qlora_pipeline.paths import write_json_atomic
from qlora_pipeline.preference import read_preference
from qlora_pipeline.runtime import usable_cpus


def hf_splits(cfg: PipelineConfig, run_dir: Path, encoder) -> dict[str, list[dict]]:
    """Validation and test examples for transformers' scoring, each cut to eval.hf_max_tokens."""
    from qlora_pipeline.data import read_split, tokenize_conversations

    splits = {}
    for split in ("val", "test"):
        examples, _ = tokenize_conversations(
            encoder, read_split(run_dir, split), cfg.data.max_seq_len, cfg.data.overlong, split=split
        )
        splits[split] = take_examples(examples, cfg.eval.hf_max_tokens) if cfg.eval.hf_max_tokens else examples
    return splits


def evaluate_hf(cfg: PipelineConfig, run_dir: Path, log=print, with_merged: bool = True) -> dict:
    """Validation loss and test perplexity of base, base + adapter and (unless told not to) merged
    model, on the GPU when there is one, one model in memory at a time."""
    from qlora_pipeline.base import resolve_base
    from qlora_pipeline.batches import evaluate_loss
    from qlora_pipeline.evaluation.heldout import format_exact_match, hf_answerer, load_questions, score
    from qlora_pipeline.model import (
        eval_placement,
        free_memory,
        load_adapter,
        load_base_full_precision,
        load_tokenizer,
        merge_dtype,
    )

    run_dir = Path(run_dir)
    base = resolve_base(cfg, log=log)
    tokenizer = load_tokenizer(base, cfg.model.revision)
    encoder = ChatEncoder.from_hf(tokenizer)
    questions = load_questions(cfg.eval.heldout_questions)
    splits = hf_splits(cfg, run_dir, encoder)
    device, dtype = eval_placement(merge_dtype(cfg, base))
    tokens = sum(len(ex["input_ids"]) for examples in splits.values() for ex in examples)
    log(
        f"transformers evaluation on {device} in {str(dtype).replace('torch.', '')}: {tokens:,} tokens "
        f"(validation + test{', capped by eval.hf_max_tokens' if cfg.eval.hf_max_tokens else ''}) per model, "
        f"{2 + with_merged} models"
    )
    bt = cfg.train.batch_tokens
    heldout: dict = {}

    def measure(model, name: str) -> dict:
        losses = {
            split: evaluate_loss(model, examples, bt, device, desc=f"{name}: {split}") if examples else None
            for split, examples in splits.items()
        }
        if questions:
            heldout[name] = score(questions, hf_answerer(model, encoder, tokenizer, cfg.eval.heldout_max_tokens))
        test = losses["test"]
        return {f"{name}_val_loss": losses["val"], f"{name}_ppl": math.exp(test) if test is not None else None}

    results: dict = {}
    model = load_base_full_precision(base, cfg.model, dtype=dtype, device=device)
    results.update(measure(model, "base"))
    results.update(measure(load_adapter(model, RunLayout(run_dir).adapter_for(cfg.prefer.enabled)), "adapter"))
    del model
    free_memory()  # the base + adapter goes before the merged model comes: one model at a time
    if with_merged:
        merged = load_base_full_precision(str(RunLayout(run_dir).merged), cfg.model, dtype=dtype, device=device)
        results.update(measure(merged, "merged"))
        del merged
        free_memory()
    if results["base_val_loss"] and results["adapter_val_loss"] is not None:
        results["val_loss_reduction"] = 1 - results["adapter_val_loss"] / results["base_val_loss"]
    results["val_tokens_examples"] = len(splits["val"])
    results["test_examples"] = len(splits["test"])
    results["device"] = device
    if with_merged:
        update_report(run_dir, "hf", results)
        if questions:
            update_report(run_dir, "heldout", heldout_section(questions, heldout))
            log("held-out exact match: " + format_exact_match({n: r["exact_match"] for n, r in heldout.items()}))
    log(loss_line(results))
    return results


# ---------------------------------------------------------------------------- GGUF variants


@dataclass
class _GGUFRun:
    """What the GGUF evaluation reads: the variants, the test split and its tokens, llama.cpp settings."""

    cfg: PipelineConfig
    layout: RunLayout
    variants: list[str]
    tokenizer: Any
    encoder: Any
    test_convs: list[dict]
    examples: list[dict]
    threads: int
    gpu_layers: int


def _gguf_run(cfg: PipelineConfig, run_dir: Path) -> _GGUFRun:
    """Check every variant is there, then load the tokenizer and the test split's tokens."""
    from qlora_pipeline.data import read_split, tokenize_conversations
    from qlora_pipeline.gguf.variants import F16
    from qlora_pipeline.model import load_tokenizer

    layout, ecfg = RunLayout(run_dir), cfg.eval
    variants = [F16] + [q for q in cfg.export.quant_types if q != F16]
    for quant in variants:
        if not layout.gguf(quant).is_file():
            raise StageOrderError(
                f"{layout.gguf(quant)} is missing; run `qlora-pipeline export --run-dir {run_dir}` first"
            )
    tokenizer = load_tokenizer(str(layout.merged))
    encoder = ChatEncoder.from_hf(tokenizer)
    test_convs = read_split(run_dir, "test")
    max_len = min(cfg.data.max_seq_len, ecfg.n_ctx)
    examples, _ = tokenize_conversations(encoder, test_convs, max_len, cfg.data.overlong, split="test")
    return _GGUFRun(
        cfg,
        layout,
        variants,
        tokenizer,
        encoder,
        test_convs,
        examples,
        ecfg.threads or usable_cpus(),
        gguf_gpu_layers(ecfg.gguf_gpu_layers),
    )


def _parity_section(r: _GGUFRun, log) -> dict:
    """Logit parity with transformers, and the chat prompt ids of every route against llama.cpp's."""
    from qlora_pipeline.base import resolve_base
    from qlora_pipeline.gguf.variants import F16
    from qlora_pipeline.serve.chat import LlamaChat

    parity = measure_parity(r.cfg, r.layout.root, r.examples, log=log)
    with LlamaChat(r.layout.gguf(F16), n_ctx=r.cfg.eval.n_ctx, n_threads=r.threads) as f16_chat:
        prompts = [c["messages"][: max(1, len(c["messages"]) - 1)] for c in r.test_convs[:20]]
        stock = stock_tokenizers(resolve_base(r.cfg, log=log), r.cfg.model.revision)
        parity["chat_prompt_ids"] = chat_prompt_routes(stock, r.tokenizer, f16_chat, prompts)
    log("chat prompt ids vs llama.cpp's chat handler: " + format_routes(parity["chat_prompt_ids"]))
    return parity


def lora_parity(r: _GGUFRun, log) -> dict:
    """The LoRA GGUF applied to the base F16 GGUF against the merged F16 GGUF: the same logits
    (F16 bound), and how much smaller the adapter is than a model."""
    from qlora_pipeline.gguf.variants import F16
    from qlora_pipeline.serve.chat import LlamaChat

    merged = r.layout.gguf(F16)
    sequences = [ex["input_ids"] for ex in take_examples(r.examples, r.cfg.eval.parity_tokens)]
    n_ctx = max(64, max(len(ids) for ids in sequences))
    with LlamaChat(merged, n_ctx=n_ctx, n_threads=r.threads, logits_all=True, f32_kv_cache=True) as chat:
        references = [llama_logits(chat.llm, ids) for ids in sequences]
    result = compare_gguf_logits(r.layout.base_gguf, sequences, references, n_ctx, r.threads, lora=r.layout.lora_gguf)
    result["passes"] = result["relative_diff"] <= PARITY_BOUNDS[F16] and result["top1"] >= PARITY_MIN_TOP1
    result["adapter_bytes"] = r.layout.lora_gguf.stat().st_size
    result["merged_bytes"] = merged.stat().st_size
    log(
        f"LoRA GGUF: base F16 + {r.layout.lora_gguf.name} ({result['adapter_bytes'] / 1e6:.2f} MB, "
        f"{100 * result['adapter_bytes'] / result['merged_bytes']:.1f}% of the merged F16) vs the merged F16: "
        f"max |diff| {result['max_abs_logit_diff']:.2e} = {result['relative_diff']:.1e} of the largest logit "
        f"(bound {PARITY_BOUNDS[F16]:.0e}), top-1 {100 * result['top1']:.2f}%"
    )
    return result


def _scorecard(r: _GGUFRun) -> dict:
    """Per variant: size, bits per weight, perplexity, KL and top-1 against F16, and speed."""
    from gguf import GGUFReader
    from tqdm.auto import tqdm

    from qlora_pipeline.gguf.variants import F16

    ecfg = r.cfg.eval
    scored = take_examples(r.examples, ecfg.kld_max_tokens)
    n_params = sum(int(t.n_elements) for t in GGUFReader(str(r.layout.gguf(F16))).tensors)
    # The speed prompt: held-out user questions, joined until long enough, then cut to length.
    speed_text = " ".join(m["content"] for c in r.test_convs for m in c["messages"] if m["role"] == "user")
    speed_prompt = r.encoder.encode_prompt([{"role": "user", "content": speed_text}])[: ecfg.speed_prompt_tokens]
    gguf: dict = {}
    reference = None
    for quant in tqdm(r.variants, desc="scoring GGUF variants", unit="file"):
        path = r.layout.gguf(quant)
        quality, logprobs = gguf_quality(path, scored, ecfg.n_ctx, r.threads, reference, r.gpu_layers)
        if quant == F16:
            reference = logprobs
        speed = generation_speed(
            path, speed_prompt, ecfg.speed_new_tokens, ecfg.speed_runs, ecfg.n_ctx, r.threads, r.gpu_layers
        )
        size = path.stat().st_size
        gguf[quant] = {
            "path": r.layout.relative(path),
            "bytes": size,
            "bits_per_weight": 8 * size / n_params,
            "ppl": quality["ppl"],
            "kld_vs_f16": quality["kld_vs_f16"],
            "top1_vs_f16": quality["top1_vs_f16"],
            "tokens_per_s": speed["tokens_per_s"],
            "time_to_first_token_s": speed["time_to_first_token_s"],
            "scored_tokens": quality["tokens"],
        }
    return gguf


def _answers(r: _GGUFRun, log) -> list[dict]:
    """Greedy answers of every variant to the first test questions, and (with held-out
    questions configured) their exact-match scores, merged into the report's held-out section."""
    from qlora_pipeline.evaluation.heldout import format_exact_match, load_questions, score
    from qlora_pipeline.serve.chat import LlamaChat, SamplingParams

    ecfg = r.cfg.eval
    greedy = SamplingParams(temperature=0.0, top_p=1.0, top_k=1, repeat_penalty=1.0, max_tokens=ecfg.sample_max_tokens)
    heldout_params = dataclasses.replace(greedy, max_tokens=ecfg.heldout_max_tokens)
    questions = load_questions(ecfg.heldout_questions)
    prompts = [
        conv["messages"][: next(i for i, m in enumerate(conv["messages"]) if m["role"] == "user") + 1]
        for conv in r.test_convs[: ecfg.samples]
    ]
    answers: dict[str, list[str]] = {}
    heldout: dict[str, dict] = {}
    for quant in r.variants:  # one file open at a time: four full-size GGUFs together exceed Colab's RAM
        with LlamaChat(r.layout.gguf(quant), n_ctx=ecfg.n_ctx, n_threads=r.threads, n_gpu_layers=r.gpu_layers) as chat:
            answers[quant] = [chat.answer(prompt, greedy).strip() for prompt in prompts]
            if questions:
                heldout[quant] = score(questions, lambda m, chat=chat: chat.answer(m, heldout_params))
    if heldout:
        _merge_heldout(r.layout.root, heldout_section(questions, heldout))
        log("held-out exact match (GGUF): " + format_exact_match({q: h["exact_match"] for q, h in heldout.items()}))
    return [
        {
            "prompt": prompt[-1]["content"],
            "reference": conv["messages"][len(prompt)]["content"] if len(conv["messages"]) > len(prompt) else None,
            "answers": {quant: answers[quant][i] for quant in r.variants},
        }
        for i, (prompt, conv) in enumerate(zip(prompts, r.test_convs))
    ]


def _merge_heldout(run_dir: Path, section: dict) -> None:
    """The GGUF variants' held-out scores beside the transformers models' (written by evaluate_hf)."""
    earlier = read_report(run_dir).get("heldout", {})
    section["exact_match"] = {**earlier.get("exact_match", {}), **section["exact_match"]}
    for row, before in zip(section["answers"], earlier.get("answers", [])):
        row["answers"] = {**before["answers"], **row["answers"]}
    update_report(run_dir, "heldout", section)


def evaluate_gguf(cfg: PipelineConfig, run_dir: Path, log=print) -> dict:
    """Scorecard of every GGUF variant plus parity checks and sample answers; updates the report."""
    r = _gguf_run(cfg, Path(run_dir))
    parity = _parity_section(r, log)
    gguf = _scorecard(r)
    samples = _answers(r, log)
    update_report(run_dir, "gguf", gguf)
    update_report(run_dir, "parity", parity)
    if cfg.export.lora:
        update_report(run_dir, "lora", lora_parity(r, log))
    report = update_report(run_dir, "samples", samples)
    plot_scorecard(gguf, r.layout.scorecard_plot)
    ecfg, gpu = cfg.eval, f", {r.gpu_layers} GPU layers" if r.gpu_layers else ""
    log(
        f"GGUF scorecard (test split, assistant tokens; speed: greedy, {r.threads} threads{gpu}, median of "
        f"{ecfg.speed_runs}):\n" + scorecard_table(gguf)
    )
    return report


def evaluate(cfg: PipelineConfig, run_dir: Path, log=print) -> dict:
    """The whole evaluate stage: transformers models first, then every GGUF variant."""
    layout = RunLayout(run_dir)
    write_json_atomic(layout.report_json, {})  # no section of an older run survives
    if cfg.prefer.enabled:  # measured by the prefer stage, which had the three models loaded
        update_report(run_dir, "preference", read_preference(layout.adapter_for(True)))
    evaluate_hf(cfg, run_dir, log=log)
    return evaluate_gguf(cfg, run_dir, log=log)


def run(cfg: PipelineConfig, run_dir: Path, *, log=print, resume: bool = False) -> dict:
    """The stage interface (``pipeline.Stage``): evaluate has nothing to resume."""
    return evaluate(cfg, run_dir, log=log)
