"""Held-out questions: does the fine-tuned model answer what it was never fine-tuned on?

    from qlora_pipeline.evaluation.heldout import load_questions, exact_match
    questions = load_questions("sample")            # the bundled sample_data/heldout_questions.jsonl

The bundled questions ask about facts that the tiny base's pre-training corpus states and that
the bundled fine-tuning sample never mentions (``scripts/make_sample_data.py``). Instruction
tuning teaches the format; the knowledge has to come from the base. Each answer is scored by
exact match against the reference sentence after normalisation (case, punctuation and
whitespace), the way SQuAD's exact match is computed.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from qlora_pipeline.errors import DataError

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


BUNDLED = {
    "sample": "heldout_questions.jsonl",  # facts of the tiny base's corpus (the tiny preset)
    "general": "heldout_questions_general.jsonl",  # facts a pre-trained Phi-3.5 knows (the phi35 presets)
}


def sample_questions_path(name: str = "sample") -> Path:
    return Path(str(resources.files("qlora_pipeline") / "sample_data" / BUNDLED[name]))


def load_questions(source: str) -> list[dict]:
    """``sample`` or ``general`` (the bundled files), ``none`` (no questions) or a .jsonl path of
    ``{"question": ..., "answer": ...}`` lines."""
    if source == "none":
        return []
    path = sample_questions_path(source) if source in BUNDLED else Path(source)
    if not path.is_file():
        raise DataError(
            f"held-out questions file {path} does not exist; set eval.heldout_questions to "
            "sample, general, none or a .jsonl file"
        )
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: malformed JSON ({exc.msg}); each line must be one JSON object") from None
        if not (isinstance(row, dict) and isinstance(row.get("question"), str) and isinstance(row.get("answer"), str)):
            raise DataError(f'{path}:{number}: needs string fields "question" and "answer"')
        questions.append(row)
    return questions


def normalize(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed."""
    return " ".join(_PUNCTUATION.sub(" ", text.casefold()).split())


def exact_match(answer: str, reference: str) -> bool:
    return normalize(answer) == normalize(reference)


def score(questions: list[dict], answer: Callable[[list[dict]], str]) -> dict:
    """Exact-match rate of ``answer`` (messages -> text) over the questions, with every answer."""
    answers = [answer([{"role": "user", "content": q["question"]}]).strip() for q in questions]
    hits = sum(exact_match(a, q["answer"]) for a, q in zip(answers, questions))
    return {"exact_match": hits / len(questions) if questions else None, "answers": answers}


def format_exact_match(rates: dict[str, float]) -> str:
    """``base 0.0%, adapter 11.4%, ...`` for the log and the summary."""
    return ", ".join(f"{name} {100 * rate:.1f}%" for name, rate in rates.items())


def hf_answerer(model, encoder, tokenizer, max_new_tokens: int) -> Callable[[list[dict]], str]:
    """Greedy answers from a transformers model, prompted with the training encoder's ids and
    stopped at the generation config's end tokens (``<|end|>`` among them)."""
    import torch

    stop = [encoder.end_of_turn_id, tokenizer.eos_token_id]
    device = next(model.parameters()).device

    def answer(messages: list[dict]) -> str:
        ids = torch.tensor([encoder.encode_prompt(messages)], device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=tokenizer.pad_token_id,
            )
        return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    return answer
