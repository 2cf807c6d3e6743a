"""An importance matrix from the run's own training conversations, in llama.cpp's GGUF format.

    qlora-pipeline export --run-dir runs/demo 'export.quant_types=[Q4_K_M,Q4_K_M-imat]'

A variant named ``<TYPE>-imat`` is quantized with the matrix; the export stage collects it once
into ``RUN/gguf/imatrix.gguf``, which ``llama-quantize --imatrix`` reads as well.

llama.cpp's quantizers weigh each input column of a weight matrix by how large the activations
entering it are (``ggml_quantize_chunk``'s ``quant_weights``): with that weighting the rounding
error lands where it costs the least. ``llama-imatrix`` measures it by running a GGUF over a
text file; we measure the same statistic with the merged model over the conversations it was
fine-tuned on, in the chat template it will serve, which no text file gives.

The statistic (``tools/imatrix/imatrix.cpp``, ``collect_imatrix``): for every matrix
multiplication by a weight ``blk.*`` (and here also ``output.weight``, as ``--process-output``),
the sum over tokens of each input column's squared activation (``in_sum2``) and the number of
tokens (``counts``). ``llama-quantize`` divides one by the other (``tools/quantize/quantize.cpp``,
``load_imatrix``) and hands the mean to ``llama_model_quantize``; ``quantize_data`` does the same.

Written by hand: transformers has no importance-matrix collector, and llama.cpp's needs a
``llama-imatrix`` binary that the llama-cpp-python wheel does not ship. The file is written with
gguf-py's ``GGUFWriter`` and named with gguf-py's tensor name map, so the names are the GGUF's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DATASETS_KEY = "imatrix.datasets"  # llama.cpp's common/imatrix-loader.h
CHUNK_COUNT_KEY = "imatrix.chunk_count"
CHUNK_SIZE_KEY = "imatrix.chunk_size"
SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"


@dataclass
class ImportanceMatrix:
    """Per GGUF weight name: the summed squared input activation of each column, and the tokens."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def means(self) -> dict[str, np.ndarray]:
        """What ``llama_model_quantize`` takes: the mean squared activation per input column."""
        return {name: (s / self.counts[name]).astype(np.float32) for name, s in self.sums.items() if self.counts[name]}


def gguf_weight_names(model) -> dict[str, str]:
    """transformers module name -> GGUF weight name, for every Linear the quantizer quantizes."""
    import gguf
    import torch

    arch = gguf.MODEL_ARCH.PHI3
    name_map = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    out = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        mapped = name_map.get_name(module_name)
        if mapped is not None and (mapped.startswith("blk.") or mapped == "output"):
            out[module_name] = f"{mapped}.weight"
    return out


def collect(model, sequences: list[list[int]], max_tokens: int, progress=None) -> ImportanceMatrix:
    """Run ``model`` over ``sequences`` (token ids, one forward each) until ``max_tokens`` tokens
    have gone through it; sum each weight's squared input activations per column."""
    import torch

    names = gguf_weight_names(model)
    if not names:
        raise ValueError("no weight of this model maps to a GGUF tensor name (not a Phi-3 model?)")
    matrix = ImportanceMatrix()
    modules = dict(model.named_modules())

    def hook(gguf_name: str):
        def record(_module, inputs):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            total = matrix.sums.get(gguf_name)
            squares = (x * x).sum(dim=0).double().cpu().numpy()
            matrix.sums[gguf_name] = squares if total is None else total + squares
            matrix.counts[gguf_name] = matrix.counts.get(gguf_name, 0) + x.shape[0]

        return record

    handles = [modules[m].register_forward_pre_hook(hook(g)) for m, g in names.items()]
    seen = 0
    try:
        with torch.no_grad():
            for ids in sequences:
                ids = ids[: max_tokens - seen]
                if not ids:
                    break
                model(input_ids=torch.tensor([ids], device=model.device), use_cache=False)
                seen += len(ids)
                matrix.chunk_count += 1
                if progress is not None:
                    progress(len(ids))
    finally:
        for handle in handles:
            handle.remove()
    matrix.chunk_size = max(1, seen // max(1, matrix.chunk_count))
    return matrix


def write(matrix: ImportanceMatrix, path: Path) -> None:
    """``path`` in llama.cpp's GGUF imatrix format, renamed into place when complete."""
    import os

    import gguf

    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch="imatrix")
    try:
        writer.add_type("imatrix")
        writer.add_array(DATASETS_KEY, matrix.datasets)
        writer.add_uint32(CHUNK_COUNT_KEY, matrix.chunk_count)
        writer.add_uint32(CHUNK_SIZE_KEY, matrix.chunk_size)
        for name in sorted(matrix.sums):  # llama.cpp writes them sorted too
            writer.add_tensor(name + SUM_SUFFIX, matrix.sums[name].astype(np.float32).reshape(1, -1))
            writer.add_tensor(name + COUNT_SUFFIX, np.array([[matrix.counts[name]]], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read(path: Path) -> ImportanceMatrix:
    """An imatrix GGUF (ours or ``llama-imatrix``'s), by the rules of ``common_imatrix_load``."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    matrix = ImportanceMatrix()
    for name, data in tensors.items():
        if not name.endswith(SUM_SUFFIX):
            continue
        base = name[: -len(SUM_SUFFIX)]
        counts = tensors.get(base + COUNT_SUFFIX)
        if counts is None:
            raise ValueError(f"{path}: {base} has sums but no counts")
        matrix.sums[base] = data.reshape(-1).astype(np.float64)
        matrix.counts[base] = int(round(float(counts.reshape(-1)[0])))
    for key, attr in ((CHUNK_COUNT_KEY, "chunk_count"), (CHUNK_SIZE_KEY, "chunk_size")):
        fld = reader.fields.get(key)
        if fld is not None:
            setattr(matrix, attr, int(fld.parts[fld.data[0]][0]))
    fld = reader.fields.get(DATASETS_KEY)
    if fld is not None:
        matrix.datasets = [bytes(fld.parts[i]).decode() for i in fld.data]
    return matrix


def collect_for_run(cfg, run_dir: Path, log=print) -> ImportanceMatrix:
    """The matrix of the run's merged model over its training conversations (chat template and
    all, as it was fine-tuned), up to ``export.imatrix_tokens`` tokens."""
    from tqdm.auto import tqdm
    from transformers import AutoConfig

    from qlora_pipeline.chat_format import ChatEncoder
    from qlora_pipeline.data import read_split, tokenize_conversations
    from qlora_pipeline.layout import RunLayout
    from qlora_pipeline.model import eval_placement, free_memory, load_base_full_precision, load_tokenizer

    merged = str(RunLayout(run_dir).merged)
    encoder = ChatEncoder.from_hf(load_tokenizer(merged))
    examples, _ = tokenize_conversations(encoder, read_split(run_dir, "train"), cfg.data.max_seq_len, cfg.data.overlong)
    budget = cfg.export.imatrix_tokens
    device, dtype = eval_placement(AutoConfig.from_pretrained(merged).dtype)
    model = load_base_full_precision(merged, cfg.model, dtype=dtype, device=device)
    total = min(budget, sum(len(e["input_ids"]) for e in examples))
    with tqdm(total=total, desc="importance matrix", unit="tok") as bar:
        matrix = collect(model, [e["input_ids"] for e in examples], budget, progress=bar.update)
    del model
    free_memory()
    matrix.datasets = [f"{RunLayout(run_dir).relative(RunLayout(run_dir).split('train'))} (chat template)"]
    log(f"importance matrix: {len(matrix.sums)} weights, {total:,} tokens of training conversations")
    return matrix
