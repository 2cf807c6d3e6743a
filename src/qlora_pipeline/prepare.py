"""The ``prepare`` stage: oasst1 message trees -> RUN/data/{train,val,test}.jsonl and stats.json.

    qlora-pipeline prepare --run-dir runs/demo             # bundled sample (tiny preset)
    qlora-pipeline prepare --run-dir runs/x --data-files my_oasst.jsonl

Reads the rows (``data.load_rows``), keeps one conversation per tree along its best-ranked
replies (``data.build_conversations``), splits by tree (``data.split_conversations``) and writes
the splits atomically, with counts of everything each filter dropped. The preference pairs made
from the same trees' ranks (``pairs.build_pairs``) are split by the same tree ids and written
beside them as ``pairs-{train,val,test}.jsonl`` (the ``prefer`` stage reads them).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from qlora_pipeline.config import DataConfig, PipelineConfig
from qlora_pipeline.data import build_conversations, load_rows, split_conversations
from qlora_pipeline.errors import DataError
from qlora_pipeline.layout import NAMES, SPLITS, RunLayout
from qlora_pipeline.pairs import build_pairs
from qlora_pipeline.paths import atomic_dir, write_json_atomic


def run(cfg: PipelineConfig, run_dir: Path, *, log=print, resume: bool = False) -> dict:
    """The stage: prepare ``cfg.data`` into ``run_dir``; returns the stats."""
    stats = prepare(cfg.data, run_dir)
    log(summary_line(stats))
    return stats


def summary_line(stats: dict) -> str:
    """``conversations train 290 / val 42 / test 50; preference pairs train 239 / ...``"""

    def counts(per_split: dict) -> str:
        return " / ".join(f"{name} {per_split.get(name, 0)}" for name in SPLITS)

    return f"[prepare] conversations {counts(stats['conversations'])}; preference pairs {counts(stats['pairs'])}"


def prepare(cfg: DataConfig, run_dir: Path) -> dict:
    """Write RUN/data/{train,val,test}.jsonl and RUN/data/stats.json; return the stats."""
    source = load_rows(cfg)
    total_rows = sum(len(rows) for rows in source.values())
    if total_rows == 0:
        raise DataError("the data source holds no messages; check data.source / --data-files")
    drops: Counter = Counter()
    pair_drops: Counter = Counter()
    per_source: dict[str, list[dict]] = {}
    pairs_per_source: dict[str, list[dict]] = {}
    for name, rows in source.items():
        result = build_conversations(rows, cfg.languages, cfg.system_prompt)
        drops.update(result.drops)
        per_source[name] = result.conversations
        pairs = build_pairs(rows, cfg.languages, cfg.system_prompt)
        pair_drops.update(pairs.drops)
        pairs_per_source[name] = pairs.pairs
    if not any(per_source.values()):
        reason = max(drops, key=drops.get) if drops else "no trees"
        langs = sorted({r["lang"] for rows in source.values() for r in rows if r["parent_id"] is None and r["lang"]})
        hint = (
            f"; the data's root languages are {', '.join(langs)}, data.languages is {list(cfg.languages)}"
            if reason == "other_language_trees"
            else ""
        )
        raise DataError(
            f"no conversation is left after filtering: the {reason.replace('_', ' ')} filter "
            f"removed the most ({drops[reason]}){hint}"
        )
    splits = split_conversations(per_source, cfg)
    pair_splits = split_conversations(pairs_per_source, cfg)  # the same tree ids go the same way
    if not splits["train"]:
        raise DataError("the train split is empty; lower data.val_fraction/test_fraction or add data")
    stats = {
        "source": cfg.source,
        "rows": total_rows,
        "conversations": {name: len(convs) for name, convs in splits.items()},
        "turns": {name: sum(len(c["messages"]) for c in convs) for name, convs in splits.items()},
        "dropped": dict(sorted(drops.items())),
        "pairs": {name: len(pairs) for name, pairs in pair_splits.items()},
        "pairs_skipped": dict(sorted(pair_drops.items())),
    }
    with atomic_dir(RunLayout(run_dir).data) as tmp:
        for name in SPLITS:
            for path, items in ((NAMES.split(name), splits[name]), (NAMES.pairs(name), pair_splits[name])):
                with open(tmp / path.name, "w", encoding="utf-8") as f:
                    for item in items:
                        f.write(json.dumps(item, ensure_ascii=False) + "\n")
        write_json_atomic(tmp / NAMES.data_stats.name, stats)
    return stats
