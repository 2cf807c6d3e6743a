"""The ``evaluate`` stage: what did fine-tuning buy, measured on held-out conversations.

    qlora-pipeline evaluate --run-dir runs/demo

For the base, base + adapter and merged model (all at full precision): the loss per assistant
token on the validation split and the perplexity on the test split, with the same masking as
training. Results go to ``RUN/report.json`` (section ``hf``) and ``RUN/report.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_pipeline.chat_format import ChatEncoder
from qlora_pipeline.config import PipelineConfig
from qlora_pipeline.errors import ConfigError, StageOrderError
from qlora_pipeline.layout import RunLayout
from qlora_pipeline.paths import save_figure_atomic, write_json_atomic, write_text_atomic
from qlora_pipeline.runtime import usable_cpus


def read_report(run_dir: Path) -> dict:
    path = RunLayout(run_dir).report_json
    return json.loads(path.read_text()) if path.is_file() else {}


def update_report(run_dir: Path, section: str, values: dict) -> dict:
    """Replace one section of report.json (atomically) and re-render report.md."""
    report = read_report(run_dir)
    report[section] = values
    layout = RunLayout(run_dir)
    write_json_atomic(layout.report_json, report)
    write_text_atomic(layout.report_md, render_markdown(report))
    return report


def _lora_markdown(lora: dict) -> list[str]:
    return [
        "## LoRA GGUF (base F16 + adapter-F16.gguf vs the merged F16 GGUF)",
        "",
        f"Adapter {lora['adapter_bytes'] / 1e6:.2f} MB ({100 * lora['adapter_bytes'] / lora['merged_bytes']:.1f}% "
        f"of the merged F16); over {lora['tokens']} test tokens max |diff| {lora['max_abs_logit_diff']:.2e} = "
        f"{lora['relative_diff']:.1e} of the largest logit, top-1 {100 * lora['top1']:.2f}%: "
        f"{'within' if lora['passes'] else 'OUTSIDE'} the F16 bound.",
        "",
    ]


def render_markdown(report: dict) -> str:
    lines = ["# Run report", ""]
    hf = report.get("hf")
    if hf:
        lines += [
            "## Fine-tuning (transformers, full precision)",
            "",
            "| model | validation loss | test perplexity |",
            "| --- | ---: | ---: |",
        ]
        for name, label in (("base", "base"), ("adapter", "base + adapter"), ("merged", "merged")):
            val = hf.get(f"{name}_val_loss")
            ppl = hf.get(f"{name}_ppl")
            if ppl is None:
                continue
            lines.append(f"| {label} | {val:.4f} | {ppl:.3f} |" if val is not None else f"| {label} | – | {ppl:.3f} |")
        if hf.get("val_loss_reduction") is not None:
            lines += [
                "",
                f"Validation loss on assistant tokens fell by {100 * hf['val_loss_reduction']:.1f}% "
                "relative to the base model.",
            ]
        lines.append("")
    if report.get("gguf"):
        lines += [
            "## Quantization scorecard (llama.cpp, test split)",
            "",
            scorecard_table(report["gguf"]),
            "",
            "![scorecard](scorecard.png)",
            "",
        ]
    if report.get("lora"):
        lines += _lora_markdown(report["lora"])
    parity = report.get("parity")
    if parity:
        lines += [
            "## Parity checks (GGUF vs transformers fp32, relative: max |diff| / max |logit|)",
            "",
            "| file | case | n_ctx | tokens | max abs diff | relative | top-1 | flips (widest margin) | within bound |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for key, row in parity_rows(parity):
            file_type, case = key.split("_")
            lines.append(
                f"| {file_type.upper()} | {case} | {row['n_ctx']} | {row['tokens']} | "
                f"{row['max_abs_logit_diff']:.2e} | {row['relative_diff']:.1e} | {100 * row['top1']:.2f}% | "
                f"{row['top1_flips']} ({row['widest_flipped_margin']:.1e}) | {'yes' if row['passes'] else 'NO'} |"
            )
        if parity.get("chat_prompt_ids"):
            lines += [
                "",
                "Chat prompt ids against llama-cpp-python's chat handler: " + format_routes(parity["chat_prompt_ids"]),
            ]
        lines.append("")
    heldout = report.get("heldout")
    if heldout:
        lines += [
            f"## Held-out questions ({heldout['questions']}, facts the fine-tuning data never mentions)",
            "",
            "| model | exact match |",
            "| --- | ---: |",
        ]
        lines += [f"| {name} | {100 * rate:.1f}% |" for name, rate in heldout["exact_match"].items()]
        lines.append("")
    if report.get("samples"):
        lines += ["## Sample answers (greedy)", ""]
        for sample in report["samples"]:
            lines.append(
                f"**{sample['prompt']}**" + (f" (reference: {sample['reference']})" if sample.get("reference") else "")
            )
            lines.append("")
            for name, answer in sample["answers"].items():
                lines.append(f"- {name}: {answer}")
            lines.append("")
    return "\n".join(lines) + "\n"


def heldout_section(questions: list[dict], results: dict[str, dict]) -> dict:
    """report.json's ``heldout``: exact match per model and every answer beside its reference."""
    return {
        "questions": len(questions),
        "exact_match": {name: r["exact_match"] for name, r in results.items()},
        "answers": [
            {
                "question": q["question"],
                "reference": q["answer"],
                "answers": {name: r["answers"][i] for name, r in results.items()},
            }
            for i, q in enumerate(questions)
        ],
    }


def hf_splits(cfg: PipelineConfig, run_dir: Path, encoder) -> dict[str, list[dict]]:
    """Validation and test examples for transformers' scoring, each cut to eval.hf_max_tokens."""
    from qlora_pipeline.data import read_split, tokenize_conversations

    splits = {}
    for split in ("val", "test"):
        examples, _ = tokenize_conversations(
            encoder, read_split(run_dir, split), cfg.data.max_seq_len, cfg.data.overlong, split=split
        )
        splits[split] = _take_examples(examples, cfg.eval.hf_max_tokens) if cfg.eval.hf_max_tokens else examples
    return splits


def evaluate_hf(cfg: PipelineConfig, run_dir: Path, log=print, with_merged: bool = True) -> dict:
    """Validation loss and test perplexity of base, base + adapter and (unless told not to) merged
    model, on the GPU when there is one, one model in memory at a time."""
    from qlora_pipeline.batches import evaluate_loss
    from qlora_pipeline.chat_format import ChatEncoder
    from qlora_pipeline.heldout import format_exact_match, hf_answerer, load_questions, score
    from qlora_pipeline.merge import load_adapter, merge_dtype
    from qlora_pipeline.model import eval_placement, free_memory, load_base_full_precision, load_tokenizer, resolve_base

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
    results.update(measure(load_adapter(model, RunLayout(run_dir).adapter), "adapter"))
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
    merged_text = f", merged {results['merged_ppl']:.2f}" if with_merged else ""
    log(
        f"validation loss: base {results['base_val_loss']:.4f} -> adapter {results['adapter_val_loss']:.4f} "
        f"({100 * results.get('val_loss_reduction', 0):.1f}% lower); test perplexity base "
        f"{results['base_ppl']:.2f}, adapter {results['adapter_ppl']:.2f}{merged_text}"
    )
    return results


# ---------------------------------------------------------------------------- GGUF variants


def _log_softmax(x):
    import numpy as np

    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def llama_logits(llm, ids: list[int]):
    """Logits at every position of ``ids`` from a llama.cpp model opened with logits_all=True."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32, copy=True)


def _take_examples(examples: list[dict], max_tokens: int) -> list[dict]:
    taken, total = [], 0
    for ex in examples:
        if total >= max_tokens:
            break
        taken.append(ex)
        total += len(ex["input_ids"])
    return taken


def _labelled_positions(ex: dict):
    """Positions t whose next token t+1 is a label (an assistant token), and those targets."""
    import numpy as np

    labels = np.array(ex["labels"])
    positions = np.nonzero(labels[1:] != -100)[0]
    return positions, labels[positions + 1]


def kl_divergence_sum(ref_logp, logp) -> float:
    """Sum over positions of KL(P_ref || P) = sum_v p_ref(v) (log p_ref(v) - log p(v)), from
    log-probabilities of shape (positions, vocab): llama.cpp's own KL statistic (perplexity
    --kl-divergence), which the scorecard reports per token."""
    import numpy as np

    return float((np.exp(ref_logp) * (ref_logp - logp)).sum())


def top1_agreements(ref_logp, logp) -> int:
    """Positions where both distributions put their highest probability on the same token."""
    return int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())


def gguf_gpu_layers(requested: int) -> int:
    """GGUF layers to put on the GPU: the requested count where llama.cpp was built with GPU
    support and a GPU is present (Colab with the CUDA wheel), else 0."""
    import llama_cpp
    import torch

    if requested and torch.cuda.is_available() and llama_cpp.llama_supports_gpu_offload():
        return requested
    return 0


def gguf_quality(
    model_path: Path, examples: list[dict], n_ctx: int, threads: int, reference: list | None, n_gpu_layers: int = 0
):
    """Perplexity on assistant tokens; with F16 ``reference`` log-probs, mean KL and top-1 agreement."""
    import numpy as np

    from qlora_pipeline.serve.chat import LlamaChat

    chat = LlamaChat(model_path, n_ctx=n_ctx, n_threads=threads, logits_all=True, n_gpu_layers=n_gpu_layers)
    nll, count, kl_sum, agree = 0.0, 0, 0.0, 0
    logprobs_out = []
    for i, ex in enumerate(examples):
        positions, targets = _labelled_positions(ex)
        logp = _log_softmax(llama_logits(chat.llm, ex["input_ids"])[positions])
        nll -= float(logp[np.arange(len(targets)), targets].sum())
        count += len(targets)
        if reference is not None:
            kl_sum += kl_divergence_sum(reference[i], logp)
            agree += top1_agreements(reference[i], logp)
        else:
            logprobs_out.append(logp)
    chat.close()
    result = {"ppl": math.exp(nll / max(1, count)), "tokens": count}
    if reference is not None:
        result["kld_vs_f16"] = kl_sum / max(1, count)
        result["top1_vs_f16"] = agree / max(1, count)
    else:
        result["kld_vs_f16"], result["top1_vs_f16"] = 0.0, 1.0
    return result, logprobs_out


def generation_speed(
    model_path: Path, prompt_ids: list[int], new_tokens: int, runs: int, n_ctx: int, threads: int, n_gpu_layers: int = 0
) -> dict:
    """The scorecard's speed columns: ``speed.decode_speed`` on the file, as the chat opens it."""
    from qlora_pipeline.serve.chat import LlamaChat
    from qlora_pipeline.speed import decode_speed

    with LlamaChat(model_path, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=n_gpu_layers) as chat:
        return decode_speed(chat.llm, prompt_ids, new_tokens, runs)


def parity_rows(parity: dict) -> list[tuple[str, dict]]:
    """The measured cases of report.json's ``parity`` (``f16_short``, ``f32_long``, ...)."""
    return [(key, row) for key, row in parity.items() if isinstance(row, dict) and "relative_diff" in row]


def format_routes(section: dict) -> str:
    """``training 20/20, app 20/20, transformers_stock 0/20 (differs at token 1: [...] vs [...])``."""
    parts = []
    for name, row in section["routes"].items():
        text = f"{name} {row['identical']}/{section['conversations']}"
        diff = row["first_difference"]
        if diff:
            text += f" (first differs at token {diff['position']}: {diff['ids']} vs {diff['reference_ids']})"
        parts.append(text)
    return ", ".join(parts)


def _first_difference(ids: list[int], reference: list[int]) -> dict:
    at = next((i for i, (a, b) in enumerate(zip(ids, reference)) if a != b), min(len(ids), len(reference)))
    return {"position": at, "ids": ids[max(0, at - 2) : at + 4], "reference_ids": reference[max(0, at - 2) : at + 4]}


def stock_tokenizers(base: str, revision: str | None = None) -> dict:
    """The base's tokenizer as transformers loads it, two ways: by the base's folder or hub id
    (for Phi-3.5, transformers 5 ignores the declared ``LlamaTokenizer`` beside config.json and
    reads tokenizer.json as it is) and from its tokenizer files alone (it then builds a
    ``LlamaTokenizer`` with a pre-tokenizer of its own, which differs from llama.cpp)."""
    import shutil
    import tempfile

    from transformers import AutoTokenizer
    from transformers.utils import cached_file

    from qlora_pipeline.phi3_tokenizer import TOKENIZER_FILES

    out = {"transformers_stock": AutoTokenizer.from_pretrained(base, revision=revision)}
    with tempfile.TemporaryDirectory() as alone:
        for name in TOKENIZER_FILES:
            found = cached_file(base, name, revision=revision, _raise_exceptions_for_missing_entries=False)
            if found:
                shutil.copy2(found, Path(alone) / name)
        out["transformers_tokenizer_files_only"] = AutoTokenizer.from_pretrained(alone)
    return out


def chat_prompt_routes(stock: dict, tokenizer, chat, conversations: list[list[dict]]) -> dict:
    """Prompt ids for the same messages by every route that builds them, against llama.cpp's.

    The reference is llama-cpp-python's own Jinja2 chat handler on the GGUF's template (what
    ``create_chat_completion`` sends, BOS handling included): serving sees those ids. Routes:
    ``apply_chat_template(tokenize=True)`` on each tokenizer of :func:`stock_tokenizers` (the
    model-folder one is also what TRL's SFTTrainer tokenizes with), ``transformers`` the same on
    ``model.load_tokenizer``'s (tokenizer.json's own pipeline, whichever way it was loaded),
    ``training`` our encoder on it (the ids training uses), and ``app`` the app's and ``chat``'s
    prompt (``LlamaChat.prompt_ids``: our encoder on the GGUF).
    """
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = chat.llm
    formatter = Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token=llm.detokenize([llm.token_eos()], special=True).decode(),
        bos_token=llm.detokenize([llm.token_bos()], special=True).decode(),
    )
    training = ChatEncoder.from_hf(tokenizer)

    def apply(tok):
        return lambda m: list(tok.apply_chat_template(m, tokenize=True, add_generation_prompt=True)["input_ids"])

    routes = {
        **{name: apply(tok) for name, tok in stock.items()},
        "transformers": apply(tokenizer),
        "training": training.encode_prompt,
        "app": lambda m: chat.prompt_ids(m, max_new_tokens=16)[0],
    }
    report = {name: {"identical": 0, "first_difference": None} for name in routes}
    for messages in conversations:
        response = formatter(messages=messages)
        reference = llm.tokenize(response.prompt.encode("utf-8"), add_bos=not response.added_special, special=True)
        for name, route in routes.items():
            ids = route(messages)
            if ids == reference:
                report[name]["identical"] += 1
            elif report[name]["first_difference"] is None:
                report[name]["first_difference"] = _first_difference(ids, reference)
    return {"reference": "llama_cpp_chat_handler", "conversations": len(conversations), "routes": report}


# Relative parity bounds: max |logit difference| / max |reference logit| (and top-1 agreement).
# F32 checks the converter and runtime alone; F16 adds the rounding of the stored weights.
PARITY_BOUNDS = {"F32": 1e-3, "F16": 3e-3}
PARITY_MIN_TOP1 = 0.999


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

    from qlora_pipeline.fp32_reference import layerwise_fp32
    from qlora_pipeline.merge import model_logits
    from qlora_pipeline.model import free_memory, load_base_full_precision

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
    from qlora_pipeline.export import F16, convert_to_gguf, default_model_name, end_of_turn_id, gguf_path
    from qlora_pipeline.serve.chat import LlamaChat, original_context_length

    ecfg = cfg.eval
    run_dir = Path(run_dir)
    cases = {"short": ([ex["input_ids"] for ex in _take_examples(examples, ecfg.parity_tokens)], ecfg.n_ctx)}
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
                log(
                    f"parity {file_type} GGUF vs transformers fp32, {case} ({result['tokens']} tokens at n_ctx "
                    f"{n_ctx}): max |diff| {result['max_abs_logit_diff']:.2e} = {result['relative_diff']:.1e} of "
                    f"the largest logit, top-1 {100 * result['top1']:.2f}% ({result['top1_flips']} flipped, "
                    f"reference margins there <= {result['widest_flipped_margin']:.2e})"
                    + (
                        ""
                        if result["passes"]
                        else "  OUTSIDE the bound (relative "
                        f"{PARITY_BOUNDS[file_type]:.0e}, top-1 {100 * PARITY_MIN_TOP1:.1f}%)"
                        + ("; every flip is a near-tie within that difference" if result["flips_within_error"] else "")
                    )
                )
    finally:
        f32_path.unlink(missing_ok=True)
    return parity


def plot_scorecard(gguf: dict, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qlora_pipeline.export import F16, split_variant

    fig, ax = plt.subplots(figsize=(7, 4.2))
    # The size-KL frontier without and with the importance matrix: one line each, by size. F16
    # is the reference (KL 0), so it is left off the logarithmic axis.
    series = ((False, "llama.cpp's default weighting", "o", 5), (True, "importance matrix (-imat)", "s", -11))
    for with_matrix, label, marker, label_offset in series:
        rows = sorted(
            (r["bytes"] / 1e6, r["kld_vs_f16"], n)
            for n, r in gguf.items()
            if n != F16 and split_variant(n)[1] == with_matrix and r["kld_vs_f16"] > 0
        )
        if not rows:
            continue
        ax.plot([x for x, _, _ in rows], [y for _, y, _ in rows], marker=marker, markersize=7, label=label)
        for x, y, name in rows:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(7, label_offset), fontsize=8)
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.margins(x=0.15, y=0.2)  # room for the labels
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("mean KL divergence vs F16 (nats/token)")
    ax.set_title("What quantization cost on held-out conversations")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, out_png)


def scorecard_table(gguf: dict) -> str:
    lines = [
        "| variant | size (MB) | bits/weight | perplexity | KL vs F16 | top-1 vs F16 | tokens/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in gguf.items():
        lines.append(
            f"| {name} | {r['bytes'] / 1e6:.2f} | {r['bits_per_weight']:.2f} | {r['ppl']:.4f} | "
            f"{r['kld_vs_f16']:.5f} | {100 * r['top1_vs_f16']:.2f}% | {r['tokens_per_s']:.1f} |"
        )
    return "\n".join(lines)


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
    from qlora_pipeline.chat_format import ChatEncoder
    from qlora_pipeline.data import read_split, tokenize_conversations
    from qlora_pipeline.export import F16
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
    from qlora_pipeline.export import F16
    from qlora_pipeline.model import resolve_base
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
    from qlora_pipeline.export import F16
    from qlora_pipeline.serve.chat import LlamaChat

    merged = r.layout.gguf(F16)
    sequences = [ex["input_ids"] for ex in _take_examples(r.examples, r.cfg.eval.parity_tokens)]
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

    from qlora_pipeline.export import F16

    ecfg = r.cfg.eval
    scored = _take_examples(r.examples, ecfg.kld_max_tokens)
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
    from qlora_pipeline.heldout import format_exact_match, load_questions, score
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
    write_json_atomic(RunLayout(run_dir).report_json, {})  # no section of an older run survives
    evaluate_hf(cfg, run_dir, log=log)
    return evaluate_gguf(cfg, run_dir, log=log)


def run(cfg: PipelineConfig, run_dir: Path, *, log=print, resume: bool = False) -> dict:
    """The stage interface (``pipeline.Stage``): evaluate has nothing to resume."""
    return evaluate(cfg, run_dir, log=log)
