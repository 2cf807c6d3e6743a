"""The chat prompt routes: every way a prompt is tokenized (stock tokenizers, ours, llama.cpp's
chat handler), compared id for id."""

from __future__ import annotations

from pathlib import Path

from qlora_pipeline.chat_format import ChatEncoder


def format_routes(section: dict) -> str:
    """``training 20/20, app 20/20, transformers_stock 0/20 (differs at token 1: [...] vs [...])``."""
    parts = []
    for name, row in section["routes"].items():
        text = f"{name} {row['identical']}/{section['conversations']}"
        diff = row["first_difference"]
        if diff:
            text += f" (first differs at token {diff['position']}: {diff['ids']} vs {diff['reference_ids']})"
        parts.append(text)
    return ", ".join(parts)


def _first_difference(ids: list[int], reference: list[int]) -> dict:
    at = next((i for i, (a, b) in enumerate(zip(ids, reference)) if a != b), min(len(ids), len(reference)))
    return {"position": at, "ids": ids[max(0, at - 2) : at + 4], "reference_ids": reference[max(0, at - 2) : at + 4]}


def stock_tokenizers(base: str, revision: str | None = None) -> dict:
    """The base's tokenizer as transformers loads it, two ways: by the base's folder or hub id
    (for Phi-3.5, transformers 5 ignores the declared ``LlamaTokenizer`` beside config.json and
    reads tokenizer.json as it is) and from its tokenizer files alone (it then builds a
    ``LlamaTokenizer`` with a pre-tokenizer of its own, which differs from llama.cpp)."""
    import shutil
    import tempfile

    from transformers import AutoTokenizer
    from transformers.utils import cached_file

    from qlora_pipeline.phi3_tokenizer import TOKENIZER_FILES

    out = {"transformers_stock": AutoTokenizer.from_pretrained(base, revision=revision)}
    with tempfile.TemporaryDirectory() as alone:
        for name in TOKENIZER_FILES:
            found = cached_file(base, name, revision=revision, _raise_exceptions_for_missing_entries=False)
            if found:
                shutil.copy2(found, Path(alone) / name)
        out["transformers_tokenizer_files_only"] = AutoTokenizer.from_pretrained(alone)
    return out


def chat_prompt_routes(stock: dict, tokenizer, chat, conversations: list[list[dict]]) -> dict:
    """Prompt ids for the same messages by every route that builds them, against llama.cpp's.

    The reference is llama-cpp-python's own Jinja2 chat handler on the GGUF's template (what
    ``create_chat_completion`` sends, BOS handling included): serving sees those ids. Routes:
    ``apply_chat_template(tokenize=True)`` on each tokenizer of :func:`stock_tokenizers` (the
    model-folder one is also what TRL's SFTTrainer tokenizes with), ``transformers`` the same on
    ``model.load_tokenizer``'s (tokenizer.json's own pipeline, whichever way it was loaded),
    ``training`` our encoder on it (the ids training uses), and ``app`` the app's and ``chat``'s
    prompt (``LlamaChat.prompt_ids``: our encoder on the GGUF).
    """
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = chat.llm
    formatter = Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token=llm.detokenize([llm.token_eos()], special=True).decode(),
        bos_token=llm.detokenize([llm.token_bos()], special=True).decode(),
    )
    training = ChatEncoder.from_hf(tokenizer)

    def apply(tok):
        return lambda m: list(tok.apply_chat_template(m, tokenize=True, add_generation_prompt=True)["input_ids"])

    routes = {
        **{name: apply(tok) for name, tok in stock.items()},
        "transformers": apply(tokenizer),
        "training": training.encode_prompt,
        "app": lambda m: chat.prompt_ids(m, max_new_tokens=16)[0],
    }
    report = {name: {"identical": 0, "first_difference": None} for name in routes}
    for messages in conversations:
        response = formatter(messages=messages)
        reference = llm.tokenize(response.prompt.encode("utf-8"), add_bos=not response.added_special, special=True)
        for name, route in routes.items():
            ids = route(messages)
            if ids == reference:
                report[name]["identical"] += 1
            elif report[name]["first_difference"] is None:
                report[name]["first_difference"] = _first_difference(ids, reference)
    return {"reference": "llama_cpp_chat_handler", "conversations": len(conversations), "routes": report}
