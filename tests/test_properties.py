"""Property tests of the data path (Hypothesis): random oasst1 forests and random message texts.

Trees: random branching, ranks (ties and unranked included), deletions, review verdicts,
languages and creation dates; a few replies break the prompter/assistant alternation, as stray
rows do. Every conversation that comes out must alternate user/assistant from a user turn to an
assistant turn, use one tree only, follow the best-ranked path to its end, and every tree that
has an answerable root must give exactly one. Texts: anything, special-token strings, newlines
and non-ASCII included; the label mask must cover exactly the assistant spans, found again by
rendering each prefix with the template's generation prompt.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_pipeline.chat_format import IGNORE_INDEX, ChatEncoder
from qlora_pipeline.data import build_conversations

LANGS = ("en", "de", "fr")
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def forests(draw) -> list[dict]:
    rows = []
    for t in range(draw(st.integers(1, 3))):
        tree = f"t{t}"
        nodes: list[dict] = []
        for i in range(draw(st.integers(2, 16))):
            parent = draw(st.sampled_from(nodes)) if nodes else None
            if parent is None:
                role = draw(st.sampled_from(["prompter", "prompter", "prompter", "assistant"]))
            else:
                other = "assistant" if parent["role"] == "prompter" else "prompter"
                role = other if draw(st.integers(0, 5)) else parent["role"]  # 1 in 6 breaks alternation
            node = {
                "message_id": f"{tree}m{i}",
                "parent_id": parent["message_id"] if parent else None,
                "message_tree_id": tree,
                "role": role,
                "text": f"text of {tree}m{i}",
                "lang": draw(st.sampled_from(LANGS)),
                "rank": draw(st.sampled_from([None, 0, 0, 1])),  # ties are common
                "deleted": draw(st.sampled_from([False, False, False, False, True])),
                "review_result": draw(st.sampled_from([True, True, True, None, False])),
                "created_date": f"2023-01-0{draw(st.integers(1, 3))}",
            }
            nodes.append(node)
        rows += nodes
    draw(st.randoms()).shuffle(rows)  # row order must not matter
    return rows


def removed(row: dict) -> bool:
    return bool(row["deleted"]) or row["review_result"] is False


def eligible_children(rows: list[dict], parent: dict) -> list[dict]:
    return [
        r for r in rows if r["parent_id"] == parent["message_id"] and not removed(r) and r["role"] != parent["role"]
    ]


def best(children: list[dict]) -> dict:
    """The documented order: lowest rank; unranked after ranked; ties by creation date, then id."""
    return min(children, key=lambda r: (r["rank"] is None, r["rank"] or 0, r["created_date"], r["message_id"]))


@SETTINGS
@given(
    rows=forests(),
    languages=st.lists(st.sampled_from(LANGS), min_size=1, max_size=3, unique=True),
    system=st.sampled_from([None, "Be kind."]),
)
def test_conversations_follow_the_best_ranked_path_of_one_tree(rows, languages, system):
    result = build_conversations(rows, tuple(languages), system_prompt=system)
    by_text = {r["text"]: r for r in rows}
    for conv in result.conversations:
        messages = conv["messages"]
        if system:
            assert messages[0] == {"role": "system", "content": system}
            messages = messages[1:]
        roles = [m["role"] for m in messages]
        assert len(roles) >= 2 and roles[0] == "user" and roles[-1] == "assistant"
        assert all(a != b for a, b in zip(roles, roles[1:])), roles
        path = [by_text[m["content"]] for m in messages]
        assert {r["message_tree_id"] for r in path} == {conv["tree_id"]}
        root = path[0]
        assert root["parent_id"] is None and root["lang"] in languages and not removed(root)
        for parent, child in zip(path, path[1:]):
            assert child == best(eligible_children(rows, parent))
        # It ends where the path ends, or one trailing user turn before it.
        after = eligible_children(rows, path[-1])
        if after:
            assert best(after)["role"] == "prompter" and not eligible_children(rows, best(after))
    answerable = {
        r["message_tree_id"]
        for r in rows
        if r["parent_id"] is None
        and r["lang"] in languages
        and not removed(r)
        and r["role"] == "prompter"
        and eligible_children(rows, r)
    }
    assert sorted(c["tree_id"] for c in result.conversations) == sorted(answerable)


SPECIAL = [
    "<|end|>",
    "<|assistant|>",
    "<|user|>",
    "<|system|>",
    "<|endoftext|>",
    "<s>",
    "</s>",
    "\n",
    "\n\n",
    " ",
    "é",
    "日本語",
    "🙂",
    "ß",
    "\t",
    "{{ x }}",
    "{% if %}",
]
texts = (
    st.lists(
        st.one_of(st.text(st.characters(exclude_categories=("Cs", "Co")), max_size=12), st.sampled_from(SPECIAL)),
        min_size=1,
        max_size=6,
    )
    .map("".join)
    .filter(bool)
)


@st.composite
def conversations(draw) -> list[dict]:
    messages = [{"role": "system", "content": draw(texts)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages += [{"role": "user", "content": draw(texts)}, {"role": "assistant", "content": draw(texts)}]
    return messages


@pytest.fixture(scope="module")
def encoder(tiny_tokenizer):
    return ChatEncoder.from_hf(tiny_tokenizer)


@SETTINGS
@given(messages=conversations())
def test_label_mask_is_exactly_the_assistant_spans(encoder, messages):
    ids, labels = encoder.encode_with_labels(messages)
    assert len(ids) == len(labels)
    expected = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # Re-render: the prompt that asks for this turn is a prefix of the conversation's ids,
        # and the turn is its content as plain text followed by <|end|>.
        prompt = encoder.encode_prompt(messages[:i])
        assert ids[: len(prompt)] == prompt
        span = encoder.encode_text(message["content"], False) + [encoder.end_of_turn_id]
        assert ids[len(prompt) : len(prompt) + len(span)] == span
        expected[len(prompt) : len(prompt) + len(span)] = span
    assert labels == expected
    # Control-token text in a message is never read as a control token.
    specials = {encoder.end_of_turn_id}
    assert sum(1 for x in ids if x in specials) == len(messages)  # one <|end|> per turn, none from the texts
