"""The ``evaluate`` stage: what did fine-tuning buy, measured on held-out conversations.

    qlora-pipeline evaluate --run-dir runs/demo

For the base, base + adapter and merged model (all at full precision): the loss per assistant
token on the validation split and the perplexity on the test split, with the same masking as
training. Results go to ``RUN/report.json`` (section ``hf``) and ``RUN/report.md``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from qlora_pipeline.chat_format import ChatEncoder
from qlora_pipeline.config import PipelineConfig
from qlora_pipeline.errors import StageOrderError
from qlora_pipeline.paths import save_figure_atomic, write_json_atomic, write_text_atomic

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def read_report(run_dir: Path) -> dict:
    path = Path(run_dir) / REPORT_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


def update_report(run_dir: Path, section: str, values: dict) -> dict:
    """Replace one section of report.json (atomically) and re-render report.md."""
    report = read_report(run_dir)
    report[section] = values
    write_json_atomic(Path(run_dir) / REPORT_JSON, report)
    write_text_atomic(Path(run_dir) / REPORT_MD, render_markdown(report))
    return report


def render_markdown(report: dict) -> str:
    lines = ["# Run report", ""]
    hf = report.get("hf")
    if hf:
        lines += ["## Fine-tuning (transformers, full precision)", "",
                  "| model | validation loss | test perplexity |", "| --- | ---: | ---: |"]
        for name, label in (("base", "base"), ("adapter", "base + adapter"), ("merged", "merged")):
            val = hf.get(f"{name}_val_loss")
            ppl = hf.get(f"{name}_ppl")
            if ppl is None:
                continue
            lines.append(f"| {label} | {val:.4f} | {ppl:.3f} |" if val is not None else
                         f"| {label} | – | {ppl:.3f} |")
        if hf.get("val_loss_reduction") is not None:
            lines += ["", f"Validation loss on assistant tokens fell by {100 * hf['val_loss_reduction']:.1f}% "
                          "relative to the base model."]
        lines.append("")
    if report.get("gguf"):
        lines += ["## Quantization scorecard (llama.cpp, test split)", "", scorecard_table(report["gguf"]), "",
                  "![scorecard](scorecard.png)", ""]
    parity = report.get("parity")
    if parity:
        lines += ["## Parity checks", "",
                  f"- F16 GGUF vs transformers merged model: max |logit difference| "
                  f"{parity['f16_vs_hf_max_abs_logit_diff']:.2e}, top-1 agreement "
                  f"{100 * parity['f16_vs_hf_top1']:.2f}% on {parity['f16_vs_hf_tokens']} tokens "
                  "(reference: merged matrices rounded to fp16, as the F16 file stores them; against the "
                  f"unrounded fp32 model {parity['f16_vs_hf_fp32_weights_max_abs_logit_diff']:.2e})",
                  *([f"- F32 GGUF vs transformers fp32 (converter check): max |logit difference| "
                     f"{parity['f32_gguf_vs_hf_max_abs_logit_diff']:.2e}"] if "f32_gguf_vs_hf_max_abs_logit_diff" in parity else []),
                  f"- chat prompt ids identical (HF template, llama-cpp-python chat handler, our encoder on both): "
                  f"{parity['chat_prompt_ids_identical']} ({parity['chat_prompt_conversations']} conversations)", ""]
    if report.get("samples"):
        lines += ["## Sample answers (greedy)", ""]
        for sample in report["samples"]:
            lines.append(f"**{sample['prompt']}**" + (f" (reference: {sample['reference']})" if sample.get("reference") else ""))
            lines.append("")
            for name, answer in sample["answers"].items():
                lines.append(f"- {name}: {answer}")
            lines.append("")
    return "\n".join(lines) + "\n"


def evaluate_hf(cfg: PipelineConfig, run_dir: Path, log=print, with_merged: bool = True) -> dict:
    """Validation loss and test perplexity of base, base + adapter and (unless told not to) merged model."""
    from qlora_pipeline.chat_format import ChatEncoder
    from qlora_pipeline.data import read_split, tokenize_conversations
    from qlora_pipeline.merge import load_adapter, merge_dtype
    from qlora_pipeline.model import load_base_full_precision, load_tokenizer, resolve_base
    from qlora_pipeline.train import evaluate_loss

    run_dir = Path(run_dir)
    needs = [("adapter/adapter_config.json", "train")] + ([("merged/config.json", "merge")] if with_merged else [])
    for needed, stage in needs:
        if not (run_dir / needed).is_file():
            raise StageOrderError(f"{run_dir / needed} is missing; run `qlora-pipeline {stage} --run-dir {run_dir}` first")
    base = resolve_base(cfg, log_fn=log)
    tokenizer = load_tokenizer(base, cfg.model.revision)
    encoder = ChatEncoder.from_hf(tokenizer)
    splits = {}
    for split in ("val", "test"):
        splits[split], _ = tokenize_conversations(encoder, read_split(run_dir, split), cfg.data.max_seq_len,
                                                  cfg.data.overlong, split=split)
    bt = cfg.train.batch_tokens

    def measure(model, name: str) -> dict:
        val = evaluate_loss(model, splits["val"], bt, "cpu", desc=f"{name}: validation") if splits["val"] else None
        test = evaluate_loss(model, splits["test"], bt, "cpu", desc=f"{name}: test") if splits["test"] else None
        return {f"{name}_val_loss": val, f"{name}_ppl": math.exp(test) if test is not None else None}

    dtype = merge_dtype(cfg, base)
    results: dict = {}
    model = load_base_full_precision(base, cfg.model, dtype=dtype)
    results.update(measure(model, "base"))
    results.update(measure(load_adapter(model, run_dir / "adapter"), "adapter"))
    del model
    if with_merged:
        merged = load_base_full_precision(str(run_dir / "merged"), cfg.model, dtype=dtype)
        results.update(measure(merged, "merged"))
    if results["base_val_loss"] and results["adapter_val_loss"] is not None:
        results["val_loss_reduction"] = 1 - results["adapter_val_loss"] / results["base_val_loss"]
    results["val_tokens_examples"] = len(splits["val"])
    results["test_examples"] = len(splits["test"])
    if with_merged:
        update_report(run_dir, "hf", results)
    merged_text = f", merged {results['merged_ppl']:.2f}" if with_merged else ""
    log(f"validation loss: base {results['base_val_loss']:.4f} -> adapter {results['adapter_val_loss']:.4f} "
        f"({100 * results.get('val_loss_reduction', 0):.1f}% lower); test perplexity base "
        f"{results['base_ppl']:.2f}, adapter {results['adapter_ppl']:.2f}{merged_text}")
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


def gguf_quality(model_path: Path, examples: list[dict], n_ctx: int, threads: int, reference: list | None):
    """Perplexity on assistant tokens; with F16 ``reference`` log-probs, mean KL and top-1 agreement."""
    import numpy as np

    from qlora_pipeline.chat import LlamaChat

    chat = LlamaChat(model_path, n_ctx=n_ctx, n_threads=threads, logits_all=True)
    nll, count, kl_sum, agree = 0.0, 0, 0.0, 0
    logprobs_out = []
    for i, ex in enumerate(examples):
        positions, targets = _labelled_positions(ex)
        logp = _log_softmax(llama_logits(chat.llm, ex["input_ids"])[positions])
        nll -= float(logp[np.arange(len(targets)), targets].sum())
        count += len(targets)
        if reference is not None:
            ref = reference[i]
            kl_sum += float((np.exp(ref) * (ref - logp)).sum())
            agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
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


def generation_speed(model_path: Path, prompt_ids: list[int], new_tokens: int, runs: int, n_ctx: int,
                     threads: int) -> dict:
    """Median greedy generation speed (tokens/s after the first token) and time to first token."""
    import statistics

    from qlora_pipeline.chat import LlamaChat

    chat = LlamaChat(model_path, n_ctx=n_ctx, n_threads=threads)
    speeds, first_token = [], []
    for _ in range(runs + 1):  # the first run warms caches and is not counted
        started = time.perf_counter()
        stamps = []
        for _token in chat.llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) >= new_tokens:
                break  # generate() does not stop at end-of-turn, so every run makes the same count
        speeds.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        first_token.append(stamps[0] - started)
    chat.close()
    return {"tokens_per_s": statistics.median(speeds[1:]), "time_to_first_token_s": statistics.median(first_token[1:])}


def chat_prompt_parity(tokenizer, chat, conversations: list[list[dict]]) -> dict:
    """Prompt ids for the same messages from four routes; they must all be identical.

    HF: ``apply_chat_template(tokenize=True)`` and our encoder on the tokenizer; llama.cpp:
    llama-cpp-python's own Jinja2 chat handler on the GGUF's template (what
    ``create_chat_completion`` sends, BOS handling included) and our encoder on the GGUF.
    """
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = chat.llm
    formatter = Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token=llm.detokenize([llm.token_eos()], special=True).decode(),
        bos_token=llm.detokenize([llm.token_bos()], special=True).decode())
    hf_encoder = ChatEncoder.from_hf(tokenizer)
    mismatches = 0
    for messages in conversations:
        hf_ids = list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])
        response = formatter(messages=messages)
        llama_ids = llm.tokenize(response.prompt.encode("utf-8"), add_bos=not response.added_special, special=True)
        routes = (hf_ids, hf_encoder.encode_prompt(messages), llama_ids, chat.encoder.encode_prompt(messages))
        mismatches += any(r != hf_ids for r in routes)
    return {"chat_prompt_ids_identical": mismatches == 0, "chat_prompt_conversations": len(conversations)}


def _f32_gguf_parity(cfg: PipelineConfig, run_dir: Path, examples: list[dict], reference: list) -> float:
    """Max |logit difference| between a temporary F32 GGUF (F32 KV cache) and transformers in fp32."""
    import numpy as np
    from transformers import AutoTokenizer

    from qlora_pipeline.chat import LlamaChat
    from qlora_pipeline.export import END_OF_TURN, GGUF_DIR, convert_to_gguf, default_model_name

    path = Path(run_dir) / GGUF_DIR / ".parity-F32.gguf"
    eot = AutoTokenizer.from_pretrained(str(Path(run_dir) / "merged")).convert_tokens_to_ids(END_OF_TURN)
    try:
        convert_to_gguf(Path(run_dir) / "merged", path, cfg.export.model_name or default_model_name(cfg), eot, "f32")
        with LlamaChat(path, n_ctx=cfg.eval.n_ctx, n_threads=cfg.eval.threads, logits_all=True,
                       f32_kv_cache=True) as chat:
            return max(float(np.abs(llama_logits(chat.llm, ex["input_ids"]) - ref[0].numpy()).max())
                       for ex, ref in zip(examples, reference))
    finally:
        path.unlink(missing_ok=True)


def plot_scorecard(gguf: dict, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, row in gguf.items():
        x, y = row["bytes"] / 1e6, row["kld_vs_f16"]
        ax.scatter([x], [y], s=60)
        ax.annotate(f"{name}\nppl {row['ppl']:.3f}", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.margins(x=0.12, y=0.2)  # room for the labels
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("mean KL divergence vs F16 (nats/token)")
    ax.set_title("What quantization cost on held-out conversations")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, out_png)


def scorecard_table(gguf: dict) -> str:
    lines = ["| variant | size (MB) | bits/weight | perplexity | KL vs F16 | top-1 vs F16 | tokens/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in gguf.items():
        lines.append(f"| {name} | {r['bytes'] / 1e6:.2f} | {r['bits_per_weight']:.2f} | {r['ppl']:.4f} | "
                     f"{r['kld_vs_f16']:.5f} | {100 * r['top1_vs_f16']:.2f}% | {r['tokens_per_s']:.1f} |")
    return "\n".join(lines)


def evaluate_gguf(cfg: PipelineConfig, run_dir: Path, log=print) -> dict:
    """Scorecard of every GGUF variant plus parity checks and sample answers; updates the report."""
    import numpy as np
    from gguf import GGUFReader
    from tqdm.auto import tqdm

    from qlora_pipeline.chat import LlamaChat, SamplingParams
    from qlora_pipeline.chat_format import ChatEncoder
    from qlora_pipeline.data import read_split, tokenize_conversations
    from qlora_pipeline.export import F16, gguf_path
    from qlora_pipeline.merge import model_logits
    from qlora_pipeline.model import load_base_full_precision, load_tokenizer

    run_dir = Path(run_dir)
    ecfg = cfg.eval
    variants = [F16] + [q for q in cfg.export.quant_types if q != F16]
    for quant in variants:
        if not gguf_path(run_dir, quant).is_file():
            raise StageOrderError(f"{gguf_path(run_dir, quant)} is missing; run `qlora-pipeline export --run-dir {run_dir}` first")
    tokenizer = load_tokenizer(str(run_dir / "merged"))
    encoder = ChatEncoder.from_hf(tokenizer)
    test_convs = read_split(run_dir, "test")
    examples, _ = tokenize_conversations(encoder, test_convs, min(cfg.data.max_seq_len, ecfg.n_ctx), cfg.data.overlong,
                                         split="test")
    scored = _take_examples(examples, ecfg.kld_max_tokens)
    n_params = sum(int(t.n_elements) for t in GGUFReader(str(gguf_path(run_dir, F16))).tensors)

    # Parity: F16 GGUF logits against transformers' merged model on the same ids. The F16 file
    # stores matrices in half precision, so the like-for-like reference is the merged model with
    # its matrices rounded to fp16 (computing in fp32): that isolates converter and runtime. The
    # difference from the unrounded fp32 model is recorded too (for a bf16 base such as
    # Phi-3.5 the two are the same).
    import torch

    parity_examples = _take_examples(examples, ecfg.parity_tokens)
    merged = load_base_full_precision(str(run_dir / "merged"), cfg.model)
    hf_fp32_logits = model_logits(merged, parity_examples)
    with torch.no_grad():
        for param in merged.parameters():
            if param.dim() >= 2:
                param.copy_(param.half().float())
    hf_logits = model_logits(merged, parity_examples)
    del merged
    f16_chat = LlamaChat(gguf_path(run_dir, F16), n_ctx=ecfg.n_ctx, n_threads=ecfg.threads, logits_all=True,
                         f32_kv_cache=True)
    max_abs, max_abs_fp32, agree, total = 0.0, 0.0, 0, 0
    for ex, ref, ref32 in zip(parity_examples, hf_logits, hf_fp32_logits):
        got = llama_logits(f16_chat.llm, ex["input_ids"])
        ref, ref32 = ref[0].numpy(), ref32[0].numpy()
        max_abs = max(max_abs, float(np.abs(got - ref).max()))
        max_abs_fp32 = max(max_abs_fp32, float(np.abs(got - ref32).max()))
        agree += int((got.argmax(-1) == ref32.argmax(-1)).sum())
        total += len(ex["input_ids"])
    prompts = [c["messages"][: max(1, len(c["messages"]) - 1)] for c in test_convs[:20]]
    parity = {"f16_vs_hf_max_abs_logit_diff": max_abs, "f16_vs_hf_top1": agree / max(1, total),
              "f16_vs_hf_fp32_weights_max_abs_logit_diff": max_abs_fp32,
              "f16_vs_hf_tokens": total, **chat_prompt_parity(tokenizer, f16_chat, prompts)}
    f16_chat.close()
    if ecfg.f32_parity:
        parity["f32_gguf_vs_hf_max_abs_logit_diff"] = _f32_gguf_parity(cfg, run_dir, parity_examples, hf_fp32_logits)


    # The speed prompt: held-out user questions, joined until long enough, then cut to length.
    speed_text = " ".join(m["content"] for c in test_convs for m in c["messages"] if m["role"] == "user")
    speed_prompt = encoder.encode_prompt([{"role": "user", "content": speed_text}])[: ecfg.speed_prompt_tokens]

    gguf: dict = {}
    reference = None
    for quant in tqdm(variants, desc="scoring GGUF variants", unit="file"):
        path = gguf_path(run_dir, quant)
        quality, logprobs = gguf_quality(path, scored, ecfg.n_ctx, ecfg.threads, reference)
        if quant == F16:
            reference = logprobs
        speed = generation_speed(path, speed_prompt, ecfg.speed_new_tokens, ecfg.speed_runs, ecfg.n_ctx, ecfg.threads)
        size = path.stat().st_size
        gguf[quant] = {"path": str(path), "bytes": size, "bits_per_weight": 8 * size / n_params,
                       "ppl": quality["ppl"], "kld_vs_f16": quality["kld_vs_f16"],
                       "top1_vs_f16": quality["top1_vs_f16"], "tokens_per_s": speed["tokens_per_s"],
                       "time_to_first_token_s": speed["time_to_first_token_s"], "scored_tokens": quality["tokens"]}
    del reference

    samples = []
    greedy = SamplingParams(temperature=0.0, top_p=1.0, top_k=1, repeat_penalty=1.0, max_tokens=ecfg.sample_max_tokens)
    chats = {q: LlamaChat(gguf_path(run_dir, q), n_ctx=ecfg.n_ctx, n_threads=ecfg.threads) for q in variants}
    for conv in test_convs[: ecfg.samples]:
        question = conv["messages"][: next(i for i, m in enumerate(conv["messages"]) if m["role"] == "user") + 1]
        reference_answer = conv["messages"][len(question)]["content"] if len(conv["messages"]) > len(question) else None
        samples.append({"prompt": question[-1]["content"], "reference": reference_answer,
                        "answers": {q: chats[q].answer(question, greedy).strip() for q in variants}})
    for chat in chats.values():
        chat.close()

    update_report(run_dir, "gguf", gguf)
    update_report(run_dir, "parity", parity)
    report = update_report(run_dir, "samples", samples)
    plot_scorecard(gguf, run_dir / "scorecard.png")
    log("GGUF scorecard (test split, assistant tokens; speed: greedy, "
        f"{ecfg.threads} threads, median of {ecfg.speed_runs}):\n" + scorecard_table(gguf))
    log(f"parity: F16 GGUF vs transformers max |logit diff| {max_abs:.2e}, top-1 {100 * parity['f16_vs_hf_top1']:.2f}% "
        f"on {total} tokens; chat prompt ids identical: {parity['chat_prompt_ids_identical']}")
    return report


def evaluate(cfg: PipelineConfig, run_dir: Path, log=print) -> dict:
    """The whole evaluate stage: transformers models first, then every GGUF variant."""
    write_json_atomic(Path(run_dir) / REPORT_JSON, {})  # no section of an older run survives
    evaluate_hf(cfg, run_dir, log=log)
    return evaluate_gguf(cfg, run_dir, log=log)
