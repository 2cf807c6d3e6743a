"""The LoRA as a GGUF adapter: ``RUN/gguf/adapter-F16.gguf`` beside the base as ``base-F16.gguf``.

    qlora-pipeline export --run-dir runs/demo export.lora=true
    qlora-pipeline chat --model runs/demo/gguf/base-F16.gguf --lora runs/demo/gguf/adapter-F16.gguf

A few MB instead of a whole model per fine-tune: llama.cpp applies the adapter to the base at
load time (llama-cpp-python's ``lora_path``). The adapter is converted by llama.cpp's own
``convert_lora_to_gguf.py``, from the same llama-cpp-python sources as the model converter; the
base is converted as the export stage converts the merged model. ``evaluate`` checks that base +
adapter gives the merged F16 GGUF's logits (``lora_parity``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from qlora_pipeline.gguf.llamacpp import ensure_llama_cpp
from qlora_pipeline.paths import require_free_space

LORA_CONVERTER = "convert_lora_to_gguf.py"


def lora_converter_command(adapter: Path, base: Path, out: Path) -> list[str]:
    files = ensure_llama_cpp()
    return [
        sys.executable,
        str(files.root / LORA_CONVERTER),
        "--base",
        str(base),
        "--outtype",
        "f16",
        "--outfile",
        str(out),
        str(adapter),
    ]


def convert_lora(adapter: Path, base: Path, out: Path) -> None:
    """``adapter`` (a peft folder) -> a LoRA GGUF at ``out``, renamed into place when complete."""
    from qlora_pipeline.gguf.convert import run_tool

    size = sum(f.stat().st_size for f in adapter.glob("*.safetensors"))
    require_free_space(out, size)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        run_tool(lora_converter_command(adapter, base, tmp), f"converting {adapter} to a LoRA GGUF", out, size)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
