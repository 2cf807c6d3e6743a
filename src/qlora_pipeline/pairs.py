"""Preference pairs from oasst1's ranks: what the ``prepare`` stage writes for DPO and what the
``prefer`` stage and its measurements read.

oasst1's volunteers ranked the sibling replies under each prompt (``rank`` 0 is the best). SFT
keeps one path per tree; every other ranked reply is a judgement we can learn from. For every
prompter message with two or more ranked, kept assistant replies we make one pair:

* ``prompt``: the conversation from the root to that message, as messages;
* ``chosen``: the best-ranked reply, ``rejected``: the worst-ranked one (one assistant message
  each: TRL's conversational preference format);
* skipped when the two share a rank (a tie says nothing about preference).

The filters are SFT's: deleted and review-rejected messages are dropped with everything under
them, trees in other languages are skipped, and the pairs of a tree go to the split its
conversation went to (``data.split_conversations`` on the same tree ids). The length limit is in
tokens, so it is applied when the pairs are encoded (``encode_pairs``), like SFT's.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from qlora_pipeline.chat_format import IGNORE_INDEX, ChatFormatError
from qlora_pipeline.data import as_message, is_removed, message_tree
from qlora_pipeline.errors import DataError
from qlora_pipeline.layout import RunLayout

PAIR_FIELDS = ("prompt", "chosen", "rejected")


@dataclass
class PairsResult:
    pairs: list[dict]
    drops: Counter


def _rank_order(message: dict) -> tuple:
    """Best first: lowest rank, then the earlier reply, then the id (deterministic)."""
    return (message["rank"], str(message.get("created_date") or ""), message["message_id"])


def _pair_under(parent_path: list[dict], replies: list[dict], drops: Counter) -> dict | None:
    """The pair made from one sibling group, or None (counted in ``drops``)."""
    ranked = sorted((r for r in replies if r["rank"] is not None), key=_rank_order)
    if len(ranked) < 2:
        drops["groups_with_fewer_than_two_ranked_replies"] += 1
        return None
    chosen, rejected = ranked[0], ranked[-1]
    if chosen["rank"] == rejected["rank"]:
        drops["tied_ranks"] += 1
        return None
    return {
        "prompt": [as_message(m) for m in parent_path],
        "chosen": [as_message(chosen)],
        "rejected": [as_message(rejected)],
        "chosen_rank": chosen["rank"],
        "rejected_rank": rejected["rank"],
    }


def build_pairs(rows: Iterable[dict], languages: tuple[str, ...], system_prompt: str | None = None) -> PairsResult:
    """Every preference pair in the trees of ``rows``, with what was skipped and why."""
    drops: Counter = Counter()
    tree = message_tree(rows, Counter())  # (its own counts are the conversations': prepare keeps those)
    wanted = set(languages)
    pairs = []
    for root in tree.roots:
        if root["lang"] not in wanted or is_removed(root) or root["role"] != "prompter":
            continue
        # depth first through kept messages only: a reply under a removed message is never reached
        stack = [[root]]
        while stack:
            path = stack.pop()
            node = path[-1]
            replies = tree.children.get(node["message_id"], [])
            kept = [c for c in replies if not is_removed(c) and c["role"] != node["role"]]
            if node["role"] == "prompter" and kept:
                pair = _pair_under(path, kept, drops)
                if pair is not None:
                    if system_prompt:
                        pair["prompt"].insert(0, {"role": "system", "content": system_prompt})
                    pairs.append({**pair, "tree_id": root["message_tree_id"]})
            stack.extend(path + [child] for child in sorted(kept, key=lambda c: c["message_id"], reverse=True))
    return PairsResult(pairs, drops)


# ---------------------------------------------------------------------------- reading


def _check_pair(pair, where: str) -> dict:
    if not isinstance(pair, dict) or any(name not in pair for name in PAIR_FIELDS):
        raise DataError(f"{where}: a pair needs {', '.join(PAIR_FIELDS)}; run `qlora-pipeline prepare` again")
    for name in PAIR_FIELDS:
        messages = pair[name]
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages)
        ):
            raise DataError(f"{where}: {name!r} must be a non-empty list of {{role, content}} messages")
    for name in ("chosen", "rejected"):
        if len(pair[name]) != 1 or pair[name][0]["role"] != "assistant":
            raise DataError(f"{where}: {name!r} must be one assistant message")
    if pair["prompt"][-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end with a user message")
    return pair


def read_pairs(run_dir: Path, split: str) -> list[dict]:
    """RUN/data/pairs-<split>.jsonl, each line checked; a one-line error names the line."""
    path = RunLayout(run_dir).pairs(split)
    if not path.is_file():
        raise DataError(f"{path} is missing; run `qlora-pipeline prepare --run-dir {run_dir}` again")
    pairs = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                pair = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise DataError(f"{path}:{number}: not a JSON object; run `qlora-pipeline prepare` again") from None
            pairs.append(_check_pair(pair, f"{path}:{number}"))
    return pairs


# ---------------------------------------------------------------------------- tokens


def _completion(encoder, prompt: list[dict], reply: list[dict], prompt_ids: list[int]) -> list[int]:
    """The reply's tokens after ``prompt_ids``: its content and the end-of-turn token that closes
    it, exactly the tokens SFT labels for that turn (``ChatEncoder.encode_with_labels``)."""
    ids, labels = encoder.encode_with_labels(prompt + reply)
    if ids[: len(prompt_ids)] != prompt_ids:
        raise ChatFormatError("the chat template renders a prompt differently before a reply; pairs cannot share it")
    stop = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX) + 1
    return ids[len(prompt_ids) : stop]


def pair_length_limit(cfg) -> int:
    """Longest prompt + reply in tokens a pair may have: ``prefer.max_length``, else ``data.max_seq_len``."""
    return cfg.prefer.max_length or cfg.data.max_seq_len


def encode_pairs(encoder, pairs: list[dict], max_len: int) -> tuple[list[dict], Counter]:
    """Pairs -> {"prompt_ids", "chosen_ids", "rejected_ids"} through the training chat template
    (message contents as plain text); a pair whose prompt and longer reply exceed ``max_len``
    tokens is dropped and counted."""
    examples, counts = [], Counter()
    for pair in pairs:
        prompt_ids = encoder.encode_prompt(pair["prompt"])
        chosen = _completion(encoder, pair["prompt"], pair["chosen"], prompt_ids)
        rejected = _completion(encoder, pair["prompt"], pair["rejected"], prompt_ids)
        if len(prompt_ids) + max(len(chosen), len(rejected)) > max_len:
            counts["dropped_too_long"] += 1
            continue
        counts["kept"] += 1
        examples.append({"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected})
    return examples, counts
