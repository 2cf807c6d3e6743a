"""GGUF export: llama.cpp's converter and quantizer on the tiny model, metadata read back."""

from __future__ import annotations

import json

import pytest
from conftest import copy_run, make_config

from qlora_pipeline.errors import ConfigError
from qlora_pipeline.export import export
from qlora_pipeline.gguf.llamacpp import ensure_llama_cpp
from qlora_pipeline.gguf.variants import gguf_path, quant_types
from qlora_pipeline.serve.chat import read_gguf_metadata


def test_converter_and_quantizer_write_every_variant(trained_run):
    sizes = {q: gguf_path(trained_run, q).stat().st_size for q in ("F16", "Q8_0", "Q4_K_M")}
    assert sizes["Q4_K_M"] < sizes["Q8_0"] < sizes["F16"]
    assert not list((trained_run / "gguf").glob(".*tmp"))  # nothing half-written left behind
    for quant, expected in (
        ("F16", "LLAMA_FTYPE_MOSTLY_F16"),
        ("Q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0"),
        ("Q4_K_M", "LLAMA_FTYPE_MOSTLY_Q4_K_M"),
    ):
        import llama_cpp

        assert read_gguf_metadata(gguf_path(trained_run, quant))["general.file_type"] == getattr(llama_cpp, expected)


@pytest.mark.parametrize("quant", ["F16", "Q4_K_M"])
def test_metadata_carries_template_and_stop_tokens(trained_run, quant):
    meta = read_gguf_metadata(gguf_path(trained_run, quant))
    assert meta["general.architecture"] == "phi3"
    # llama.cpp applies Phi-3's special-token whitespace rules only when the name says Phi-3.
    assert "phi-3" in meta["general.name"].lower()
    assert meta["tokenizer.chat_template"] == ensure_llama_cpp().phi35_chat_template.read_text()
    assert meta["tokenizer.ggml.bos_token_id"] == 1
    assert meta["tokenizer.ggml.eos_token_id"] == 32000
    assert meta["tokenizer.ggml.eot_token_id"] == 32007


def test_unknown_quant_type_lists_the_valid_ones(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    before = sorted(p.name for p in (run / "gguf").iterdir())
    with pytest.raises(ConfigError) as info:
        export(make_config("export.quant_types=[Q4_K_Z]"), run, log=lambda *a: None)
    assert "unknown quantization type Q4_K_Z" in str(info.value)
    assert "Q4_K_M" in str(info.value) and "Q8_0" in str(info.value)
    assert sorted(p.name for p in (run / "gguf").iterdir()) == before


def test_any_type_llama_cpp_knows_is_accepted():
    assert {"Q4_K_M", "Q5_K_M", "Q8_0", "Q6_K", "IQ4_XS", "F16"} <= set(quant_types())


def test_a_completed_export_is_skipped(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    mtimes = {p.name: p.stat().st_mtime_ns for p in (run / "gguf").glob("*.gguf")}
    leftover = run / "gguf" / ".model-F16.gguf.convert.tmp"  # as a killed conversion leaves it
    leftover.write_bytes(b"GGUF" + b"\0" * 1000)
    messages = []
    export(make_config(), run, log=messages.append)
    assert {p.name: p.stat().st_mtime_ns for p in (run / "gguf").glob("*.gguf")} == mtimes
    assert not leftover.exists()


def test_files_of_another_merged_model_are_removed_not_left_for_the_app(trained_run, tmp_path):
    """A new merge (another source in the manifest) makes every recorded GGUF stale: one that is no
    longer configured goes too once the export finishes, instead of staying beside the new files."""
    run = copy_run(trained_run, tmp_path / "run")
    manifest = json.loads((run / "gguf" / "manifest.json").read_text())
    stale = run / "gguf" / "model-Q6_K.gguf"
    stale.write_bytes(b"GGUF of the previous merge")
    manifest["files"]["Q6_K"] = {"file": stale.name, "bytes": stale.stat().st_size, "sha256": "0" * 64}
    manifest["files"]["odd"] = {"file": "../config.json", "bytes": 1, "sha256": "0" * 64}  # never outside gguf/
    manifest["source"] = "a previous merge"
    (run / "gguf" / "manifest.json").write_text(json.dumps(manifest))
    export(make_config(), run, log=lambda *a: None)
    assert not stale.exists()
    assert (run / "config.json").is_file()
    assert sorted(p.name for p in (run / "gguf").glob("*.gguf")) == sorted(
        p.name for p in (trained_run / "gguf").glob("*.gguf")
    )


def test_report_has_the_scorecard_schema(trained_run):
    report = json.loads((trained_run / "report.json").read_text())
    assert set(report["gguf"]) == {"F16", "Q8_0", "Q4_K_M"}
    for row in report["gguf"].values():
        assert {"path", "bytes", "bits_per_weight", "ppl", "kld_vs_f16", "top1_vs_f16", "tokens_per_s"} <= row.keys()
    # Fewer bits, more divergence from F16: Q8_0 is closer to it than Q4_K_M, by KL and by top-1.
    for name, row in report["gguf"].items():  # relative to the run folder: the folder can move
        assert row["path"] == f"gguf/model-{name}.gguf" and (trained_run / row["path"]).is_file()
    q8, q4 = report["gguf"]["Q8_0"], report["gguf"]["Q4_K_M"]
    assert 0 < q8["kld_vs_f16"] < q4["kld_vs_f16"] and q8["top1_vs_f16"] >= q4["top1_vs_f16"]
    assert 15 < report["gguf"]["F16"]["bits_per_weight"] < 17
    prompts = report["parity"]["chat_prompt_ids"]
    for route in ("transformers_stock", "transformers", "training", "app"):  # llama.cpp's ids: serving's
        assert prompts["routes"][route]["identical"] == prompts["conversations"] > 0, route
    for case in ("f16_short", "f16_long", "f32_short", "f32_long"):
        row = report["parity"][case]
        assert row["passes"] is (
            row["relative_diff"] <= report["parity"]["bounds"]["relative"][case[:3].upper()]
            and row["top1"] >= report["parity"]["bounds"]["min_top1"]
        )
    stock_llama = prompts["routes"]["transformers_tokenizer_files_only"]  # the declared LlamaTokenizer's
    assert stock_llama["identical"] == 0 and stock_llama["first_difference"]["position"] == 1
    assert report["parity"]["f16_long"]["n_ctx"] == 8192 and report["parity"]["f16_long"]["tokens"] == 4608
    # llama.cpp's F32 file against transformers' fp32 logits: only arithmetic order differs.
    assert report["parity"]["f32_short"]["relative_diff"] < 1e-3
    assert report["parity"]["f32_long"]["relative_diff"] < 1e-3
    heldout = report["heldout"]
    assert set(heldout["exact_match"]) == {"base", "adapter", "merged", "F16", "Q8_0", "Q4_K_M"}
    assert len(heldout["answers"]) == heldout["questions"] > 0
    assert report["samples"] and set(report["samples"][0]["answers"]) == {"F16", "Q8_0", "Q4_K_M"}
    assert (trained_run / "scorecard.png").stat().st_size > 1000
