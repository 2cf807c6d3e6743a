"""GGUF scoring against F16: KL divergence, top-1 agreement, perplexity, and generation speed."""

from __future__ import annotations

import math
from pathlib import Path


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


def take_examples(examples: list[dict], max_tokens: int) -> list[dict]:
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
    from qlora_pipeline.evaluation.speed import decode_speed
    from qlora_pipeline.serve.chat import LlamaChat

    with LlamaChat(model_path, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=n_gpu_layers) as chat:
        return decode_speed(chat.llm, prompt_ids, new_tokens, runs)
