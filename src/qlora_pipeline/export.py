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

import hashlib
import json
from pathlib import Path

from qlora_pipeline.config import PipelineConfig
from qlora_pipeline.gguf.checks import check_before_export
from qlora_pipeline.gguf.convert import (
    convert_to_gguf,
    converter_commands,
    default_model_name,
    end_of_turn_id,
    quantize_gguf,
)
from qlora_pipeline.gguf.modelfile import default_variant
from qlora_pipeline.gguf.modelfile import write as write_modelfile
from qlora_pipeline.gguf.variants import (
    F16,
    TensorTypes,
    check_quant_types,
    gguf_path,
    quant_types,
    split_variant,
)
from qlora_pipeline.layout import RunLayout
from qlora_pipeline.paths import (
    file_manifest,
    manifest_holds,
    write_json_atomic,
)
from qlora_pipeline.runtime import usable_cpus


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
    from qlora_pipeline.gguf import imatrix

    path = RunLayout(run_dir).imatrix
    settings = {"tokens": cfg.export.imatrix_tokens}
    if not _is_current(manifest, IMATRIX, path, settings):
        imatrix.write(imatrix.collect_for_run(cfg, run_dir, log=log), path)
        _record(manifest, run_dir, IMATRIX, path, settings)
    return imatrix.read(path).means()


def _export_lora(cfg: PipelineConfig, run_dir: Path, manifest: dict, name: str, say) -> set[str]:
    """The base as F16 and the adapter as a LoRA GGUF (``gguf.lora``); their manifest keys."""
    from qlora_pipeline.base import resolve_base
    from qlora_pipeline.gguf.lora import convert_lora

    layout = RunLayout(run_dir)
    base = Path(resolve_base(cfg, log=say))
    for key, path in (("base-F16", layout.base_gguf), ("adapter-F16", layout.lora_gguf)):
        if _is_current(manifest, key, path, {}):
            say(f"{path.name}: already exported")
            continue
        if key == "base-F16":
            convert_to_gguf(base, path, name, end_of_turn_id(base))
        else:
            convert_lora(layout.adapter_for(cfg.prefer.enabled), base, path)
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
    write_modelfile(
        RunLayout(run_dir).modelfile, gguf_path(run_dir, chosen).name, cfg.eval.n_ctx, cfg.data.system_prompt
    )
    shown = [key for key in (*todo, "base-F16", "adapter-F16") if key in keep]
    sizes = ", ".join(f"{key} {manifest['files'][key]['bytes'] / 1e6:.1f} MB" for key in shown)
    log(f"GGUF files in {out_dir}: {sizes}")
    return manifest


def run(cfg: PipelineConfig, run_dir: Path, *, log=print, resume: bool = False) -> dict:
    """The stage interface (``pipeline.Stage``): export has nothing to resume."""
    return export(cfg, run_dir, log=log)
