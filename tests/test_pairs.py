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
        (
            '{"prompt": [{"role": "assistant", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}], '
            '"rejected": [{"role": "assistant", "content": "b"}]}',
            "the prompt must end with a user message",
        ),  # fmt: skip
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


def test_a_tie_for_best_goes_to_the_earlier_reply_whatever_its_id():
    f = Forest()
    f.m("q", "question?")
    f.m("z-first", "reply z", parent="q", rank=0)  # written first, the larger id
    f.m("a-second", "reply a", parent="q", rank=0)
    f.m("w", "reply w", parent="q", rank=2)
    [pair] = build_pairs(f.rows, ("en",)).pairs
    assert texts(pair) == ("reply z", "reply w")


def test_every_skipped_group_is_counted_and_ranked_follow_up_questions_make_no_pair():
    """oasst1 ranks sibling questions too: those are never a chosen/rejected reply; and each skipped
    sibling group counts, so prepare's summary says how many."""
    f = Forest()
    for name in ("t1", "t2"):
        sibling_group(f, name, {f"{name}-a": 0, f"{name}-b": 0})  # tied
    for name in ("u1", "u2", "u3"):
        sibling_group(f, name, {f"{name}-a": 0})  # one ranked reply
    f.m("q", "question?")
    f.m("a", "answer", parent="q", rank=0)
    f.m("f1", "follow-up one?", parent="a", rank=0)
    f.m("f2", "follow-up two?", parent="a", rank=1)
    result = build_pairs(f.rows, ("en",))
    assert result.drops["tied_ranks"] == 2
    assert result.drops["groups_with_fewer_than_two_ranked_replies"] == 4  # u1-u3 and q's single answer
    assert all(p["chosen"][0]["role"] == "assistant" for p in result.pairs)
    assert result.pairs == []


def test_a_skipped_root_does_not_end_the_search_and_the_system_prompt_is_a_message():
    f = Forest()
    sibling_group(f, "a-de", {"x": 0, "y": 1}, lang="de")  # first, skipped
    sibling_group(f, "b-en", {"p": 0, "r": 1})
    [pair] = build_pairs(f.rows, ("en",), system_prompt="Be brief.").pairs
    assert pair["tree_id"] == "b-en"
    assert pair["prompt"][0] == {"role": "system", "content": "Be brief."}


def test_encoding_counts_every_pair_and_keeps_a_pair_of_exactly_the_limit(tiny_tokenizer):
    """The limit is prompt + the longer reply <= max_len; a dropped pair does not stop the ones
    after it; the examples carry the three columns TRL's DPOTrainer reads."""
    f = Forest()
    for name in ("long1", "long2"):
        f.m(name, "word " * 300)
        f.m(f"{name}-c", "c", parent=name, rank=0)
        f.m(f"{name}-d", "d", parent=name, rank=1)
    sibling_group(f, "s1", {"s1-a": 0, "s1-b": 1})
    sibling_group(f, "s2", {"s2-a": 0, "s2-b": 1})
    pairs = build_pairs(f.rows, ("en",)).pairs
    encoder = ChatEncoder.from_hf(tiny_tokenizer)
    ordered = sorted(pairs, key=lambda p: p["tree_id"])  # long1, long2, s1, s2
    full, _ = encode_pairs(encoder, ordered[2:3], max_len=10_000)
    [one] = full
    exact = len(one["prompt_ids"]) + max(len(one["chosen_ids"]), len(one["rejected_ids"]))
    examples, counts = encode_pairs(encoder, ordered, max_len=exact)
    assert counts == {"dropped_too_long": 2, "kept": 2}
    assert [set(e) for e in examples] == [{"prompt_ids", "chosen_ids", "rejected_ids"}] * 2
    assert examples[0] == one
    _, counts = encode_pairs(encoder, ordered[2:3], max_len=exact - 1)
    assert counts == {"dropped_too_long": 1}


@pytest.mark.parametrize(
    "message",
    [{"role": "user", "content": 5}, {"content": "no role"}, {"role": "user"}, "just text"],
    ids=["content-not-text", "no-role", "no-content", "not-a-message"],
)
def test_a_pair_message_without_a_role_and_text_content_is_refused(tmp_path, message):
    path = RunLayout(tmp_path).pairs("train")
    path.parent.mkdir(parents=True)
    pair = {"prompt": [message], "chosen": [{"role": "assistant", "content": "a"}]}
    pair["rejected"] = [{"role": "assistant", "content": "b"}]
    path.write_text(json.dumps(pair) + "\n")
    with pytest.raises(DataError, match="must be a non-empty list of"):
        read_pairs(tmp_path, "train")


def test_blank_lines_between_pairs_are_skipped_not_the_end(tmp_path):
    path = RunLayout(tmp_path).pairs("train")
    path.parent.mkdir(parents=True)
    pair = {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    path.write_text(json.dumps(pair) + "\n\n  \n" + json.dumps(pair) + "\n")
    assert len(read_pairs(tmp_path, "train")) == 2


def test_the_pair_length_limit_is_prefer_max_length_else_the_training_one():
    from conftest import make_config

    from qlora_pipeline.pairs import pair_length_limit

    assert pair_length_limit(make_config("data.max_seq_len=300")) == 300
    assert pair_length_limit(make_config("data.max_seq_len=300", "prefer.max_length=120")) == 120
