"""Merging: merged logits equal base + adapter logits; the merged folder is complete."""

from __future__ import annotations

import json

import pytest
import torch


def test_merge_check_is_within_fp32_tolerance(trained_run):
    from safetensors import safe_open

    check = json.loads((trained_run / "merge_check.json").read_text())
    # The dtype the weights were written in, read from the safetensors header (not from the config).
    with safe_open(str(next((trained_run / "merged").glob("*.safetensors"))), framework="pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"F32"}
    assert check["tokens"] > 0
    assert check["max_abs_logit_diff"] <= 1e-3
    assert check["argmax_agreement"] == 1.0


def test_merged_model_matches_adapter_model_independently(trained_run, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 32010, 1724, 338, 278, 7483, 310, 3444, 29973, 32007, 32001]])
    fp32 = {"dtype": torch.float32}  # the twin is stored in bf16, like Phi-3.5; the merge is fp32
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_base), **fp32), str(trained_run / "adapter-dpo")
    ).eval()  # the tiny preset runs the prefer stage: merge takes its adapter
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base), **fp32).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(trained_run / "merged"), **fp32).eval()
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (with_adapter, merged, base))
    assert (a - b).abs().max() <= 1e-3
    assert (a - c).abs().max() > 1e-3  # the adapter changed something, so the check can fail


def load_folder(folder):
    """Every tensor of a saved model, whether in one safetensors file or in shards."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def test_merged_folder_has_what_llama_cpp_needs(trained_run):
    merged = trained_run / "merged"
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        assert (merged / name).is_file(), name
    assert list(merged.glob("*.safetensors"))
    assert not list(merged.glob("*.bin")) and not list(merged.glob("*.pt"))


def test_the_merged_models_generation_stops_at_end_of_turn(memorized_run):
    """With only the merged folder's own generation config, generate() stops at <|end|> (32007)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_pipeline.chat_format import ChatEncoder

    merged = memorized_run / "merged"
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = torch.tensor(
        [ChatEncoder.from_hf(tokenizer).encode_prompt([{"role": "user", "content": "Say hello number 5"}])]
    )
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
    new = out[0, ids.shape[1] :].tolist()
    assert new[-1] == 32007 and len(new) < 40  # stopped there, well before the limit
    assert tokenizer.decode(new[:-1]).strip() == "Hello there."


def test_merge_before_train_is_a_clear_error(prepared_run, test_config, tmp_path):
    from conftest import copy_run

    from qlora_pipeline.errors import StageOrderError
    from qlora_pipeline.pipeline import run_stage

    run = copy_run(prepared_run, tmp_path / "run")
    with pytest.raises(StageOrderError, match="run `qlora-pipeline train"):
        run_stage("merge", test_config, run, log=lambda *a: None)
    assert not (run / "merged").exists()


def test_adapter_for_another_base_is_a_clear_error(trained_run, tmp_path):
    from conftest import copy_run, make_config

    from qlora_pipeline.errors import ModelError
    from qlora_pipeline.merge import merge

    run = copy_run(trained_run, tmp_path / "run")
    other = make_config("tiny.hidden_size=512")  # a different base shape
    with pytest.raises(ModelError, match="does not fit this base model"):
        merge(other, run, log=lambda *a: None)


@pytest.mark.parametrize("rslora", [False, True])
def test_streaming_merge_equals_peft_merge_and_unload(tiny_base, tmp_path, rslora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qlora_pipeline.merge_streaming import stream_merge

    torch.manual_seed(0)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=rslora,
        init_lora_weights=False,  # random B: a real update
        target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    )
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), config)
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = peft_model.merge_and_unload().state_dict()

    info = stream_merge(tiny_base, tmp_path / "adapter", tmp_path / "merged", dtype=torch.float32, log=lambda *a: None)
    got = load_folder(tmp_path / "merged")
    base = load_folder(tiny_base)
    assert info["merged_weights"] == 4 * 2  # four modules in each of the two test layers
    assert set(got) == set(base)
    changed = [n for n in got if not torch.equal(got[n], base[n].float())]
    assert len(changed) == info["merged_weights"]
    assert max((got[n] - expected[n]).abs().max().item() for n in got) <= 1e-6


def test_merge_stage_streaming_matches_the_adapter(trained_run, tmp_path):
    from conftest import copy_run, make_config

    from qlora_pipeline.merge import merge

    run = copy_run(trained_run, tmp_path / "run")
    check = merge(make_config("merge.streaming=true"), run, log=lambda *a: None)
    assert check["streaming"] is True and check["merged_weights"] > 0
    assert check["max_abs_logit_diff"] <= 1e-3 and check["argmax_agreement"] == 1.0
    assert (run / "merged" / "tokenizer.model").is_file()


def test_streaming_merge_refuses_an_adapter_for_another_shape(trained_run, tmp_path):
    from conftest import make_config

    from qlora_pipeline.base import resolve_base
    from qlora_pipeline.errors import ModelError
    from qlora_pipeline.merge_streaming import stream_merge

    other = resolve_base(make_config("tiny.hidden_size=512"), log=lambda *a: None)
    with pytest.raises(ModelError, match="merge with the base it was trained on"):
        stream_merge(other, trained_run / "adapter", tmp_path / "merged", log=lambda *a: None)


def test_streaming_is_chosen_when_the_base_is_larger_than_half_the_free_memory(tiny_base, monkeypatch):
    import psutil
    from conftest import make_config

    from qlora_pipeline.base import base_weight_bytes
    from qlora_pipeline.errors import ConfigError
    from qlora_pipeline.merge import use_streaming

    size = base_weight_bytes(str(tiny_base), None)
    assert size > 0

    class Memory:
        available = 0

    cfg = make_config()
    assert cfg.merge.streaming == "auto"
    Memory.available = 2 * size + 1
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory)
    assert use_streaming(cfg, str(tiny_base), log=lambda *a: None) is False
    Memory.available = 2 * size - 1
    assert use_streaming(cfg, str(tiny_base), log=lambda *a: None) is True
    assert use_streaming(make_config("merge.streaming=false"), str(tiny_base), log=lambda *a: None) is False
    with pytest.raises(ConfigError, match="merge.streaming"):
        make_config("merge.streaming=sometimes")


def test_streaming_merge_can_store_another_dtype(trained_run, tiny_base, tmp_path):
    import json as _json

    from qlora_pipeline.merge_streaming import stream_merge

    stream_merge(tiny_base, trained_run / "adapter", tmp_path / "fp32", dtype=torch.float32, log=lambda *a: None)
    stream_merge(tiny_base, trained_run / "adapter", tmp_path / "bf16", dtype=torch.bfloat16, log=lambda *a: None)
    full, half = load_folder(tmp_path / "fp32"), load_folder(tmp_path / "bf16")
    assert {t.dtype for t in half.values()} == {torch.bfloat16}
    assert all(torch.equal(half[n], full[n].to(torch.bfloat16)) for n in full)  # merged in fp32, rounded once
    assert _json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
