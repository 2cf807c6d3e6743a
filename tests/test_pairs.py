"""Preference pairs from oasst1's ranks, one test per rule, on hand-built trees (test_data's Forest)."""

from __future__ import annotations

import json

import pytest

from qlora_pipeline.chat_format import ChatEncoder
from qlora_pipeline.config import DataConfig
from qlora_pipeline.errors import DataError
from qlora_pipeline.layout import SPLITS, RunLayout
from qlora_pipeline.pairs import build_pairs, encode_pairs, read_pairs
from qlora_pipeline.prepare import prepare
from tests.test_data import Forest


def sibling_group(f: Forest, root: str, ranks: dict[str, int | None], **kwargs) -> None:
    f.m(root, f"question {root}?", **kwargs)
    for name, rank in ranks.items():
        f.m(name, f"reply {name}", parent=root, rank=rank)


def texts(pair: dict) -> tuple[str, str]:
    return pair["chosen"][0]["content"], pair["rejected"][0]["content"]


def test_best_against_worst_in_trl_conversational_format():
    f = Forest()
    sibling_group(f, "q", {"mid": 1, "best": 0, "worst": 2})
    [pair] = build_pairs(f.rows, ("en",)).pairs
    assert texts(pair) == ("reply best", "reply worst")
    assert pair["prompt"] == [{"role": "user", "content": "question q?"}]
    assert pair["chosen"] == [{"role": "assistant", "content": "reply best"}]
    assert (pair["chosen_rank"], pair["rejected_rank"], pair["tree_id"]) == (0, 2, "q")


def test_ties_make_no_pair_but_a_tie_for_best_still_has_a_worst():
    f = Forest()
    sibling_group(f, "tie", {"a": 0, "b": 0})
    sibling_group(f, "half", {"c": 0, "d": 0, "e": 1})
    result = build_pairs(f.rows, ("en",))
    assert [texts(p) for p in result.pairs] == [("reply c", "reply e")]  # the earlier of the two bests
    assert result.drops["tied_ranks"] == 1


def test_unranked_siblings_do_not_count():
    f = Forest()
    sibling_group(f, "q", {"ranked": 0, "unranked": None, "also_unranked": None})
    result = build_pairs(f.rows, ("en",))
    assert result.pairs == []
    assert result.drops["groups_with_fewer_than_two_ranked_replies"] == 1
    g = Forest()
    sibling_group(g, "q", {"a": 1, "unranked": None, "b": 0})
    assert [texts(p) for p in build_pairs(g.rows, ("en",)).pairs] == [("reply b", "reply a")]


def test_deleted_and_review_rejected_replies_are_skipped():
    f = Forest()
    f.m("q", "question?")
    f.m("deleted", "the best, deleted", parent="q", rank=0, deleted=True)
    f.m("rejected", "the worst, rejected by review", parent="q", rank=3, review=False)
    f.m("good", "good", parent="q", rank=1)
    f.m("fair", "fair", parent="q", rank=2)
    [pair] = build_pairs(f.rows, ("en",)).pairs
    assert texts(pair) == ("good", "fair")


def test_replies_under_a_deleted_parent_make_no_pair():
    f = Forest()
    f.m("q", "question?")
    f.m("a", "answer", parent="q", rank=0)
    f.m("gone", "follow-up, deleted", parent="a", deleted=True)
    f.m("x", "reply x", parent="gone", rank=0)
    f.m("y", "reply y", parent="gone", rank=1)
    assert build_pairs(f.rows, ("en",)).pairs == []


def test_a_follow_up_pair_carries_the_whole_conversation_as_its_prompt():
    f = Forest()
    f.m("q", "question?")
    f.m("a", "answer", parent="q", rank=0)
    f.m("q2", "and then?", parent="a")
    f.m("x", "reply x", parent="q2", rank=1)
    f.m("y", "reply y", parent="q2", rank=0)
    [pair] = build_pairs(f.rows, ("en",), system_prompt="Be brief.").pairs
    assert [m["role"] for m in pair["prompt"]] == ["system", "user", "assistant", "user"]
    assert pair["prompt"][-1]["content"] == "and then?"
    assert texts(pair) == ("reply y", "reply x")


def test_other_languages_and_removed_roots_make_no_pairs():
    f = Forest()
    sibling_group(f, "de", {"a": 0, "b": 1}, lang="de")
    sibling_group(f, "gone", {"c": 0, "d": 1}, deleted=True)
    assert build_pairs(f.rows, ("en",)).pairs == []
    assert len(build_pairs(f.rows, ("en", "de")).pairs) == 1


def test_a_prompt_over_the_length_limit_is_dropped_when_encoded(tiny_tokenizer):
    f = Forest()
    sibling_group(f, "short", {"a": 0, "b": 1})
    f.m("long", "word " * 300)
    f.m("c", "reply c", parent="long", rank=0)
    f.m("d", "reply d", parent="long", rank=1)
    pairs = build_pairs(f.rows, ("en",)).pairs
    assert len(pairs) == 2
    encoder = ChatEncoder.from_hf(tiny_tokenizer)
    examples, counts = encode_pairs(encoder, pairs, max_len=64)
    assert counts == {"kept": 1, "dropped_too_long": 1}
    [example] = examples
    # the chosen completion is exactly what SFT labels for that reply: its content and <|end|>
    ids, labels = encoder.encode_with_labels(pairs[0]["prompt"] + pairs[0]["chosen"])
    prompt_and_reply = example["prompt_ids"] + example["chosen_ids"]
    assert ids[: len(prompt_and_reply)] == prompt_and_reply
    assert example["prompt_ids"] == encoder.encode_prompt(pairs[0]["prompt"])
    assert [t for t in labels if t != -100] == example["chosen_ids"]
    assert example["chosen_ids"][-1] == encoder.end_of_turn_id


def test_no_tree_has_pairs_in_two_splits_and_pairs_follow_their_conversations(tmp_path):
    f = Forest()
    for i in range(60):
        sibling_group(f, f"t{i}", {f"t{i}-a": 0, f"t{i}-b": 1})
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in f.rows))
    stats = prepare(DataConfig(source="files", data_files=(str(data),), val_fraction=0.2, test_fraction=0.2), tmp_path)
    trees = {split: {p["tree_id"] for p in read_pairs(tmp_path, split)} for split in SPLITS}
    assert all(trees[s] for s in SPLITS)
    assert (
        not (trees["train"] & trees["val"])
        and not (trees["train"] & trees["test"])
        and not (trees["val"] & trees["test"])
    )
    layout = RunLayout(tmp_path)
    for split in SPLITS:
        conversations = {json.loads(line)["tree_id"] for line in layout.split(split).read_text().splitlines()}
        assert trees[split] == conversations
    assert stats["pairs"] == {s: len(trees[s]) for s in SPLITS}


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "not a JSON object"),
        ('{"prompt": [], "chosen": [], "rejected": []}', "non-empty list"),
        (
            '{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}], '
            '"rejected": [{"role": "assistant", "content": "b"}]}',
            "one assistant message",
        ),  # fmt: skip
        ('{"prompt": [{"role": "user", "content": "q"}]}', "a pair needs prompt, chosen, rejected"),
    ],
)
def test_a_bad_pair_file_is_a_one_line_error_naming_the_line(tmp_path, line, message):
    path = RunLayout(tmp_path).pairs("train")
    path.parent.mkdir(parents=True)
    good = {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    path.write_text(json.dumps(good) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message) as info:
        read_pairs(tmp_path, "train")
    assert f"{path}:2" in str(info.value) and "\n" not in str(info.value)


def test_missing_pair_files_say_to_prepare_again(tmp_path):
    with pytest.raises(DataError, match="run `qlora-pipeline prepare"):
        read_pairs(tmp_path, "val")
