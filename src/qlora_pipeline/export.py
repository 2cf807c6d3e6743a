"""The ``export`` stage: merged model -> GGUF F16 -> quantized GGUFs, with llama.cpp's own tools.

    qlora-pipeline export --run-dir runs/demo                       # F16, Q8_0, Q5_K_M, Q4_K_M
    qlora-pipeline export --run-dir runs/demo export.quant_types=[Q4_K_M,Q6_K]

Conversion runs llama.cpp's ``convert_hf_to_gguf.py`` (taken from the llama-cpp-python sources of
the installed version, see ``llamacpp``); quantization calls ``llama_cpp.llama_model_quantize``,
the same code as the ``llama-quantize`` binary. Each file is written under a temporary name and
renamed when complete; files already complete (``gguf/manifest.json`` names the merged model
they came from, and ``paths.manifest_holds`` finds each file's size and sha256 as recorded) are
skipped.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from qlora_pipeline.chat_format import END_OF_TURN
from qlora_pipeline.config import PipelineConfig
from qlora_pipeline.errors import ConfigError, PipelineError
from qlora_pipeline.layout import RunLayout
from qlora_pipeline.llamacpp import ensure_llama_cpp
from qlora_pipeline.model import count_parameters
from qlora_pipeline.paths import (
    disk_full,
    file_manifest,
    looks_like_disk_full,
    manifest_holds,
    require_free_space,
    write_json_atomic,
)
from qlora_pipeline.runtime import usable_cpus

F16 = "F16"


def gguf_path(run_dir: Path, quant: str) -> Path:
    return RunLayout(run_dir).gguf(quant)


def quant_types() -> dict[str, int]:
    """Every file type llama.cpp can quantize to, by its usual name (Q4_K_M, Q8_0, F16, ...)."""
    import llama_cpp

    types = {
        name[len("LLAMA_FTYPE_MOSTLY_") :]: getattr(llama_cpp, name)
        for name in dir(llama_cpp)
        if name.startswith("LLAMA_FTYPE_MOSTLY_")
    }
    types["F32"] = llama_cpp.LLAMA_FTYPE_ALL_F32
    return types


def check_quant_types(names: tuple[str, ...]) -> None:
    valid = quant_types()
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ConfigError(f"unknown quantization type {', '.join(unknown)}; llama.cpp knows {', '.join(sorted(valid))}")


# Nominal bits per weight of llama.cpp's common types (its quantize tool's table, rounded down):
# a first guess for the free-space check. A file that turns out bigger and fills the disk is
# still caught when the write fails.
BITS_PER_WEIGHT = {
    "F32": 32,
    "F16": 16,
    "BF16": 16,
    "Q8_0": 8.5,
    "Q6_K": 6.5,
    "Q5_K_M": 5.6,
    "Q5_K_S": 5.5,
    "Q5_1": 6,
    "Q5_0": 5.5,
    "Q4_K_M": 4.8,
    "Q4_K_S": 4.5,
    "Q4_1": 5,
    "Q4_0": 4.5,
    "Q3_K_L": 4.2,
    "Q3_K_M": 3.9,
    "Q3_K_S": 3.4,
    "Q2_K": 2.9,
}


def gguf_size_estimate(weights: int, quant: str) -> int:
    return int(weights * BITS_PER_WEIGHT.get(quant, 4) / 8)


def merged_identity(merged_dir: Path) -> str:
    """Identity of a merged model: name, size and modification time of its weight files.

    The merge stage replaces the whole folder, so every new merge changes it; hashing the
    content instead would read 7.6 GB for Phi-3.5 on every run.
    """
    digest = hashlib.sha256()
    for file in sorted(merged_dir.glob("*.safetensors")):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def default_model_name(cfg: PipelineConfig) -> str:
    # llama.cpp turns on Phi-3's whitespace handling of special tokens only when general.name
    # contains "phi-3" or "phi3" (llama-vocab.cpp); without it, prompts tokenize differently.
    if cfg.model.name_or_path == "tiny":
        return "Phi-3.5 tiny (qlora-pipeline, oasst1 fine-tune)"
    base = cfg.model.name_or_path.rstrip("/").split("/")[-1]
    return f"{base} (qlora-pipeline, oasst1 fine-tune)"


def _run(cmd: list[str], what: str, out_path: Path, needed: int) -> None:
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


def export_calls(cfg: PipelineConfig, run_dir: Path) -> list[str]:
    """What the export stage runs, written out (the notebooks print it before running the stage)."""
    import shlex

    from transformers import AutoTokenizer

    run_dir = Path(run_dir)
    merged, f16 = RunLayout(run_dir).merged, gguf_path(run_dir, F16)
    eot = AutoTokenizer.from_pretrained(str(merged)).convert_tokens_to_ids(END_OF_TURN)
    tmp, tmp2 = (f16.with_name(f".{f16.name}.{step}.tmp") for step in ("convert", "meta"))
    convert, metadata = converter_commands(merged, tmp, tmp2, cfg.export.model_name or default_model_name(cfg), eot)
    calls = [shlex.join(convert), shlex.join(metadata), f"os.replace({str(tmp2)!r}, {str(f16)!r})"]
    threads = cfg.export.threads or usable_cpus()
    for quant in (q for q in cfg.export.quant_types if q != F16):
        calls.append(
            f"llama_cpp.llama_model_quantize({str(f16)!r}, {str(gguf_path(run_dir, quant))!r}, "
            f"params(ftype={quant_types()[quant]} ({quant}), nthread={threads}))"
        )
    return calls


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
        _run(convert, f"converting {merged_dir} to GGUF", out_path, needed)
        _run(metadata, "writing GGUF metadata", out_path, needed)
        with open(tmp2, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp2, out_path)
    finally:
        for leftover in (tmp, tmp2):
            leftover.unlink(missing_ok=True)


def quantize_gguf(src: Path, dst: Path, quant: str, threads: int) -> None:
    """llama.cpp's quantizer (``llama_model_quantize``), written to a temporary name first."""
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    ftype = quant_types()[quant]
    # The F16 file holds 16 bits per weight plus its vocabulary: scale its size by the bits.
    needed = int(src.stat().st_size * BITS_PER_WEIGHT.get(quant, 4) / 16)
    require_free_space(dst, needed)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
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


def read_gguf_metadata(path: Path) -> dict:
    """The scalar and string key/values of a GGUF (token lists left out)."""
    from gguf import GGUFReader
    from gguf.constants import GGUFValueType

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise PipelineError(f"{path} is not a readable GGUF file ({str(exc)[:120]}); re-run the export stage") from None
    out = {}
    for key, field in reader.fields.items():
        if not field.types or field.types[0] == GGUFValueType.ARRAY:
            continue
        value = field.parts[field.data[0]]
        out[key] = bytes(value).decode("utf-8") if field.types[0] == GGUFValueType.STRING else value.tolist()[0]
    return out


def export(cfg: PipelineConfig, run_dir: Path, log=print) -> dict:
    """Write RUN/gguf/model-F16.gguf and one file per configured quantization type."""
    from tqdm.auto import tqdm

    run_dir, merged = Path(run_dir), RunLayout(run_dir).merged
    check_quant_types(cfg.export.quant_types)
    out_dir = RunLayout(run_dir).gguf_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob(".*.tmp"):  # a killed export's partial file (up to the model's size)
        leftover.unlink()
    manifest_path = RunLayout(run_dir).gguf_manifest
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    source = merged_identity(merged)
    name = cfg.export.model_name or default_model_name(cfg)
    if manifest.get("source") != source or manifest.get("model_name") != name:
        manifest = {"source": source, "model_name": name, "files": {}}

    from transformers import AutoTokenizer

    eot = AutoTokenizer.from_pretrained(str(merged)).convert_tokens_to_ids(END_OF_TURN)
    todo = [F16] + [q for q in cfg.export.quant_types if q != F16]
    bar = tqdm(todo, desc="GGUF export", unit="file")
    for quant in bar:
        path = gguf_path(run_dir, quant)
        record = manifest["files"].get(quant)
        if record and manifest_holds(out_dir, {path.name: record}):
            bar.write(f"{path.name}: already exported")
            continue
        bar.set_postfix(file=path.name)
        if quant == F16:
            convert_to_gguf(merged, path, name, eot)
        else:
            quantize_gguf(gguf_path(run_dir, F16), path, quant, cfg.export.threads or usable_cpus())
        # The file name only (runs can move); a file written again with the same bytes keeps its
        # entry (``file_manifest``), so the manifest, and what evaluate read, stays the same.
        entry = file_manifest(out_dir, [path.name], previous={path.name: record} if record else None)[path.name]
        manifest["files"][quant] = {**entry, "file": path.name}
        write_json_atomic(manifest_path, manifest)
    for stale in set(manifest["files"]) - set(todo):
        gguf_path(run_dir, stale).unlink(missing_ok=True)
        manifest["files"].pop(stale)
    write_json_atomic(manifest_path, manifest)
    sizes = ", ".join(f"{q} {manifest['files'][q]['bytes'] / 1e6:.1f} MB" for q in todo)
    log(f"GGUF files in {out_dir}: {sizes}")
    return manifest


def run(cfg: PipelineConfig, run_dir: Path, *, log=print, resume: bool = False) -> dict:
    """The stage interface (``pipeline.Stage``): export has nothing to resume."""
    return export(cfg, run_dir, log=log)
