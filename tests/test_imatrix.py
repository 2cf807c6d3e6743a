"""The importance matrix: the statistic llama.cpp defines, its GGUF file format, and the
quantizer using it (``<TYPE>-imat`` variants, per-tensor overrides, types that need a matrix)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from qlora_pipeline.errors import ConfigError, PipelineError
from qlora_pipeline.gguf import imatrix
from qlora_pipeline.gguf.convert import quantize_gguf
from qlora_pipeline.gguf.variants import NEEDS_IMATRIX, TensorTypes, check_quant_types, quant_types


@pytest.fixture(scope="module")
def merged_model(trained_run):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(trained_run / "merged"), dtype=torch.float32)
    return model.eval()


def test_the_matrix_of_one_layer_equals_a_direct_computation(merged_model):
    """``tools/imatrix/imatrix.cpp``: per input column of a weight, the sum over tokens of the
    squared activation entering it, and the count of tokens. Layer 0's qkv projection reads the
    input layer norm of the token embeddings; computed here without any hook."""
    import torch

    sequences = [[1, 32010, 450, 3186, 338, 263], [1, 32010, 15043, 29991]]
    matrix = imatrix.collect(merged_model, sequences, max_tokens=1000)
    core = merged_model.model
    with torch.no_grad():
        direct = sum(
            (core.layers[0].input_layernorm(core.embed_tokens(torch.tensor([ids]))) ** 2).sum(dim=(0, 1))
            for ids in sequences
        )
    assert matrix.counts["blk.0.attn_qkv.weight"] == 10
    np.testing.assert_allclose(matrix.sums["blk.0.attn_qkv.weight"], direct.double().numpy(), rtol=1e-5)
    layers = merged_model.config.num_hidden_layers
    expected = {f"blk.{i}.{w}.weight" for i in range(layers) for w in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")}
    assert set(matrix.sums) == expected | {"output.weight"}  # the names of the GGUF's tensors
    assert matrix.sums["blk.0.ffn_down.weight"].shape == (merged_model.config.intermediate_size,)


def test_the_token_budget_caps_what_the_model_reads(merged_model):
    matrix = imatrix.collect(merged_model, [[1, 2, 3, 4], [5, 6, 7, 8]], max_tokens=6)
    assert set(matrix.counts.values()) == {6}
    assert matrix.chunk_count == 2


def test_the_file_is_in_llama_cpps_imatrix_format_and_reads_back(tmp_path, trained_run):
    """What ``common_imatrix_load`` requires: F32 ``<name>.in_sum2`` and ``<name>.counts`` tensors,
    and the ``imatrix.datasets`` / ``chunk_count`` / ``chunk_size`` keys (llama-quantize refuses a
    GGUF imatrix without them)."""
    from gguf import GGMLQuantizationType, GGUFReader

    matrix = imatrix.ImportanceMatrix(
        sums={"blk.0.attn_qkv.weight": np.array([4.0, 9.0, 0.5])},
        counts={"blk.0.attn_qkv.weight": 2},
        datasets=["data/train.jsonl"],
        chunk_count=2,
        chunk_size=3,
    )
    path = tmp_path / "imatrix.gguf"
    imatrix.write(matrix, path)
    reader = GGUFReader(str(path))
    assert {k for k in reader.fields if k.startswith("imatrix.")} == {
        "imatrix.datasets",
        "imatrix.chunk_count",
        "imatrix.chunk_size",
    }
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {"blk.0.attn_qkv.weight.in_sum2", "blk.0.attn_qkv.weight.counts"}
    assert {t.tensor_type for t in tensors.values()} == {GGMLQuantizationType.F32}
    assert [int(n) for n in tensors["blk.0.attn_qkv.weight.in_sum2"].shape] == [3, 1]  # ne0 = columns
    back = imatrix.read(path)
    assert (back.datasets, back.chunk_count, back.chunk_size) == (["data/train.jsonl"], 2, 3)
    np.testing.assert_allclose(back.means()["blk.0.attn_qkv.weight"], [2.0, 4.5, 0.25])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imatrix.gguf"]  # no temporary left


def test_types_that_need_a_matrix_are_refused_without_one():
    with pytest.raises(ConfigError, match="IQ2_XS needs an importance matrix; write IQ2_XS-imat instead"):
        check_quant_types(("Q4_K_M", "IQ2_XS"))
    check_quant_types(("IQ2_XS-imat", "Q3_K_M", "Q3_K_M-imat"))
    with pytest.raises(ConfigError, match="unknown quantization type Q9_K-imat"):
        check_quant_types(("Q9_K-imat",))
    with pytest.raises(ConfigError, match="F16-imat is not quantized"):
        check_quant_types(("F16-imat",))


def test_the_list_of_types_that_need_a_matrix_is_llama_cpps(trained_run, tmp_path):
    """Each low-bit type quantized without a matrix: llama.cpp refuses exactly the listed ones."""
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    f16 = str(trained_run / "gguf" / "model-F16.gguf").encode()
    low_bit = sorted(t for t in quant_types() if t.startswith(("IQ1", "IQ2", "IQ3", "Q2_K")))
    refused = set()
    for quant in low_bit:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = quant_types()[quant], 2
        with suppress_stdout_stderr(disable=False):
            rc = llama_cpp.llama_model_quantize(f16, str(tmp_path / "out.gguf").encode(), ctypes.byref(params))
        if rc != 0:
            refused.add(quant)
    assert refused == NEEDS_IMATRIX


def test_the_matrix_changes_the_quantization_and_a_wrong_one_is_refused(trained_run, tmp_path):
    f16 = trained_run / "gguf" / "model-F16.gguf"
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    quantize_gguf(f16, plain, "Q3_K_M", 2)
    from gguf import GGUFReader

    rng = np.random.default_rng(0)
    weights = [t for t in GGUFReader(str(f16)).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    matrix = {t.name: rng.uniform(0.01, 10, int(t.shape[0])) for t in weights}
    quantize_gguf(f16, weighted, "Q3_K_M", 2, imatrix=matrix)
    assert plain.stat().st_size == weighted.stat().st_size  # the same types ...
    assert plain.read_bytes() != weighted.read_bytes()  # ... rounded otherwise
    matrix["blk.0.attn_qkv.weight"] = matrix["blk.0.attn_qkv.weight"][:100]
    with pytest.raises(PipelineError, match="could not quantize"):
        quantize_gguf(f16, tmp_path / "wrong.gguf", "Q3_K_M", 2, imatrix=matrix)
    assert not (tmp_path / "wrong.gguf").exists()


def test_per_tensor_overrides_set_the_types(trained_run, tmp_path):
    from gguf import GGUFReader

    from qlora_pipeline.config import ExportConfig

    ecfg = ExportConfig(output_type="Q8_0", token_embedding_type="Q6_K", tensor_types=(r"ffn_down=Q6_K",))
    out = tmp_path / "q4.gguf"
    quantize_gguf(trained_run / "gguf" / "model-F16.gguf", out, "Q4_K_M", 2, types=TensorTypes.from_config(ecfg))
    kinds = {t.name: t.tensor_type.name for t in GGUFReader(str(out)).tensors}
    assert kinds["output.weight"] == "Q8_0"
    assert kinds["token_embd.weight"] == "Q6_K"
    assert {kind for name, kind in kinds.items() if "ffn_down" in name} == {"Q6_K"}
    assert kinds["blk.0.attn_qkv.weight"] == "Q4_K"  # the rest as Q4_K_M has it
    with pytest.raises(ConfigError, match="export.output_type: unknown tensor type 'Q9'"):
        TensorTypes.from_config(ExportConfig(output_type="Q9"))
    with pytest.raises(ConfigError, match="export.tensor_types"):
        ExportConfig(tensor_types=("ffn_down",))


def test_export_makes_the_runs_matrix_once_from_its_training_conversations(trained_run, tmp_path, merged_model):
    """The export stage's own path (``<TYPE>-imat``): the matrix of the merged model over the training
    split in the chat template, up to ``export.imatrix_tokens``; made once, made again when the
    budget changes, and only the ``-imat`` file follows it."""
    from conftest import copy_run, make_config

    from qlora_pipeline.chat_format import ChatEncoder
    from qlora_pipeline.data import read_split, tokenize_conversations
    from qlora_pipeline.export import export
    from qlora_pipeline.model import load_tokenizer

    run = copy_run(trained_run, tmp_path / "run")
    gguf = run / "gguf"

    def export_with(tokens: int) -> None:
        cfg = make_config("export.quant_types=[Q4_K_M,Q4_K_M-imat]", f"export.imatrix_tokens={tokens}")
        export(cfg, run, log=lambda *a: None)

    export_with(300)
    matrix = imatrix.read(gguf / "imatrix.gguf")
    encoder = ChatEncoder.from_hf(load_tokenizer(str(run / "merged")))
    cfg = make_config()
    examples, _ = tokenize_conversations(encoder, read_split(run, "train"), cfg.data.max_seq_len, cfg.data.overlong)
    direct = imatrix.collect(merged_model, [e["input_ids"] for e in examples], 300)
    assert sorted(matrix.sums) == sorted(direct.sums) and set(matrix.counts.values()) == {300}
    for name in direct.sums:
        np.testing.assert_allclose(matrix.sums[name], direct.sums[name], rtol=1e-4)
    assert matrix.datasets == ["data/train.jsonl (chat template)"]
    assert (gguf / "model-Q4_K_M-imat.gguf").read_bytes() != (gguf / "model-Q4_K_M.gguf").read_bytes()

    stamps = {p.name: p.stat().st_mtime_ns for p in gguf.glob("*.gguf")}
    export_with(300)  # nothing to do
    assert {p.name: p.stat().st_mtime_ns for p in gguf.glob("*.gguf")} == stamps
    export_with(200)  # a new budget: a new matrix, the -imat file again, the plain one kept
    assert set(imatrix.read(gguf / "imatrix.gguf").counts.values()) == {200}
    changed = {p.name for p in gguf.glob("*.gguf") if p.stat().st_mtime_ns != stamps.get(p.name)}
    assert {"imatrix.gguf", "model-Q4_K_M-imat.gguf"} <= changed
    assert "model-Q4_K_M.gguf" not in changed and "model-F16.gguf" not in changed
