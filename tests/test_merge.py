"""Merging: merged logits equal base + adapter logits; the merged folder is complete."""

from __future__ import annotations

import json

import pytest
import torch


def test_merge_check_is_within_fp32_tolerance(trained_run):
    check = json.loads((trained_run / "merge_check.json").read_text())
    assert check["dtype"] == "float32"
    assert check["tokens"] > 0
    assert check["max_abs_logit_diff"] <= 1e-3
    assert check["argmax_agreement"] == 1.0


def test_merged_model_matches_adapter_model_independently(trained_run, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 32010, 1724, 338, 278, 7483, 310, 3444, 29973, 32007, 32001]])
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_base)),
                                             str(trained_run / "adapter")).eval()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(trained_run / "merged")).eval()
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (with_adapter, merged, base))
    assert (a - b).abs().max() <= 1e-3
    assert (a - c).abs().max() > 1e-3  # the adapter changed something, so the check can fail


def test_merged_folder_has_what_llama_cpp_needs(trained_run):
    merged = trained_run / "merged"
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "tokenizer.model"):
        assert (merged / name).is_file(), name
    assert not list(merged.glob("*.bin")) and not list(merged.glob("*.pt"))
    assert 32007 in json.loads((merged / "generation_config.json").read_text())["eos_token_id"]


def test_merge_before_train_is_a_clear_error(prepared_run, test_config, tmp_path):
    from conftest import copy_run
    from qlora_pipeline.errors import StageOrderError
    from qlora_pipeline.merge import merge

    run = copy_run(prepared_run, tmp_path / "run")
    with pytest.raises(StageOrderError, match="run `qlora-pipeline train"):
        merge(test_config, run, log=lambda *a: None)


def test_adapter_for_another_base_is_a_clear_error(trained_run, tmp_path):
    from conftest import copy_run, make_config
    from qlora_pipeline.errors import ModelError
    from qlora_pipeline.merge import merge

    run = copy_run(trained_run, tmp_path / "run")
    other = make_config("tiny.hidden_size=512")  # a different base shape
    with pytest.raises(ModelError, match="does not fit this base model"):
        merge(other, run, log=lambda *a: None)
