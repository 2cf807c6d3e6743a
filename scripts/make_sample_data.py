"""Write the bundled oasst1-format sample, the tiny base model's pre-training text and the
held-out questions.

    python scripts/make_sample_data.py          # rewrites src/qlora_pipeline/sample_data/*

Everything here is written for this project (no oasst1 text is copied). The facts are
simple and checkable so that a 20M-parameter model can learn them on a CPU and a reader can
see whether a fine-tuned answer is right:

* ``base_corpus.txt`` states every fact as plain encyclopaedic prose, a short paragraph per
  fact in several wordings (one of them the wording of the answers). The tiny base model is
  pre-trained on it, so like a real base model it "knows" the facts but has never seen the
  chat format.
* ``oasst1_sample.jsonl`` asks about most of the same facts as conversations in the exact
  oasst1 message-row schema: branching trees, ranked and unranked replies, follow-up turns,
  other languages, deleted and rejected messages, orphans and duplicate trees, so that every
  rule of the ``prepare`` stage has something to act on.
* ``heldout_questions.jsonl`` asks about the facts that the fine-tuning data never mentions
  (``HELDOUT``). A fine-tuned model that answers them learned the format from fine-tuning and
  the knowledge from its base: the lesson of instruction tuning, measured as exact match.

The output is deterministic (fixed seed, fixed timestamps); ``tests/test_sample_data.py``
checks that the committed files equal a fresh run.
"""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parents[1] / "src" / "qlora_pipeline" / "sample_data"
SEED = 29

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Australia": "Canberra",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Turkey": "Ankara",
    "Russia": "Moscow",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Cuba": "Havana",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Nigeria": "Abuja",
    "Morocco": "Rabat",
}
ANIMAL_SOUNDS = {
    "cow": "moo",
    "dog": "woof",
    "cat": "meow",
    "duck": "quack",
    "sheep": "baa",
    "pig": "oink",
    "horse": "neigh",
    "owl": "hoot",
    "frog": "croak",
    "lion": "roar",
    "snake": "hiss",
    "bee": "buzz",
    "mouse": "squeak",
    "rooster": "cock-a-doodle-doo",
    "goat": "bleat",
    "crow": "caw",
}
COLOURS = {
    "the sky": "blue",
    "grass": "green",
    "a banana": "yellow",
    "snow": "white",
    "coal": "black",
    "a ripe tomato": "red",
    "an orange": "orange",
    "a plum": "purple",
    "chocolate": "brown",
    "a flamingo": "pink",
    "the sea": "blue",
    "a lemon": "yellow",
    "a leaf": "green",
    "milk": "white",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "happy": "sad",
    "up": "down",
    "light": "dark",
    "early": "late",
    "open": "closed",
    "full": "empty",
    "old": "new",
    "hard": "soft",
    "loud": "quiet",
    "wet": "dry",
    "strong": "weak",
    "rich": "poor",
    "high": "low",
}
# Invented facts: nothing outside this file can tell the model these, so a correct answer
# shows that the fine-tuned model learned them from the data.
INVENTED = {
    "Vell": ("lighthouse keeper", "Marta Quill"),
    "Dorrin": ("baker", "Otto Fenn"),
    "Saltmere": ("mayor", "Ida Rook"),
    "Brackwater": ("blacksmith", "Hal Moss"),
    "Eastfold": ("librarian", "Nora Vale"),
    "Kestrel Bay": ("harbour master", "Ben Ash"),
    "Thornby": ("doctor", "Lena Crow"),
    "Wyncombe": ("teacher", "Tom Reed"),
    "Aldermoor": ("gardener", "Ruth Pike"),
    "Glenhollow": ("painter", "Sam Fitch"),
    "Mirefield": ("miller", "Anna Holt"),
    "Rookstone": ("clockmaker", "Jory Lark"),
}

# Facts the fine-tuning sample never mentions: the base corpus states them, the held-out
# questions ask about them. About a quarter of each kind.
HELDOUT = {
    "France",
    "Peru",
    "Japan",
    "Kenya",
    "Norway",
    "Greece",
    "Cuba",
    "Canada",
    "cow",
    "owl",
    "frog",
    "bee",
    "snow",
    "a banana",
    "coal",
    "hot",
    "up",
    "full",
    "loud",
    "Thornby",
    "Eastfold",
    "Rookstone",
}
CORPUS_COPIES = 4  # each fact's paragraph appears this often in the corpus, its sentences reshuffled
HELDOUT_PHRASINGS = 2  # held-out questions per fact (the first wordings of its question list)


def _fact_items() -> list[dict]:
    """Every fact as (question variants, best answer, weaker answers, prose statements)."""
    items = []
    for country, city in CAPITALS.items():
        items.append(
            dict(
                subject=country,
                questions=[
                    f"What is the capital of {country}?",
                    f"Which city is the capital of {country}?",
                    f"Tell me the capital of {country}.",
                    f"Do you know the capital city of {country}?",
                    f"What city is the capital of {country}?",
                ],
                best=f"The capital of {country} is {city}.",
                weaker=[f"{city}.", f"I think it is a big city in {country}, but I am not sure."],
                prose=[
                    f"The capital of {country} is {city}.",
                    f"{city} is the capital of {country}.",
                    f"The capital city of {country} is {city}.",
                ],
                followup="And what is the capital of {other}?",
            )
        )
    for animal, sound in ANIMAL_SOUNDS.items():
        items.append(
            dict(
                subject=animal,
                questions=[
                    f"What sound does a {animal} make?",
                    f"What does a {animal} say?",
                    f"How does a {animal} sound?",
                    f"Which noise does a {animal} make?",
                ],
                best=f"A {animal} says {sound}.",
                weaker=[f"{sound.capitalize()}.", "Animals make many sounds."],
                prose=[
                    f"A {animal} says {sound}.",
                    f"The {animal} says {sound}.",
                    f"A {animal} makes the sound {sound}.",
                ],
                followup=None,
            )
        )
    for thing, colour in COLOURS.items():
        items.append(
            dict(
                subject=thing,
                questions=[
                    f"What colour is {thing}?",
                    f"Which colour is {thing}?",
                    f"Tell me the colour of {thing}.",
                    f"What is the colour of {thing}?",
                ],
                best=f"{thing[0].upper() + thing[1:]} is {colour}.",
                weaker=[f"{colour.capitalize()}.", "It depends on the light."],
                prose=[f"{thing[0].upper() + thing[1:]} is {colour}.", f"The colour of {thing} is {colour}."],
                followup=None,
            )
        )
    for word, opposite in OPPOSITES.items():
        items.append(
            dict(
                subject=word,
                questions=[
                    f"What is the opposite of {word}?",
                    f"Give me the opposite of {word}.",
                    f"Which word means the opposite of {word}?",
                    f"What is the antonym of {word}?",
                ],
                best=f"The opposite of {word} is {opposite}.",
                weaker=[f"{opposite.capitalize()}.", "Words have many opposites."],
                prose=[
                    f"The opposite of {word} is {opposite}.",
                    f"{opposite.capitalize()} is the opposite of {word}.",
                    f"The word {word} is the opposite of {opposite}.",
                ],
                followup=None,
            )
        )
    for town, (job, person) in INVENTED.items():
        items.append(
            dict(
                subject=town,
                questions=[
                    f"Who is the {job} of {town}?",
                    f"Tell me who the {job} of {town} is.",
                    f"Do you know the {job} of {town}?",
                    f"Who works as the {job} in {town}?",
                ],
                best=f"The {job} of {town} is {person}.",
                weaker=[f"{person}.", "I do not know that town."],
                prose=[
                    f"The {job} of {town} is {person}.",
                    f"{person} is the {job} of {town}.",
                    f"In {town}, the {job} is {person}.",
                ],
                followup=None,
            )
        )
    for item in items:
        item["heldout"] = item["subject"] in HELDOUT
    assert sum(item["heldout"] for item in items) == len(HELDOUT), "a HELDOUT subject matches no fact"
    return items


def _corpus(items: list[dict], rng: random.Random) -> list[str]:
    """A paragraph per fact, its sentences (the answer's wording among them) in a new order each copy."""
    lines = []
    for _ in range(CORPUS_COPIES):
        for item in items:
            sentences = list(item["prose"])
            rng.shuffle(sentences)
            lines.append(" ".join(sentences))
    rng.shuffle(lines)
    return lines


def heldout_questions(items: list[dict]) -> list[dict]:
    """Questions about the held-out facts, with the answer in the wording of the fine-tuning data."""
    return [
        {"question": question, "answer": item["best"], "subject": item["subject"]}
        for item in items
        if item["heldout"]
        for question in item["questions"][:HELDOUT_PHRASINGS]
    ]


# Short texts in other languages: oasst1 is multilingual and the default filter keeps `en`.
OTHER_LANGUAGE = {
    "de": [
        ("Was ist die Hauptstadt von Frankreich?", "Die Hauptstadt von Frankreich ist Paris."),
        ("Welche Farbe hat der Himmel?", "Der Himmel ist blau."),
    ],
    "es": [
        ("¿Cuál es la capital de España?", "La capital de España es Madrid."),
        ("¿Qué sonido hace un perro?", "Un perro dice guau."),
    ],
    "fr": [
        ("Quelle est la capitale de l'Italie ?", "La capitale de l'Italie est Rome."),
        ("Quel est le contraire de chaud ?", "Le contraire de chaud est froid."),
    ],
}
THANKS = ["Thank you!", "Thanks, that helps.", "Great, thanks.", "Perfect, thank you."]
YOU_ARE_WELCOME = ["You are welcome!", "Glad I could help.", "Happy to help."]
REJECTED_TEXT = "Buy cheap watches at my shop!!!"


class TreeWriter:
    """Builds message rows in the oasst1 schema with deterministic ids and timestamps."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.rows: list[dict] = []
        self.counter = 0

    def _id(self) -> str:
        self.counter += 1
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def add(
        self,
        *,
        text: str,
        role: str,
        parent: dict | None,
        tree_id: str | None = None,
        lang: str = "en",
        rank: int | None = None,
        deleted: bool = False,
        review_result: bool = True,
    ) -> dict:
        message_id = self._id()
        tree = tree_id or (parent["message_tree_id"] if parent else message_id)
        row = {
            "message_id": message_id,
            "parent_id": parent["message_id"] if parent else None,
            "user_id": str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
            "created_date": f"2023-02-{1 + self.counter // 1000:02d}T{(self.counter // 60) % 24:02d}:"
            f"{self.counter % 60:02d}:00.000000+00:00",
            "text": text,
            "role": role,
            "lang": lang,
            "review_count": 3,
            "review_result": review_result,
            "deleted": deleted,
            "rank": rank,
            "synthetic": False,
            "model_name": None,
            "detoxify": None,
            "message_tree_id": tree,
            "tree_state": "ready_for_export",
            "emojis": None,
            "labels": None,
        }
        self.rows.append(row)
        return row


def _replies(writer: TreeWriter, parent: dict, item: dict, rng: random.Random) -> dict:
    """Add 1-3 assistant replies under `parent`; return the best-ranked one."""
    n = rng.choice([1, 2, 2, 3, 3])
    texts = [item["best"]] + rng.sample(item["weaker"], k=min(n - 1, len(item["weaker"])))
    ranked = n > 1 and rng.random() < 0.85  # some sibling groups were never ranked
    order = list(range(len(texts)))
    rng.shuffle(order)  # insertion order must not decide: the rank does
    best = None
    for i in order:
        row = writer.add(text=texts[i], role="assistant", parent=parent, rank=i if ranked else None)
        if i == 0:
            best = row
    if n > 1 and rng.random() < 0.15:
        # A deleted reply that would have ranked first: the filter must skip it.
        writer.add(text="[deleted reply]", role="assistant", parent=parent, rank=0 if ranked else None, deleted=True)
    if not ranked:
        # Unranked siblings: the best answer is the only one; weaker texts would compete on
        # the tie-break, so keep the tree well-defined by making them rejected by review.
        for row in writer.rows[-len(texts) - 1 :]:
            if row["parent_id"] == parent["message_id"] and row is not best:
                row["review_result"] = False
    return best


def build(seed: int = SEED) -> tuple[list[dict], list[str], list[dict]]:
    """(oasst1 message rows, corpus lines, held-out questions)."""
    rng = random.Random(seed)
    writer = TreeWriter(rng)
    every_fact = _fact_items()
    prose = _corpus(every_fact, rng)  # the base knows every fact ...
    items = [it for it in every_fact if not it["heldout"]]  # ... fine-tuning mentions only these
    capital_items = [it for it in items if it["followup"]]

    for round_ in range(6):
        for item in items:
            question = item["questions"][round_ % len(item["questions"])]
            root = writer.add(text=question, role="prompter", parent=None)
            best = _replies(writer, root, item, rng)
            r = rng.random()
            if r < 0.25 and item["followup"]:
                other = rng.choice([c for c in capital_items if c is not item])
                country = other["best"].split(" of ", 1)[1].split(" is ")[0]
                follow = writer.add(text=item["followup"].format(other=country), role="prompter", parent=best)
                _replies(writer, follow, other, rng)
            elif r < 0.45:
                thanks = writer.add(text=rng.choice(THANKS), role="prompter", parent=best)
                writer.add(text=rng.choice(YOU_ARE_WELCOME), role="assistant", parent=thanks, rank=0)
            elif r < 0.55:
                # A trailing user turn with no reply: dropped by `prepare`.
                writer.add(text=rng.choice(THANKS), role="prompter", parent=best)
            if rng.random() < 0.05:
                # A spam reply rejected by review: dropped with its descendants.
                spam = writer.add(text=REJECTED_TEXT, role="assistant", parent=root, rank=None, review_result=False)
                writer.add(text="Is that a real offer?", role="prompter", parent=spam)

    for lang, pairs in OTHER_LANGUAGE.items():
        for _ in range(6):
            for question, answer in pairs:
                root = writer.add(text=question, role="prompter", parent=None, lang=lang)
                writer.add(text=answer, role="assistant", parent=root, lang=lang, rank=0)

    # Deleted and rejected roots: the whole tree goes.
    for item in rng.sample(items, 8):
        root = writer.add(text=item["questions"][0], role="prompter", parent=None, deleted=True)
        writer.add(text=item["best"], role="assistant", parent=root, rank=0)
    for _ in range(4):
        root = writer.add(text=REJECTED_TEXT, role="prompter", parent=None, review_result=False)
        writer.add(text="I cannot help with that.", role="assistant", parent=root, rank=0)
    # Prompts nobody answered: no user/assistant pair, dropped.
    for item in rng.sample(items, 6):
        writer.add(text=item["questions"][-1], role="prompter", parent=None)
    # Orphans: replies whose parent is not in the export.
    for item in rng.sample(items, 6):
        ghost = {"message_id": str(uuid.UUID(int=rng.getrandbits(128), version=4))}
        ghost["message_tree_id"] = ghost["message_id"]
        writer.add(text=item["best"], role="assistant", parent=ghost, rank=0)
    # Exact duplicate conversations (same texts, new ids): kept once.
    for item in rng.sample(items, 10):
        for _ in range(2):
            root = writer.add(text=item["questions"][1], role="prompter", parent=None)
            writer.add(text=item["best"], role="assistant", parent=root, rank=0)

    return writer.rows, prose, heldout_questions(every_fact)


def main() -> None:
    rows, prose, questions = build()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, records in (("oasst1_sample.jsonl", rows), ("heldout_questions.jsonl", questions)):
        with open(OUT_DIR / name, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    (OUT_DIR / "base_corpus.txt").write_text("\n".join(prose) + "\n", encoding="utf-8")
    trees = sum(1 for r in rows if r["parent_id"] is None)
    print(
        f"wrote {len(rows)} messages in {trees} trees, {len(prose)} prose lines and "
        f"{len(questions)} held-out questions to {OUT_DIR}"
    )


if __name__ == "__main__":
    main()
