"""The prepare stage's rules, one test per rule, on small hand-made oasst1 trees."""

from __future__ import annotations

import json

import pytest

from qlora_pipeline.config import DataConfig
from qlora_pipeline.data import build_conversations, read_split, split_conversations, tree_split
from qlora_pipeline.errors import DataError
from qlora_pipeline.prepare import prepare


class Forest:
    """Builds oasst1 rows with readable ids: m("a", ...) makes message 'a'."""

    def __init__(self):
        self.rows = []
        self._clock = 0

    def m(self, mid, text, parent=None, role=None, rank=None, lang="en", deleted=False, review=True, tree=None):
        parent_row = next((r for r in self.rows if r["message_id"] == parent), None)
        if role is None:
            role = "prompter" if parent_row is None or parent_row["role"] == "assistant" else "assistant"
        self._clock += 1
        self.rows.append(
            {
                "message_id": mid,
                "parent_id": parent,
                "message_tree_id": tree or (parent_row["message_tree_id"] if parent_row else mid),
                "role": role,
                "text": text,
                "lang": lang,
                "rank": rank,
                "deleted": deleted,
                "review_result": review,
                "created_date": f"2023-01-01T00:00:{self._clock:02d}",
            }
        )
        return self


def texts(result):
    return [[m["content"] for m in c["messages"]] for c in result.conversations]


def test_best_child_is_lowest_rank():
    f = Forest().m("q", "Q").m("a2", "second", "q", rank=1).m("a1", "first", "q", rank=0).m("a3", "third", "q", rank=2)
    assert texts(build_conversations(f.rows, ("en",))) == [["Q", "first"]]


def test_unranked_children_come_after_ranked():
    f = Forest().m("q", "Q").m("u", "unranked", "q", rank=None).m("r", "ranked", "q", rank=3)
    assert texts(build_conversations(f.rows, ("en",))) == [["Q", "ranked"]]


def test_ties_broken_by_creation_date_then_id_independent_of_row_order():
    f = Forest().m("q", "Q").m("b", "older", "q").m("a", "newer", "q")
    first = texts(build_conversations(f.rows, ("en",)))
    again = texts(build_conversations(list(reversed(f.rows)), ("en",)))
    assert first == again == [["Q", "older"]]


def test_path_follows_best_child_at_every_depth():
    f = (
        Forest()
        .m("q", "Q")
        .m("a0", "A0", "q", rank=0)
        .m("a1", "A1", "q", rank=1)
        .m("f1", "follow-up worse", "a0", rank=1)
        .m("f0", "follow-up best", "a0", rank=0)
        .m("b", "answer to best", "f0", rank=0)
        .m("x", "under the worse reply", "a1")
    )
    assert texts(build_conversations(f.rows, ("en",))) == [["Q", "A0", "follow-up best", "answer to best"]]


def test_deleted_messages_are_dropped_with_their_descendants():
    f = (
        Forest()
        .m("q", "Q")
        .m("a0", "deleted best", "q", rank=0, deleted=True)
        .m("a1", "kept", "q", rank=1)
        .m("f", "follow-up under deleted", "a0")
        .m("g", "its answer", "f")
    )
    result = build_conversations(f.rows, ("en",))
    assert texts(result) == [["Q", "kept"]]
    assert result.drops["deleted_messages"] == 1


def test_review_rejected_messages_are_dropped_with_their_descendants():
    f = (
        Forest()
        .m("q", "Q")
        .m("a0", "spam", "q", rank=0, review=False)
        .m("a1", "good", "q", rank=1)
        .m("f", "more", "a0")
    )
    result = build_conversations(f.rows, ("en",))
    assert texts(result) == [["Q", "good"]]
    assert result.drops["rejected_messages"] == 1


def test_deleted_root_removes_the_whole_tree():
    f = Forest().m("q", "Q", deleted=True).m("a", "A", "q")
    result = build_conversations(f.rows, ("en",))
    assert result.conversations == [] and result.drops["removed_root_trees"] == 1


def test_language_is_taken_from_the_root():
    f = (
        Forest()
        .m("q", "Frage", lang="de")
        .m("a", "Antwort", "q", lang="de")
        .m("q2", "Question")
        .m("a2", "Answer", "q2", lang="de")
    )  # an English tree with an odd reply lang
    result = build_conversations(f.rows, ("en",))
    assert texts(result) == [["Question", "Answer"]]
    assert result.drops["other_language_trees"] == 1
    assert texts(build_conversations(f.rows, ("de", "en"))) == [["Frage", "Antwort"], ["Question", "Answer"]]


def test_trailing_user_turn_is_dropped():
    f = Forest().m("q", "Q").m("a", "A", "q").m("t", "thanks", "a")
    result = build_conversations(f.rows, ("en",))
    assert texts(result) == [["Q", "A"]] and result.drops["trailing_user_turns"] == 1


def test_trees_without_a_reply_are_dropped():
    f = Forest().m("q", "nobody answered")
    result = build_conversations(f.rows, ("en",))
    assert result.conversations == [] and result.drops["trees_without_reply"] == 1


def test_exact_duplicate_conversations_are_kept_once():
    f = Forest().m("q1", "Q").m("a1", "A", "q1").m("q2", "Q").m("a2", "A", "q2").m("q3", "Q").m("a3", "B", "q3")
    result = build_conversations(f.rows, ("en",))
    assert texts(result) == [["Q", "A"], ["Q", "B"]] and result.drops["duplicate_conversations"] == 1


def test_orphans_are_counted_and_left_out():
    f = Forest().m("q", "Q").m("a", "A", "q")
    f.rows.append({**f.rows[1], "message_id": "o", "parent_id": "missing", "text": "orphan"})
    result = build_conversations(f.rows, ("en",))
    assert texts(result) == [["Q", "A"]] and result.drops["orphan_messages"] == 1


def test_roles_are_mapped_and_system_prompt_prepended():
    f = Forest().m("q", "Q").m("a", "A", "q")
    conv = build_conversations(f.rows, ("en",), system_prompt="Be kind.").conversations[0]
    assert conv["messages"] == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    assert conv["tree_id"] == "q"


def test_parent_cycle_is_a_clear_error():
    f = Forest().m("q", "Q").m("a", "A", "q")
    f.rows += [{**f.rows[1], "message_id": "x", "parent_id": "y"}, {**f.rows[1], "message_id": "y", "parent_id": "x"}]
    with pytest.raises(DataError, match="cycle"):
        build_conversations(f.rows, ("en",))


def test_split_is_by_tree_deterministic_and_order_independent():
    convs = [{"messages": [], "tree_id": f"tree-{i}"} for i in range(400)]
    cfg = DataConfig(val_fraction=0.1, test_fraction=0.1)
    a = split_conversations({"train": convs}, cfg)
    b = split_conversations({"train": list(reversed(convs))}, cfg)
    assert {k: sorted(c["tree_id"] for c in v) for k, v in a.items()} == {
        k: sorted(c["tree_id"] for c in v) for k, v in b.items()
    }
    assert 20 <= len(a["val"]) <= 60 and 20 <= len(a["test"]) <= 60
    assert tree_split("tree-1", 0, 0.1, 0.1) == tree_split("tree-1", 0, 0.1, 0.1)


def test_a_source_validation_split_becomes_val_and_test():
    train = [{"messages": [], "tree_id": f"t{i}"} for i in range(50)]
    valid = [{"messages": [], "tree_id": f"v{i}"} for i in range(100)]
    out = split_conversations({"train": train, "validation": valid}, DataConfig())
    assert [c["tree_id"] for c in out["train"]] == [c["tree_id"] for c in train]
    assert sorted(c["tree_id"] for c in out["val"] + out["test"]) == sorted(c["tree_id"] for c in valid)
    assert out["val"] and out["test"]


def test_prepare_on_the_bundled_sample(tmp_path):
    stats = prepare(DataConfig(), tmp_path)
    splits = {name: read_split(tmp_path, name) for name in ("train", "val", "test")}
    trees = [{c["tree_id"] for c in convs} for convs in splits.values()]
    assert not (trees[0] & trees[1]) and not (trees[0] & trees[2]) and not (trees[1] & trees[2])
    assert stats["conversations"] == {k: len(v) for k, v in splits.items()}
    assert json.loads((tmp_path / "data" / "stats.json").read_text()) == stats
    # The sample exercises every filter.
    for reason in (
        "deleted_messages",
        "rejected_messages",
        "other_language_trees",
        "orphan_messages",
        "trailing_user_turns",
        "duplicate_conversations",
        "trees_without_reply",
    ):
        assert stats["dropped"].get(reason, 0) > 0, reason
    assert len(splits["train"]) >= 250
    for conv in splits["train"]:
        roles = [m["role"] for m in conv["messages"]]
        assert roles[0] == "user" and roles[-1] == "assistant"
        assert all(a != b for a, b in zip(roles, roles[1:]))


def test_local_files_use_the_same_code(tmp_path):
    f = Forest().m("q", "Q").m("a", "A", "q").m("q2", "Q2").m("a2", "A2", "q2")
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in f.rows))
    stats = prepare(
        DataConfig(source="files", data_files=(str(path),), val_fraction=0.0, test_fraction=0.0), tmp_path / "run"
    )
    assert stats["conversations"]["train"] == 2


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"message_id": "a"', "rows.jsonl:2: malformed JSON"),
        ('{"message_id": "a"}', "rows.jsonl:2: missing required oasst1 field 'parent_id'"),
        ("[1, 2]", "rows.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_rows_name_the_file_and_line(tmp_path, line, message):
    good = json.dumps(Forest().m("q", "Q").rows[0])
    path = tmp_path / "rows.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        prepare(DataConfig(source="files", data_files=(str(path),)), tmp_path / "run")
    assert not (tmp_path / "run" / "data").exists()


def test_everything_filtered_names_the_filter(tmp_path):
    f = Forest().m("q", "Frage", lang="de").m("a", "Antwort", "q", lang="de")
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in f.rows))
    with pytest.raises(DataError, match="other language trees.*root languages are de"):
        prepare(DataConfig(source="files", data_files=(str(path),)), tmp_path / "run")


def test_the_split_is_the_same_in_every_process():
    """The split must not depend on Python's per-process string hashing (PYTHONHASHSEED)."""
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json; from qlora_pipeline.data import tree_split; "
        "print(json.dumps([tree_split(f'tree-{i}', 0, 0.1, 0.1) for i in range(200)]))"
    )
    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "PYTHONHASHSEED": seed},
            ).stdout
        )
        for seed in ("1", "2")
    ]
    assert runs[0] == runs[1] and {"train", "val", "test"} <= set(runs[0])


def test_the_data_seed_draws_another_split_and_max_conversations_caps_each():
    convs = [{"messages": [], "tree_id": f"tree-{i}"} for i in range(400)]
    valid = [{"messages": [], "tree_id": f"v{i}"} for i in range(200)]

    def trees(out):
        return {k: sorted(c["tree_id"] for c in v) for k, v in out.items()}

    for source in ({"train": convs}, {"train": convs, "validation": valid}):
        one, two = (split_conversations(source, DataConfig(seed=s)) for s in (0, 1))
        assert trees(one) != trees(two) and trees(one) == trees(split_conversations(source, DataConfig(seed=0)))
    capped = split_conversations({"train": convs}, DataConfig(max_conversations=5, val_fraction=0.2, test_fraction=0.2))
    assert {k: len(v) for k, v in capped.items()} == {"train": 5, "val": 5, "test": 5}
