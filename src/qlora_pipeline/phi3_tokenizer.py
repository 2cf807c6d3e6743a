"""The real Phi-3.5 tokenizer, rebuilt offline from llama.cpp's ``ggml-vocab-phi-3.gguf``.

    from qlora_pipeline.phi3_tokenizer import build_phi35_tokenizer
    tokenizer = build_phi35_tokenizer(out_dir)   # writes tokenizer.model + HF tokenizer files

The hub's ``microsoft/Phi-3.5-mini-instruct`` tokenizer cannot be downloaded here, but
llama.cpp ships its vocabulary (32,064 tokens with scores and types) as a vocab-only GGUF.
No library writes a SentencePiece model from a GGUF, so ``_sentencepiece_model`` does it by
hand with sentencepiece's own protobuf: llama.cpp's Phi-3 converter reads ``tokenizer.model``,
so a model built this way round-trips into a GGUF with the same vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qlora_pipeline.gguf.llamacpp import ensure_llama_cpp

# Phi-3.5-mini-instruct's special tokens as in its tokenizer_config.json.
BOS, EOS_TEXT, UNK = "<s>", "<|endoftext|>", "<unk>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPIECE_VOCAB_SIZE = 32000  # ids from here on are added tokens in the HF tokenizer, as in the original
# llama.cpp strips whitespace after every Phi-3 special token except these (llama-vocab.cpp, "phi-3"
# branch); the HF side must do the same or the prompt ids of training and serving differ.
NO_RSTRIP = {UNK, BOS, EOS_TEXT}
# The tokenizer files of the hub repository, as build_phi35_tokenizer writes them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def _field_values(reader, key: str) -> list:
    field = reader.fields[key]
    if len(field.data) == 1 and len(field.types) == 1:
        value = field.parts[field.data[0]]
        return value.tolist()
    return [field.parts[i] for i in field.data]


def read_vocab(vocab_gguf: Path) -> dict:
    """Tokens, scores, types and special ids from a vocab-only GGUF."""
    from gguf import GGUFReader

    reader = GGUFReader(vocab_gguf)
    tokens = [bytes(p).decode("utf-8") for p in _field_values(reader, "tokenizer.ggml.tokens")]
    scores = [float(np.asarray(s).item()) for s in _field_values(reader, "tokenizer.ggml.scores")]
    types = [int(np.asarray(t).item()) for t in _field_values(reader, "tokenizer.ggml.token_type")]

    def scalar(key: str):
        return int(reader.fields[key].parts[reader.fields[key].data[0]][0]) if key in reader.fields else None

    return {
        "tokens": tokens,
        "scores": scores,
        "types": types,
        "bos_id": scalar("tokenizer.ggml.bos_token_id"),
        "eos_id": scalar("tokenizer.ggml.eos_token_id"),
        "unk_id": scalar("tokenizer.ggml.unknown_token_id"),
    }


def _sentencepiece_model(vocab: dict, size: int) -> bytes:
    """A SentencePiece BPE ModelProto equal in behaviour to llama.cpp's SPM tokenizer."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    model = sp_pb2.ModelProto()
    # GGUF token types (gguf.TokenType) use SentencePiece's numbering: NORMAL=1, UNKNOWN=2,
    # CONTROL=3, USER_DEFINED=4, UNUSED=5, BYTE=6.
    for piece, score, kind in zip(vocab["tokens"][:size], vocab["scores"][:size], vocab["types"][:size]):
        entry = model.pieces.add()
        entry.piece = piece
        entry.score = score
        entry.type = kind
    spec = model.trainer_spec
    spec.model_type = sp_pb2.TrainerSpec.BPE
    spec.vocab_size = size
    spec.byte_fallback = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = vocab["unk_id"], vocab["bos_id"], 2, -1
    spec.split_digits = True
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = True
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    norm.precompiled_charsmap = b""
    return model.SerializeToString()


def phi35_chat_template() -> str:
    return ensure_llama_cpp().phi35_chat_template.read_text(encoding="utf-8")


def _with_phi3_strip_rules(backend_json: dict) -> dict:
    """Mark special tokens rstrip as llama.cpp does for models named Phi-3 (see NO_RSTRIP)."""
    for token in backend_json["added_tokens"]:
        if (token["special"] or token["content"] == "</s>") and token["content"] not in NO_RSTRIP:
            token["rstrip"] = True
    return backend_json


def phi35_reference() -> dict:
    """The published fields of microsoft/Phi-3.5-mini-instruct (config, generation config,
    special tokens), as gathered for the twin in ``sample_data/phi35_mini_instruct_facts.json``."""
    import json
    from importlib import resources

    return json.loads(
        (resources.files("qlora_pipeline") / "sample_data" / "phi35_mini_instruct_facts.json").read_text(
            encoding="utf-8"
        )
    )


def _hub_added_tokens(backend_json: dict) -> dict[str, dict]:
    """``added_tokens_decoder`` as the hub's tokenizer_config.json writes it: the role tags,
    ``<|end|>`` and the placeholders strip whitespace on their right, ``<|endoftext|>``, ``<s>``
    and ``<unk>`` do not, ``</s>`` is not special (published Phi-3 copies; see NO_RSTRIP)."""
    out = {}
    for token in sorted(backend_json["added_tokens"], key=lambda t: t["id"]):
        content = token["content"]
        out[str(token["id"])] = {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": content not in NO_RSTRIP,
            "single_word": False,
            "special": content != "</s>",
        }
    return out


def hub_tokenizer_config(added_tokens_decoder: dict, chat_template: str) -> dict:
    """tokenizer_config.json with the fields and values of the hub repository's."""
    special = phi35_reference()["special_tokens_map"]
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": special["bos_token"],
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": special["eos_token"],
        "legacy": False,
        "model_max_length": 131072,
        "pad_token": special["pad_token"],
        "padding_side": "left",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": special["unk_token"],
        "use_default_system_prompt": False,
    }


def build_phi35_tokenizer(out_dir: Path):
    """Write Phi-3.5's tokenizer files in the hub's format into ``out_dir``; return the tokenizer
    that ``AutoTokenizer.from_pretrained(out_dir)`` loads from them (the hub's code path).

    ``tokenizer.json`` comes from transformers' own GGUF reader, which reproduces llama.cpp's
    tokenizer test vectors; a tokenizer converted from the SentencePiece file orders its BPE
    merges differently and splits runs of spaces differently (10 of 46 vectors fail).
    ``tokenizer_config.json``, ``special_tokens_map.json`` and ``added_tokens.json`` carry the
    hub's fields: ``LlamaTokenizer``, ``legacy: false``, no BOS added, pad ``<|endoftext|>``.
    """
    import json

    from transformers import AutoTokenizer

    from qlora_pipeline.model import restore_file_pipeline
    from qlora_pipeline.paths import write_json_atomic

    files = ensure_llama_cpp()
    vocab = read_vocab(files.phi3_vocab)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(_sentencepiece_model(vocab, SPIECE_VOCAB_SIZE))

    from_gguf = AutoTokenizer.from_pretrained(str(files.phi3_vocab.parent), gguf_file=files.phi3_vocab.name)
    backend = _with_phi3_strip_rules(json.loads(from_gguf.backend_tokenizer.to_str()))
    write_json_atomic(out_dir / "tokenizer.json", backend)
    added = _hub_added_tokens(backend)
    write_json_atomic(out_dir / "tokenizer_config.json", hub_tokenizer_config(added, phi35_chat_template()))
    write_json_atomic(
        out_dir / "special_tokens_map.json",
        {
            name: {"content": value, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
            for name, value in phi35_reference()["special_tokens_map"].items()
        },
    )
    write_json_atomic(
        out_dir / "added_tokens.json", {t["content"]: int(i) for i, t in added.items() if int(i) >= SPIECE_VOCAB_SIZE}
    )
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    restore_file_pipeline(tokenizer, str(out_dir))  # as model.load_tokenizer does: llama.cpp's ids
    for name, token_id in ((EOS_TEXT, vocab["eos_id"]), (END, 32007), (USER, 32010), (ASSISTANT, 32001)):
        if tokenizer.convert_tokens_to_ids(name) != token_id:
            raise RuntimeError(f"{name} has id {tokenizer.convert_tokens_to_ids(name)}, expected {token_id}")
    return tokenizer
