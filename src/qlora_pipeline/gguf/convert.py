"""Conversion and quantization with llama.cpp's own tools: ``convert_hf_to_gguf.py`` (and its
metadata tool) run as programs, ``llama_model_quantize`` called through llama-cpp-python.

    from qlora_pipeline.gguf.convert import convert_to_gguf, quantize_gguf
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

from qlora_pipeline.chat_format import END_OF_TURN
from qlora_pipeline.config import PipelineConfig
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.gguf.llamacpp import ensure_llama_cpp
from qlora_pipeline.gguf.variants import BITS_PER_WEIGHT, TensorTypes, gguf_size_estimate, quant_types
from qlora_pipeline.model import count_parameters
from qlora_pipeline.paths import disk_full, looks_like_disk_full, require_free_space


def default_model_name(cfg: PipelineConfig) -> str:
    # llama.cpp turns on Phi-3's whitespace handling of special tokens only when general.name
    # contains "phi-3" or "phi3" (llama-vocab.cpp); without it, prompts tokenize differently.
    if cfg.model.name_or_path == "tiny":
        return "Phi-3.5 tiny (qlora-pipeline, oasst1 fine-tune)"
    base = cfg.model.name_or_path.rstrip("/").split("/")[-1]
    return f"{base} (qlora-pipeline, oasst1 fine-tune)"


def run_tool(cmd: list[str], what: str, out_path: Path, needed: int) -> None:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        if looks_like_disk_full(result.stderr or "", out_path):
            raise disk_full(out_path, needed)
        lines = [line for line in (result.stderr or result.stdout).strip().splitlines() if line.strip()]
        detail = lines[-1] if lines else f"exit status {result.returncode}"
        raise PipelineError(f"{what} failed: {detail[:300]}")


def converter_commands(
    merged_dir: Path, out_path: Path, meta_path: Path, model_name: str, end_of_turn_id: int, outtype: str = "f16"
) -> tuple[list[str], list[str]]:
    """The two command lines of a conversion: llama.cpp's ``convert_hf_to_gguf.py``, then its
    ``gguf_new_metadata.py`` writing ``<|end|>`` as the end-of-turn token (the Phi-3 converter
    writes BOS/EOS but no end-of-turn id, which llama.cpp would otherwise guess from token text)."""
    files = ensure_llama_cpp()
    convert = [
        sys.executable,
        str(files.converter),
        str(merged_dir),
        "--outfile",
        str(out_path),
        "--outtype",
        outtype,
        "--model-name",
        model_name,
    ]
    new_metadata = files.root / "gguf-py" / "gguf" / "scripts" / "gguf_new_metadata.py"
    metadata = [
        sys.executable,
        str(new_metadata),
        str(out_path),
        str(meta_path),
        "--special-token-by-id",
        "eot",
        str(end_of_turn_id),
        "--force",
    ]
    return convert, metadata


def end_of_turn_id(model_dir: Path) -> int:
    """The id of ``<|end|>`` in the tokenizer of ``model_dir`` (what the conversion marks as end of turn)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir)).convert_tokens_to_ids(END_OF_TURN)


def convert_to_gguf(
    merged_dir: Path, out_path: Path, model_name: str, end_of_turn_id: int, outtype: str = "f16"
) -> None:
    """llama.cpp's converter (F16 by default), then its metadata tool to mark <|end|> as end-of-turn."""
    # The converter's file and the metadata tool's copy of it are on disk together for a moment.
    needed = 2 * gguf_size_estimate(count_parameters(str(merged_dir)), outtype.upper())
    require_free_space(out_path, needed)
    tmp = out_path.with_name(f".{out_path.name}.convert.tmp")
    tmp2 = out_path.with_name(f".{out_path.name}.meta.tmp")
    try:
        convert, metadata = converter_commands(merged_dir, tmp, tmp2, model_name, end_of_turn_id, outtype)
        run_tool(convert, f"converting {merged_dir} to GGUF", out_path, needed)
        run_tool(metadata, "writing GGUF metadata", out_path, needed)
        with open(tmp2, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp2, out_path)
    finally:
        for leftover in (tmp, tmp2):
            leftover.unlink(missing_ok=True)


def _quantize_params(quant: str, threads: int, imatrix: dict | None, types: TensorTypes | None):
    """llama.cpp's quantize parameters, and the ctypes arrays they point into (kept alive by the
    caller until the call returns): the importance matrix as ``llama-quantize --imatrix`` passes
    it (the mean per column, ``load_imatrix``), the overrides as its ``--tensor-type``."""
    import llama_cpp
    import numpy as np

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = quant_types()[quant]
    params.nthread = threads
    keep: list = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # zeroed: the terminator
        for entry, (name, values) in zip(entries, sorted(imatrix.items())):
            values = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(values)
            entry.name, entry.size = name.encode(), values.size
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = entries
        keep.append(entries)
    types = types or TensorTypes()
    if types.output is not None:
        params.output_tensor_type = types.output
    if types.token_embedding is not None:
        params.token_embedding_type = types.token_embedding
    if types.patterns:
        overrides = (llama_cpp.llama_model_tensor_override * (len(types.patterns) + 1))()
        for override, (pattern, ggml) in zip(overrides, types.patterns):
            override.pattern, override.type = pattern.encode(), ggml
        params.tt_overrides = overrides
        keep.append(overrides)
    return params, keep


def quantize_gguf(
    src: Path,
    dst: Path,
    quant: str,
    threads: int,
    imatrix: dict | None = None,
    types: TensorTypes | None = None,
) -> None:
    """llama.cpp's quantizer (``llama_model_quantize``), written to a temporary name first;
    ``imatrix`` (GGUF weight name -> mean squared activation per column) weighs the rounding."""
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    # The F16 file holds 16 bits per weight plus its vocabulary: scale its size by the bits.
    needed = int(src.stat().st_size * BITS_PER_WEIGHT.get(quant, 4) / 16)
    require_free_space(dst, needed)
    params, _keep = _quantize_params(quant, threads, imatrix, types)
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        with suppress_stdout_stderr(disable=False):  # llama.cpp logs a line per tensor
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 and looks_like_disk_full("", dst):
            raise disk_full(dst, needed)
        if rc != 0 or not tmp.is_file():
            raise PipelineError(
                f"llama.cpp could not quantize {src} to {quant} (status {rc}); "
                "check free disk space and that the F16 file is complete"
            )
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
