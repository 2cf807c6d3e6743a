"""oasst1 rows -> conversations -> splits -> token ids: what the stages share about the data
(the ``prepare`` stage itself is ``qlora_pipeline.prepare``).

oasst1 stores messages, not conversations: every prompt has several ranked replies, each of
which may have follow-ups. We walk each tree from its root along the best-ranked child
(lowest ``rank``; unranked after ranked; ties by creation date, then id) and keep the
conversation that path spells. Deleted and review-rejected messages are dropped with
everything under them; every drop is counted in ``stats.json``. Splits are made per tree
so that no tree's messages are seen in two splits.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from qlora_pipeline.config import DataConfig
from qlora_pipeline.errors import DataError
from qlora_pipeline.layout import SPLITS, RunLayout

REQUIRED_FIELDS = {
    "message_id": str,
    "parent_id": (str, type(None)),
    "message_tree_id": str,
    "role": str,
    "text": str,
    "lang": (str, type(None)),
    "rank": (int, type(None)),
    "deleted": (bool, type(None)),
    "review_result": (bool, type(None)),
}
ROLE_MAP = {"prompter": "user", "assistant": "assistant"}


def sample_data_path() -> Path:
    return Path(str(resources.files("qlora_pipeline") / "sample_data" / "oasst1_sample.jsonl"))


# ---------------------------------------------------------------------------- reading rows


def _check_row(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object (one oasst1 message), got {type(row).__name__}")
    for name, kinds in REQUIRED_FIELDS.items():
        if name not in row:
            raise DataError(
                f"{where}: missing required oasst1 field {name!r}; every row needs {', '.join(REQUIRED_FIELDS)}"
            )
        value = row[name]
        if isinstance(value, bool) and name == "rank":  # bool is an int subclass
            value = "bool"
        if not isinstance(value, kinds):
            expected = " or ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
            raise DataError(
                f"{where}: field {name!r} is {type(row[name]).__name__} ({row[name]!r}), expected {expected}"
            )
    if row["role"] not in ROLE_MAP:
        raise DataError(f"{where}: role {row['role']!r} is not an oasst1 role; use prompter or assistant")
    return row


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataError(f"{path}:{number}: not valid UTF-8; re-save the file as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.rstrip("\r\n"))  # so an unclosed line's column is its end
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{path}:{number}: malformed JSON ({exc.msg} at column {exc.colno}); "
                        "each line must be one JSON object"
                    ) from None
                rows.append(_check_row(row, f"{path}:{number}"))
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist; check --data-files") from None
    except IsADirectoryError:
        raise DataError(f"data file {path} is a folder; give .jsonl/.json/.parquet files") from None
    return rows


def read_rows_file(path: Path) -> list[dict]:
    """oasst1 message rows from a .jsonl, .json (list of rows) or .parquet file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return read_jsonl(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check --data-files")
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{path}: not valid UTF-8; re-save the file as UTF-8") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno}); fix the file") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of oasst1 messages")
        return [_check_row(row, f"{path}[{i}]") for i, row in enumerate(data)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several unrelated types for bad files
            raise DataError(
                f"{path}: not a readable parquet file ({exc.__class__.__name__}); fix or re-export it"
            ) from None
        return [_check_row(row, f"{path} row {i}") for i, row in enumerate(table.to_pylist())]
    raise DataError(f"data file {path} has unknown type {suffix or '(none)'}; use .jsonl, .json or .parquet")


def load_rows(cfg: DataConfig) -> dict[str, list[dict]]:
    """Message rows per source split: {"train": [...]} or {"train": [...], "validation": [...]}."""
    if cfg.source == "sample":
        return {"train": read_jsonl(sample_data_path())}
    if cfg.source == "files":
        rows: list[dict] = []
        for name in cfg.data_files:
            rows.extend(read_rows_file(Path(name)))
        return {"train": rows}
    # The hub: the same schema through `datasets`; oasst1 has train and validation splits.
    from datasets import load_dataset

    try:
        dataset = load_dataset(cfg.hub_dataset)
    except Exception as exc:  # offline, unknown id, gated: datasets raises many types
        raise DataError(
            f"could not load {cfg.hub_dataset!r} from the Hugging Face Hub "
            f"({exc.__class__.__name__}); check the id and your connection, or use "
            "data.source=files with local files"
        ) from None
    out = {}
    for split in dataset:
        out[split] = [_check_row(row, f"{cfg.hub_dataset}[{split}][{i}]") for i, row in enumerate(dataset[split])]
    return out


# ---------------------------------------------------------------------------- trees


@dataclass
class ForestResult:
    conversations: list[dict]
    drops: Counter


def _child_order(message: dict) -> tuple:
    rank = message["rank"]
    return (
        rank is None,
        rank if rank is not None else 0,
        str(message.get("created_date") or ""),
        message["message_id"],
    )


def _check_no_cycles(by_id: dict[str, dict]) -> None:
    state: dict[str, int] = {}
    for start in by_id:
        path = []
        node = start
        while node in by_id and state.get(node) is None:
            state[node] = 1
            path.append(node)
            node = by_id[node]["parent_id"]
        if node in by_id and state.get(node) == 1:
            raise DataError(
                f"message {node} is its own ancestor (a parent_id cycle); fix the parent_id values in the data"
            )
        for visited in path:
            state[visited] = 2


@dataclass
class MessageTree:
    """oasst1 rows indexed as trees: each message by id, its children, the roots."""

    by_id: dict[str, dict]
    children: dict[str, list[dict]]
    roots: list[dict]


def message_tree(rows: Iterable[dict], drops: Counter) -> MessageTree:
    """Rows as trees; a repeated message id (the first one is kept) and a reply whose parent is
    not in the data are counted in ``drops``. Roots come oldest first (then by id)."""
    by_id: dict[str, dict] = {}
    for row in rows:
        if row["message_id"] in by_id:
            drops["duplicate_message_ids"] += 1
            continue
        by_id[row["message_id"]] = row
    children: dict[str, list[dict]] = defaultdict(list)
    roots = []
    for row in by_id.values():
        parent = row["parent_id"]
        if parent is None:
            roots.append(row)
        elif parent in by_id:
            children[parent].append(row)
        else:
            drops["orphan_messages"] += 1
    roots.sort(key=lambda r: (str(r.get("created_date") or ""), r["message_id"]))
    return MessageTree(by_id, children, roots)


def is_removed(message: dict) -> bool:
    """Deleted, or rejected by review: dropped with everything under it."""
    return bool(message["deleted"]) or message["review_result"] is False


def as_message(row: dict) -> dict:
    """An oasst1 row as a chat message (prompter -> user)."""
    return {"role": ROLE_MAP[row["role"]], "content": row["text"]}


def build_conversations(
    rows: Iterable[dict], languages: tuple[str, ...], system_prompt: str | None = None
) -> ForestResult:
    """Turn oasst1 message rows into best-path conversations, counting everything dropped."""
    drops: Counter = Counter()
    tree = message_tree(rows, drops)
    _check_no_cycles(tree.by_id)
    children = tree.children

    def removed(message: dict) -> bool:
        if is_removed(message):
            drops["deleted_messages" if message["deleted"] else "rejected_messages"] += 1
            return True
        return False

    wanted = set(languages)
    conversations = []
    seen: set[str] = set()
    for root in tree.roots:
        if root["lang"] not in wanted:
            drops["other_language_trees"] += 1
            continue
        if removed(root):
            drops["removed_root_trees"] += 1
            continue
        if root["role"] != "prompter":
            drops["trees_not_starting_with_prompt"] += 1
            continue
        path = [root]
        node = root
        while True:
            candidates = [c for c in children.get(node["message_id"], []) if not removed(c)]
            candidates = [c for c in candidates if c["role"] != node["role"]]  # roles must alternate
            if not candidates:
                break
            node = min(candidates, key=_child_order)
            path.append(node)
        if path[-1]["role"] == "prompter":
            path.pop()
            drops["trailing_user_turns"] += 1
        if len(path) < 2:
            drops["trees_without_reply"] += 1
            continue
        messages = [as_message(m) for m in path]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        key = json.dumps(messages, ensure_ascii=False)
        if key in seen:
            drops["duplicate_conversations"] += 1
            continue
        seen.add(key)
        conversations.append({"messages": messages, "tree_id": root["message_tree_id"]})
    return ForestResult(conversations, drops)


def tree_split(tree_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split of one tree, independent of row order."""
    digest = hashlib.sha256(f"{seed}:{tree_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def split_conversations(source_splits: dict[str, list[dict]], cfg: DataConfig) -> dict[str, list[dict]]:
    """Train/val/test by tree. A source validation split (the hub's) is halved into val and test."""
    out: dict[str, list[dict]] = {name: [] for name in SPLITS}
    if "validation" in source_splits:
        out["train"] = list(source_splits["train"])
        for conv in source_splits["validation"]:
            half = tree_split(conv["tree_id"], cfg.seed, 0.5, 0.5)
            out["test" if half == "test" else "val"].append(conv)
    else:
        for conv in source_splits["train"]:
            out[tree_split(conv["tree_id"], cfg.seed, cfg.val_fraction, cfg.test_fraction)].append(conv)
    if cfg.max_conversations is not None:
        out = {name: convs[: cfg.max_conversations] for name, convs in out.items()}
    return out


def read_split(run_dir: Path, split: str) -> list[dict]:
    path = RunLayout(run_dir).split(split)
    if not path.is_file():
        raise DataError(f"{path} is missing; run `qlora-pipeline prepare --run-dir {run_dir}` first")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------- tokenizing


def _fit_turns(encoder, messages: list[dict], max_len: int) -> tuple[list[int], list[int]] | None:
    """Longest prefix of whole user/assistant pairs (system turn kept) that fits ``max_len``."""
    head = 1 if messages and messages[0]["role"] == "system" else 0
    pairs = (len(messages) - head) // 2
    for keep in range(pairs, 0, -1):
        ids, labels = encoder.encode_with_labels(messages[: head + 2 * keep])
        if len(ids) <= max_len:
            return ids, labels
    return None


def tokenize_conversations(
    encoder, conversations: list[dict], max_len: int, overlong: str = "truncate", split: str | None = None
) -> tuple[list[dict], Counter]:
    """Conversations -> {"input_ids", "labels"} examples; overlong ones cut at a turn or dropped.

    With ``split`` named, a split that had conversations and keeps none is an error saying so.
    """
    examples, counts = [], Counter()
    for conv in conversations:
        ids, labels = encoder.encode_with_labels(conv["messages"])
        if len(ids) > max_len:
            fitted = _fit_turns(encoder, conv["messages"], max_len) if overlong == "truncate" else None
            if fitted is None:
                counts["dropped_too_long"] += 1
                continue
            counts["truncated_at_turn"] += 1
            ids, labels = fitted
        counts["kept"] += 1
        examples.append({"input_ids": ids, "labels": labels})
    if split and conversations and not examples:
        fix = "raise it" if overlong == "truncate" else "raise it or use data.overlong=truncate"
        raise DataError(
            f"every {split} conversation ({len(conversations)}) is longer than "
            f"data.max_seq_len={max_len} tokens even cut at its first turn; {fix}"
        )
    return examples, counts
