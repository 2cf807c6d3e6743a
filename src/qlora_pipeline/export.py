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
from dataclasses import dataclass
from pathlib import Path

from qlora_pipeline.chat_format import END_OF_TURN
from qlora_pipeline.config import PipelineConfig
from qlora_pipeline.errors import ConfigError, PipelineError
from qlora_pipeline.export_checks import check_before_export
from qlora_pipeline.layout import RunLayout
from qlora_pipeline.llamacpp import ensure_llama_cpp
from qlora_pipeline.model import count_parameters
from qlora_pipeline.modelfile import default_variant
from qlora_pipeline.modelfile import write as write_modelfile
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


IMATRIX_SUFFIX = "-imat"
# File types that llama.cpp refuses to quantize without an importance matrix: those with tensors
# of the types src/llama-quant.cpp's tensor_requires_imatrix names (IQ1/IQ2 types, IQ3_XXS, and
# Q2_K inside Q2_K_S); IQ3_XS mixes in IQ3_XXS tensors. tests/test_imatrix.py checks this list
# against llama.cpp itself.
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"})


def split_variant(variant: str) -> tuple[str, bool]:
    """``"Q4_K_M-imat"`` -> ``("Q4_K_M", True)``: the llama.cpp file type, and whether the run's
    importance matrix weighs the quantization."""
    if variant.endswith(IMATRIX_SUFFIX):
        return variant[: -len(IMATRIX_SUFFIX)], True
    return variant, False


def check_quant_types(names: tuple[str, ...]) -> None:
    valid = quant_types()
    unknown = [n for n in names if split_variant(n)[0] not in valid]
    if unknown:
        raise ConfigError(
            f"unknown quantization type {', '.join(unknown)}; llama.cpp knows {', '.join(sorted(valid))} "
            f"(add {IMATRIX_SUFFIX} to quantize with the run's importance matrix)"
        )
    for name in names:
        quant, with_matrix = split_variant(name)
        if quant in NEEDS_IMATRIX and not with_matrix:
            raise ConfigError(
                f"export.quant_types: {quant} needs an importance matrix; write {quant}{IMATRIX_SUFFIX} instead"
            )
        if with_matrix and quant in (F16, "F32", "BF16"):
            raise ConfigError(f"export.quant_types: {name} is not quantized, so no importance matrix applies")


def ggml_type(name: str, key: str) -> int:
    """A tensor type's number (``Q6_K`` -> 14), from gguf-py's list of llama.cpp's types."""
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType[name.upper()].value
    except KeyError:
        known = ", ".join(t.name for t in GGMLQuantizationType)
        raise ConfigError(f"{key}: unknown tensor type {name!r}; llama.cpp knows {known}") from None


@dataclass(frozen=True)
class TensorTypes:
    """The export config's per-tensor type choices, as llama.cpp's quantize parameters take them."""

    output: int | None = None
    token_embedding: int | None = None
    patterns: tuple[tuple[str, int], ...] = ()

    @classmethod
    def from_config(cls, ecfg) -> TensorTypes:
        import re

        patterns = []
        for rule in ecfg.tensor_types:
            pattern, _, name = rule.rpartition("=")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"export.tensor_types: {pattern!r} is not a regular expression ({exc})") from None
            patterns.append((pattern, ggml_type(name, "export.tensor_types")))
        return cls(
            output=ggml_type(ecfg.output_type, "export.output_type") if ecfg.output_type else None,
            token_embedding=(
                ggml_type(ecfg.token_embedding_type, "export.token_embedding_type")
                if ecfg.token_embedding_type
                else None
            ),
            patterns=tuple(patterns),
        )

    def describe(self) -> dict:
        return {"output": self.output, "token_embedding": self.token_embedding, "patterns": list(self.patterns)}


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


def end_of_turn_id(model_dir: Path) -> int:
    """The id of ``<|end|>`` in the tokenizer of ``model_dir`` (what the conversion marks as end of turn)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir)).convert_tokens_to_ids(END_OF_TURN)


def export_calls(cfg: PipelineConfig, run_dir: Path) -> list[str]:
    """What the export stage runs, written out (the notebooks print it before running the stage)."""
    import shlex

    run_dir = Path(run_dir)
    merged, f16 = RunLayout(run_dir).merged, gguf_path(run_dir, F16)
    eot = end_of_turn_id(merged)
    tmp, tmp2 = (f16.with_name(f".{f16.name}.{step}.tmp") for step in ("convert", "meta"))
    convert, metadata = converter_commands(merged, tmp, tmp2, cfg.export.model_name or default_model_name(cfg), eot)
    calls = [shlex.join(convert), shlex.join(metadata), f"os.replace({str(tmp2)!r}, {str(f16)!r})"]
    threads = cfg.export.threads or usable_cpus()
    for variant in (q for q in cfg.export.quant_types if q != F16):
        quant, with_matrix = split_variant(variant)
        matrix = f", imatrix={RunLayout(run_dir).imatrix}" if with_matrix else ""
        calls.append(
            f"llama_cpp.llama_model_quantize({str(f16)!r}, {str(gguf_path(run_dir, variant))!r}, "
            f"params(ftype={quant_types()[quant]} ({quant}), nthread={threads}{matrix}))"
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


IMATRIX = "imatrix"  # its entry in gguf/manifest.json


def _read_manifest(run_dir: Path, source: str, name: str) -> tuple[dict, set[str]]:
    """The GGUF manifest, or a new one when the merged model or the model name changed; and then
    the file names the old one listed (they hold another model: removed once the export finishes,
    so that a failed export still leaves the previous complete files)."""
    layout = RunLayout(run_dir)
    manifest = json.loads(layout.gguf_manifest.read_text()) if layout.gguf_manifest.is_file() else {}
    if manifest.get("source") == source and manifest.get("model_name") == name:
        return manifest, set()
    records = [r for r in manifest.get("files", {}).values() if isinstance(r, dict)]
    # Bare names only: a manifest never sends a deletion outside gguf/.
    previous = {str(r.get("file")) for r in records if Path(str(r.get("file"))).name == r.get("file")}
    return {"source": source, "model_name": name, "files": {}}, previous


def _is_current(manifest: dict, key: str, path: Path, settings: dict) -> bool:
    """Whether ``path`` is complete as recorded (size and sha256) and was made with ``settings``."""
    record = manifest["files"].get(key)
    return bool(record) and record.get("settings", {}) == settings and manifest_holds(path.parent, {path.name: record})


def _record(manifest: dict, run_dir: Path, key: str, path: Path, settings: dict) -> None:
    """Enter a file just written into the manifest, and write the manifest."""
    # The file name only (runs can move); a file written again with the same bytes keeps its
    # entry (``file_manifest``), so the manifest, and what evaluate read, stays the same.
    old = manifest["files"].get(key)
    entry = file_manifest(path.parent, [path.name], previous={path.name: old} if old else None)[path.name]
    manifest["files"][key] = {**entry, "file": path.name, "settings": settings}
    write_json_atomic(RunLayout(run_dir).gguf_manifest, manifest)


def _importance_matrix(cfg: PipelineConfig, run_dir: Path, manifest: dict, log) -> dict:
    """The run's importance matrix (collected once into ``gguf/imatrix.gguf``): weight name ->
    mean squared activation per column, as ``llama-quantize --imatrix`` hands it on."""
    from qlora_pipeline import imatrix

    path = RunLayout(run_dir).imatrix
    settings = {"tokens": cfg.export.imatrix_tokens}
    if not _is_current(manifest, IMATRIX, path, settings):
        imatrix.write(imatrix.collect_for_run(cfg, run_dir, log=log), path)
        _record(manifest, run_dir, IMATRIX, path, settings)
    return imatrix.read(path).means()


def _export_lora(cfg: PipelineConfig, run_dir: Path, manifest: dict, name: str, say) -> set[str]:
    """The base as F16 and the adapter as a LoRA GGUF (``lora_gguf``); their manifest keys."""
    from qlora_pipeline.lora_gguf import convert_lora
    from qlora_pipeline.model import resolve_base

    layout = RunLayout(run_dir)
    base = Path(resolve_base(cfg, log=say))
    for key, path in (("base-F16", layout.base_gguf), ("adapter-F16", layout.lora_gguf)):
        if _is_current(manifest, key, path, {}):
            say(f"{path.name}: already exported")
            continue
        if key == "base-F16":
            convert_to_gguf(base, path, name, end_of_turn_id(base))
        else:
            convert_lora(layout.adapter, base, path)
        _record(manifest, run_dir, key, path, {})
    return {"base-F16", "adapter-F16"}


def export(cfg: PipelineConfig, run_dir: Path, log=print) -> dict:
    """Write RUN/gguf/model-F16.gguf and one file per configured variant (``<TYPE>`` or
    ``<TYPE>-imat``, the latter with the run's importance matrix)."""
    from tqdm.auto import tqdm

    run_dir, merged = Path(run_dir), RunLayout(run_dir).merged
    check_quant_types(cfg.export.quant_types)
    types = TensorTypes.from_config(cfg.export)
    name = cfg.export.model_name or default_model_name(cfg)
    eot = check_before_export(merged, name)  # before anything is written
    out_dir = RunLayout(run_dir).gguf_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob(".*.tmp"):  # a killed export's partial file (up to the model's size)
        leftover.unlink()
    manifest, previous = _read_manifest(run_dir, merged_identity(merged), name)
    todo = [F16] + [q for q in cfg.export.quant_types if q != F16]
    matrix = None
    bar = tqdm(todo, desc="GGUF export", unit="file")
    for variant in bar:
        path, (quant, with_matrix) = gguf_path(run_dir, variant), split_variant(variant)
        if with_matrix and matrix is None:
            matrix = _importance_matrix(cfg, run_dir, manifest, log)
        settings = {} if quant == F16 else {"tensor_types": types.describe(), "imatrix": with_matrix}
        if with_matrix:
            settings["imatrix_sha256"] = manifest["files"][IMATRIX]["sha256"]
        if _is_current(manifest, variant, path, settings):
            bar.write(f"{path.name}: already exported")
            continue
        bar.set_postfix(file=path.name)
        if quant == F16:
            convert_to_gguf(merged, path, name, eot)
        else:
            threads = cfg.export.threads or usable_cpus()
            quantize_gguf(gguf_path(run_dir, F16), path, quant, threads, matrix if with_matrix else None, types)
        _record(manifest, run_dir, variant, path, settings)
    keep = set(todo) | ({IMATRIX} if matrix is not None else set())
    if cfg.export.lora:
        keep |= _export_lora(cfg, run_dir, manifest, name, bar.write)
    for stale in set(manifest["files"]) - keep:
        (out_dir / manifest["files"].pop(stale)["file"]).unlink(missing_ok=True)
    for orphan in previous - {record["file"] for record in manifest["files"].values()}:
        (out_dir / orphan).unlink(missing_ok=True)  # written for another merged model
    write_json_atomic(RunLayout(run_dir).gguf_manifest, manifest)
    chosen = cfg.export.modelfile_variant or default_variant(tuple(todo[1:]) or (F16,))
    write_modelfile(RunLayout(run_dir).modelfile, gguf_path(run_dir, chosen).name, cfg.eval.n_ctx)
    shown = [key for key in (*todo, "base-F16", "adapter-F16") if key in keep]
    sizes = ", ".join(f"{key} {manifest['files'][key]['bytes'] / 1e6:.1f} MB" for key in shown)
    log(f"GGUF files in {out_dir}: {sizes}")
    return manifest


def run(cfg: PipelineConfig, run_dir: Path, *, log=print, resume: bool = False) -> dict:
    """The stage interface (``pipeline.Stage``): export has nothing to resume."""
    return export(cfg, run_dir, log=log)
