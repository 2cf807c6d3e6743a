"""What the export stage checks in ``RUN/merged`` before converting: each problem that llama.cpp's
converter would pass silently into a GGUF that then misbehaves, refused with one line.

- a config whose ``vocab_size`` is not the embedding's rows, or a tokenizer with ids past them;
- no chat template (chat clients could not format turns);
- no ``<|end|>`` in the vocabulary (nothing would end a turn: endless answers);
- a ``general.name`` without "phi-3"/"phi3": llama.cpp's tokenizer then leaves Phi-3's rules
  for the space after special tokens off (``src/llama-vocab.cpp``), and prompts tokenize otherwise;
- a rope configuration that the Phi-3 converter (``conversion/phi.py``) would drop: it writes
  LongRoPE factors only, so a ``linear`` or ``dynamic`` scaling, or one without factors, vanishes.
"""

from __future__ import annotations

import json
from pathlib import Path

from qlora_pipeline.chat_format import END_OF_TURN
from qlora_pipeline.errors import PipelineError

PHI3_NAME_MARKERS = ("phi-3", "phi3")  # llama-vocab.cpp: _contains_any(model_name, {"phi-3", "phi3"})
KEPT_ROPE_TYPES = ("longrope", "su", "yarn")  # conversion/phi.py, Phi3MiniModel.generate_extra_tensors
EMBEDDING = "model.embed_tokens.weight"


class ExportCheckError(PipelineError):
    """The merged model would convert into a GGUF that misbehaves."""


def embedding_rows(merged: Path) -> int:
    """Rows of the token embedding, read from the safetensors header (no weights loaded)."""
    from safetensors import safe_open

    for file in sorted(merged.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            if EMBEDDING in f.keys():
                return int(f.get_slice(EMBEDDING).get_shape()[0])
    raise ExportCheckError(f"{merged} holds no {EMBEDDING}; run `qlora-pipeline merge` again")


def check_vocabulary(merged: Path, config: dict, tokenizer) -> None:
    rows = embedding_rows(merged)
    if config.get("vocab_size") != rows:
        raise ExportCheckError(
            f"{merged / 'config.json'}: vocab_size is {config.get('vocab_size')} but {EMBEDDING} has "
            f"{rows} rows; set vocab_size to {rows} (or merge again from the base)"
        )
    if len(tokenizer) > rows:
        raise ExportCheckError(
            f"{merged}: the tokenizer has {len(tokenizer)} tokens but the embedding only {rows} rows; "
            "resize the embeddings (model.resize_token_embeddings) before training, or use the base's tokenizer"
        )
    if END_OF_TURN not in tokenizer.get_vocab():
        raise ExportCheckError(
            f"{merged}: {END_OF_TURN} is not in the tokenizer's vocabulary, so nothing would end an "
            "answer; copy the base model's tokenizer files into the merged folder"
        )


def check_chat_template(merged: Path, tokenizer) -> None:
    if not tokenizer.chat_template:
        raise ExportCheckError(
            f"{merged}: no chat template (tokenizer_config.json or chat_template.jinja), so the GGUF "
            "would carry none; copy the base model's tokenizer files into the merged folder"
        )


def check_model_name(name: str) -> None:
    if not any(marker in name.lower() for marker in PHI3_NAME_MARKERS):
        raise ExportCheckError(
            f"export.model_name={name!r} lacks 'Phi-3': llama.cpp would not apply Phi-3's special-token "
            "rules and prompts would tokenize differently; put 'Phi-3' in the name"
        )


def check_rope(merged: Path, config: dict) -> None:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = str(rope.get("rope_type") or rope.get("type") or "default").lower()
    if kind == "default":
        return
    where = merged / "config.json"
    if kind not in KEPT_ROPE_TYPES or not rope.get("long_factor") or not rope.get("short_factor"):
        raise ExportCheckError(
            f"{where}: rope type {kind!r} without long and short factors would be dropped by llama.cpp's "
            "Phi-3 converter (it keeps LongRoPE factors only); use the base's rope_scaling"
        )
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    rotary = int(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) * head_dim)
    lengths = {len(rope["long_factor"]), len(rope["short_factor"])}
    if lengths != {rotary // 2}:
        raise ExportCheckError(
            f"{where}: the rope factors have {sorted(lengths)} entries, the converter needs {rotary // 2} "
            "(half the rotary dimensions); use the base's rope_scaling"
        )


def check_before_export(merged: Path, model_name: str) -> int:
    """Refuse, with one line, a merged model that would convert into a GGUF that misbehaves;
    return the id of ``<|end|>`` (checked present), which the conversion marks as end of turn."""
    from transformers import AutoTokenizer

    config = json.loads((merged / "config.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    check_model_name(model_name)
    check_vocabulary(merged, config, tokenizer)
    check_chat_template(merged, tokenizer)
    check_rope(merged, config)
    return tokenizer.convert_tokens_to_ids(END_OF_TURN)
