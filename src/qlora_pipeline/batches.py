"""Packed batches and the masked loss: what training, evaluation and the benchmarks share.

Examples (token ids with labels, from ``data.tokenize_conversations``) are packed greedily into
micro-batches of at most ``batch_tokens`` tokens, without padding: one row per micro-batch, with
position ids restarting at each example, so that transformers' packed-sequence attention keeps
conversations apart. The loss is next-token cross-entropy summed over labelled (assistant)
tokens only.
"""

from __future__ import annotations

import random

from qlora_pipeline.chat_format import IGNORE_INDEX
from qlora_pipeline.config import TrainConfig
from qlora_pipeline.errors import PipelineError


def pack_examples(examples: list[dict], batch_tokens: int, order: list[int]) -> list[list[int]]:
    """Greedy packing in the given order: each micro-batch is a list of example indices whose
    lengths sum to at most ``batch_tokens`` (an example longer than that goes alone)."""
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index in order:
        length = len(examples[index]["input_ids"])
        if current and used + length > batch_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    if current:
        batches.append(current)
    return batches


def batch_plan(examples: list[dict], tcfg: TrainConfig, epochs_needed: int) -> list[list[int]]:
    """All micro-batches of ``epochs_needed`` epochs: a pure function of the seed (exact resume)."""
    plan = []
    for epoch in range(epochs_needed):
        order = list(range(len(examples)))
        random.Random(f"{tcfg.seed}:{epoch}").shuffle(order)
        plan.extend(pack_examples(examples, tcfg.batch_tokens, order))
    return plan


def collate_packed(examples: list[dict], indices: list[int]):
    """One row of concatenated examples with per-example position ids (no padding, no mask)."""
    import torch

    ids, labels, positions = [], [], []
    for i in indices:
        ex = examples[i]
        ids += ex["input_ids"]
        # The first token of each example is never a label, so no loss crosses a boundary.
        labels += [IGNORE_INDEX] + ex["labels"][1:]
        positions += list(range(len(ex["input_ids"])))
    return (torch.tensor([ids]), torch.tensor([labels]), torch.tensor([positions]))


def label_count(examples: list[dict], indices: list[int]) -> int:
    return sum(sum(1 for x in examples[i]["labels"][1:] if x != IGNORE_INDEX) for i in indices)


def token_losses(model, input_ids, labels, position_ids):
    """Summed next-token cross-entropy over labelled tokens, and how many there were."""
    import torch.nn.functional as F

    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    loss_sum = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum, int((shift_labels != IGNORE_INDEX).sum())


def evaluate_loss(
    model, examples: list[dict], batch_tokens: int, device: str, max_batches: int | None = None, desc: str | None = None
) -> float:
    """Mean loss per assistant token over ``examples`` (the training masking)."""
    import torch
    from tqdm.auto import tqdm

    batches = pack_examples(examples, batch_tokens, list(range(len(examples))))
    if max_batches is not None:
        batches = batches[:max_batches]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for indices in tqdm(batches, desc=desc, disable=desc is None, leave=False):
            ids, labels, pos = (t.to(device) for t in collate_packed(examples, indices))
            loss_sum, n = token_losses(model, ids, labels, pos)
            total += float(loss_sum)
            count += n
    if was_training:
        model.train()
    if count == 0:
        raise PipelineError("no assistant tokens to evaluate on; the split is empty or every answer was cut")
    return total / count
